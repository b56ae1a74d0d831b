"""The paper-style accuracy table: rows = methods (x layer map x weight x bits ...), columns = tasks + Avg.

A cell is mean +- std over seeds of each run's best dev score (x100, one decimal, as in the papers); the
best value of each column is bold (compared at the shown precision, so equal-looking cells are both bold);
the Seeds column shows how many seeds each row's cells average. When a row still covers several configs
(an Optuna search, or an axis left out of `rows`), the config with the best mean is shown, as the papers do.

>>> table = accuracy_table(data)                      # doctest: +SKIP
>>> print(table.to_markdown())                        # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from kdplatform.report.collect import AXIS_LABELS, CONFIG_AXES, TASK_LABELS, ReportData, sort_key, tasks_in

NA = "–"  # shown for an axis that does not apply (logged as '')
AVG = "avg"


def _is_seed_like(param: str) -> bool:
    return "seed" in param.lower()


def varying_params(runs: pd.DataFrame, group_cols: list[str]) -> list[str]:
    """Dotted params (`params.x.y`) that are real axes within `group_cols` groups: they take several values
    in a group, and repeat across seeds (a value unique to every run, like a path, is not an axis)."""
    cands = [c for c in runs.columns if c.startswith("params.") and not _is_seed_like(c)
             and c[len("params."):] not in ("task", *CONFIG_AXES)]
    if not cands or runs.empty:
        return []
    g = runs[[*group_cols, *cands]].fillna("").groupby(group_cols, dropna=False)
    nunique, size = g.nunique(), g.size()
    out = []
    for c in cands:
        varies = nunique[c] > 1
        if varies.any() and (nunique[c][varies] < size[varies]).any():
            out.append(c)
    return sorted(out)


def _determined_by(runs: pd.DataFrame, col: str, by: list[str]) -> bool:
    return bool((runs.groupby(by, dropna=False)[col].nunique(dropna=False) <= 1).all())


def auto_rows(runs: pd.DataFrame, search_axes: list[str] | tuple = ()) -> list[str]:
    """Row axes: method, then each trial axis that varies and is not implied by the axes before it
    (e.g. act_bits when it always follows bits), then dotted grid axes (`params.data.max_train_examples`).
    Optuna-searched params are not rows: the best searched config of a row is shown."""
    searched = {f"params.{a}" for a in search_axes} | set(search_axes)
    rows = ["method"]
    for axis in CONFIG_AXES[1:]:
        if axis not in searched and runs[axis].nunique() > 1 and not _determined_by(runs, axis, ["task", *rows]):
            rows.append(axis)
    extra = [c for c in varying_params(runs, ["task", *rows]) if c not in searched]
    for c in extra:
        if not _determined_by(runs, c, ["task", *rows]):
            rows.append(c)
    return rows


def config_columns(runs: pd.DataFrame, rows: list[str]) -> list[str]:
    """Columns that identify a config within a row (everything that varies except task and seed)."""
    rest = [a for a in CONFIG_AXES if a not in rows and runs[a].nunique() > 1]
    return [*rows, *rest, *[c for c in varying_params(runs, ["task", *rows, *rest]) if c not in rows]]


def axis_label(col: str) -> str:
    return AXIS_LABELS.get(col, col[len("params."):] if col.startswith("params.") else col)


def run_scores(data: ReportData, metric: str = "score") -> pd.DataFrame:
    """One row per run with `value` = the run's best dev value of `metric` (x1, as logged)."""
    runs = data.runs.copy()
    if metric == "score":
        runs["value"] = runs["best_score"]
        return runs
    best = data.key_history(f"dev/{metric}").groupby("run_id").value.max().rename("value")
    return runs.merge(best, left_on="run_id", right_index=True, how="inner")


def select_best_configs(scores: pd.DataFrame, rows: list[str], configs: list[str]) -> pd.DataFrame:
    """Keep, for each (row, task), the runs of the config with the best mean value; adds n_configs."""
    scores = scores.copy()
    if not configs or configs == rows:
        scores["n_configs"] = 1
        return scores
    keyed = scores.fillna({c: "" for c in configs})
    means = keyed.groupby(["task", *configs], dropna=False).value.mean().reset_index()
    means = means.sort_values("value", ascending=False, kind="stable")
    best = means.drop_duplicates(["task", *rows], keep="first")
    n_configs = means.groupby(["task", *rows], dropna=False).size().rename("n_configs").reset_index()
    kept = keyed.merge(best[["task", *configs]], on=["task", *configs], how="inner")
    return kept.merge(n_configs, on=["task", *rows], how="left")


def _shown(x: float) -> float:
    """The value as displayed (one decimal); bold is decided on this so ties look like ties."""
    return float(f"{x:.1f}")


@dataclass
class AccuracyTable:
    """Numbers of the table (x100). `stats` is long: row keys, task (or 'avg'), mean, std, n, bold, n_configs."""

    rows: list[str]
    tasks: list[str]
    stats: pd.DataFrame
    caption: str = ""

    # -------------------------------------------------------------------------------- display frames
    def row_index(self) -> pd.MultiIndex:
        keys = self.stats[self.rows].drop_duplicates()
        keys = keys.iloc[sorted(range(len(keys)), key=lambda i: tuple(
            sort_key(c)(keys[c].iloc[i]) for c in self.rows))]
        return pd.MultiIndex.from_frame(keys.replace("", NA).astype(str),
                                        names=[axis_label(c) for c in self.rows])

    def columns(self) -> list[str]:
        return self.tasks + ([AVG] if len(self.tasks) > 1 else [])

    def cells(self) -> dict[tuple, dict]:
        """{(row as displayed, task or 'avg'): stats record}."""
        shown = self.stats[self.rows].replace("", NA).astype(str)
        keys = list(zip(*(shown[c] for c in self.rows)))
        return {(k, t): rec for k, t, rec in zip(keys, self.stats.task, self.stats.to_dict("records"))}

    def frames(self, pm: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(cell text, bold mask) indexed by row, one column per task + Avg + Seeds; `pm` joins mean and std."""
        index = self.row_index()
        cols = self.columns()
        labels = [TASK_LABELS.get(t, t) if t != AVG else "Avg" for t in cols]
        cells = self.cells()
        text, bold = [], []
        for row in index:
            row = row if isinstance(row, tuple) else (row,)
            trow, brow, ns = [], [], []
            for t in cols:
                c = cells.get((row, t))
                if c is None:
                    trow.append(NA)
                    brow.append(False)
                    continue
                if t == AVG or c["n"] < 2 or pd.isna(c["std"]):
                    trow.append(f"{c['mean']:.1f}")
                else:
                    trow.append(f"{c['mean']:.1f}{pm}{c['std']:.1f}")
                brow.append(bool(c["bold"]))
                if t != AVG:
                    ns.append(int(c["n"]))
            trow.append(NA if not ns else str(ns[0]) if min(ns) == max(ns) else f"{min(ns)}–{max(ns)}")
            brow.append(False)
            text.append(trow)
            bold.append(brow)
        columns = [*labels, "Seeds"]
        return pd.DataFrame(text, index=index, columns=columns), pd.DataFrame(bold, index=index, columns=columns)

    # ------------------------------------------------------------------------------------- formats
    def to_html(self) -> str:
        text, bold = self.frames(" ± ")
        styler = text.style.apply(lambda _: np.where(bold, "font-weight: bold", ""), axis=None)
        styler = styler.format(escape="html").format_index(escape="html", axis=0).format_index(escape="html", axis=1)
        styler = styler.set_table_attributes('class="kdp-table"')
        if self.caption:
            styler = styler.set_caption(self.caption)
        return styler.to_html()

    def to_latex(self) -> str:
        text, bold = self.frames(r" $\pm$ ")
        styler = text.style.apply(lambda _: np.where(bold, "textbf:--rwrap;", ""), axis=None)
        styler = styler.format_index(escape="latex", axis=0).format_index(escape="latex", axis=1)
        styler.index.names = [n.replace("_", r"\_") for n in styler.index.names]
        nidx = len(self.rows)
        column_format = "l" * nidx + "c" * (len(text.columns) - 1) + "r"
        return styler.to_latex(hrules=True, column_format=column_format, sparse_index=False,
                               caption=self.caption or None, position_float="centering" if self.caption else None,
                               environment="table" if self.caption else None)

    def to_markdown(self) -> str:
        text, bold = self.frames(" ± ")
        shown = text.mask(bold, "**" + text + "**")
        return shown.reset_index().to_markdown(index=False)

    def to_csv(self) -> str:
        s = self.stats
        return s[[*self.rows, "task", "mean", "std", "n", "bold", "n_configs"]].to_csv(index=False,
                                                                                     float_format="%.6g")


def accuracy_table(data: ReportData, rows: list[str] | None = None, metric: str = "score",
                   select: str = "best", caption: str = "") -> AccuracyTable:
    """Aggregate best dev values over seeds into the paper table (see module doc)."""
    scores = run_scores(data, metric)
    if scores.empty:
        raise ValueError(f"no run has dev/{metric}")
    rows = list(rows) if rows else auto_rows(scores, data.search_axes)
    rows = [r if r in scores.columns or r in CONFIG_AXES else f"params.{r}" for r in rows]
    for r in rows:
        if r not in scores.columns:
            raise ValueError(f"unknown row axis {r!r}")
        scores[r] = scores[r].fillna("").astype(str)
    if select == "best":
        scores = select_best_configs(scores, rows, config_columns(scores, rows))
    elif select == "all":
        scores["n_configs"] = scores.groupby(["task", *rows]).value.transform("size").astype("int64")
    else:
        raise ValueError(f"select must be 'best' or 'all', not {select!r}")
    scores["pct"] = scores["value"] * 100.0
    g = scores.groupby([*rows, "task"], dropna=False)
    stats = g.pct.agg(mean="mean", std="std", n="size").reset_index()
    stats = stats.merge(g.n_configs.max().reset_index(), on=[*rows, "task"])
    tasks = tasks_in(scores)
    if len(tasks) > 1:  # Avg: mean of the row's task means, only for rows that cover every task
        per_row = stats.groupby(rows, dropna=False)
        avg = per_row["mean"].mean().reset_index()
        full = per_row.task.nunique().reset_index(drop=True) == len(tasks)
        avg = avg[full.to_numpy()]
        avg["task"], avg["std"], avg["n"] = AVG, np.nan, per_row.n.min().reset_index(drop=True)[full].to_numpy()
        avg["n_configs"] = 1
        stats = pd.concat([stats, avg], ignore_index=True)
    shown = stats["mean"].map(_shown)
    stats["bold"] = shown == shown.groupby(stats.task).transform("max")
    stats["n"] = stats["n"].astype("int64")
    order = [*tasks, AVG]
    keys = [stats[c].map(sort_key(c)) for c in rows] + [stats.task.map(order.index)]
    stats = stats.iloc[sorted(range(len(stats)), key=lambda i: tuple(k.iloc[i] for k in keys))]
    return AccuracyTable(rows, tasks, stats.reset_index(drop=True), caption)
