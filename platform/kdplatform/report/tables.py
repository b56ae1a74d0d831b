"""The paper-style accuracy table: rows = methods (x layer map x weight x bits ...), columns = tasks + Avg.

A cell is mean +- std over seeds of each run's best (or final) dev score (x100, one decimal, as in the papers)
and the number of seeds n (no std where n = 1); the best student of each column is bold (compared at the
shown precision, so equal-looking cells are both bold), a cell at or below the majority-class level is
flagged and never bold. A teacher row (the final dev score of the teacher model the students were distilled
from) and a majority-class row give the reference points (in a table of best values; a table of final values
has its own 'How to read' line and no reference rows). When a row still
covers several configs (an Optuna search, or an axis left out of `rows`), the config with the best mean is
shown, as the papers do. A second table gives each row's difference to a baseline method with a 95% interval
(stats.py).

>>> table = accuracy_table(data)                      # doctest: +SKIP
>>> print(table.to_markdown())                        # doctest: +SKIP
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kdplatform.report.collect import AXIS_LABELS, CONFIG_AXES, TASK_LABELS, ReportData, sort_key, tasks_in
from kdplatform.report.stats import seed_difference

NA = "–"  # shown for an axis that does not apply (logged as '')
AVG = "avg"


# Params the worker logs that name a trial rather than set it: one value per config (cfg_hash; run_suffix, the
# label of its grid values), per teacher (teacher_hash) or per experiment (name). The settings they stand for
# are params of their own, so these are never axes (in a single-seed grid nothing else tells them apart).
IDENTITY_PARAMS = ("cfg_hash", "teacher_hash", "run_suffix", "name")


def _is_seed_like(param: str) -> bool:
    return "seed" in param.lower()


def _candidate_params(runs: pd.DataFrame) -> list[str]:
    """The dotted params that may be axes: not a seed, the task, a trial axis or an identity param."""
    skip = ("task", *CONFIG_AXES, *IDENTITY_PARAMS)
    return [c for c in runs.columns if c.startswith("params.") and not _is_seed_like(c)
            and c[len("params."):] not in skip]


def varying_params(runs: pd.DataFrame, group_cols: list[str]) -> list[str]:
    """Dotted params (`params.x.y`) that are real axes within `group_cols` groups: they take several values
    in a group. Where a group holds several seeds, a value must also repeat in it (the seeds of one config
    share it): a value unique to every run there, like a path, is per run, not an axis. Where a group holds
    one seed, each run is a config of its own, so every param that varies is an axis (two single-seed
    configs must not be averaged as if they were seeds)."""
    cands = [c for c in _candidate_params(runs) if c not in group_cols]  # a group column cannot vary in its group
    if not cands or runs.empty:
        return []
    g = runs[[*group_cols, *cands]].fillna("").groupby(group_cols, dropna=False)
    nunique, size = g.nunique(), g.size()
    one_seed = (runs.groupby(group_cols, dropna=False).seed.nunique() <= 1 if "seed" in runs.columns
                else pd.Series(False, index=size.index))
    out = []
    for c in cands:
        varies = nunique[c] > 1
        if (varies & ((nunique[c] < size) | one_seed)).any():
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


def run_scores(data: ReportData, metric: str = "score", value: str = "best") -> pd.DataFrame:
    """One row per run with `value` = the run's best (or final: last) dev value of `metric` (x1, as logged)."""
    if value not in ("best", "final"):
        raise ValueError(f"value must be 'best' or 'final', not {value!r}")
    runs = data.runs.copy()
    if metric == "score":
        runs["value"] = runs[f"{value}_score"]
        return runs
    h = data.key_history(f"dev/{metric}").sort_values("step").groupby("run_id").value
    best = (h.max() if value == "best" else h.last()).rename("value")
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


TEACHER, MAJORITY = "teacher", "majority class"
READ_TABLE = ("How to read: best dev score of each run, mean ± std over seeds (x100), (n) = number of seeds, no "
              "std where n = 1; bold = best student per column; † = at or below the majority-class level "
              "(the score of always predicting the most frequent dev label); the teacher and majority-class "
              "rows are references (teacher: the final dev score of the teacher model the students were "
              "distilled from).")
READ_FINAL_TABLE = ("How to read: last dev score of each run (its final evaluation, not its best), mean ± std over "
                    "seeds (x100), (n) = number of seeds, no std where n = 1; bold = best student per column; † = "
                    "at or below the majority-class level (the score of always predicting the most frequent dev "
                    "label); the teacher and majority-class reference rows are in the best-score table only.")
READ_DIFF = ("How to read: mean per-seed difference to {baseline} (x100) with its 95% confidence interval (t "
             "distribution, paired by seed where both rows ran the same seeds, Welch otherwise); * = the "
             "interval excludes 0, so the difference is larger than the seed-to-seed noise; no interval "
             "below 2 seeds.")


def _cell(mean: float, std: float, n: int, pm: str, flag: bool) -> str:
    text = f"{mean:.1f}" if n < 2 or pd.isna(std) else f"{mean:.1f}{pm}{std:.1f}"
    return f"{text} ({n}){' †' if flag else ''}"


def _diff_cell(r: dict, minus: str) -> str:
    if pd.isna(r["diff"]):
        return NA
    sign = lambda v: f"{v:+.1f}".replace("-", minus)  # noqa: E731
    if pd.isna(r["low"]):
        return f"{sign(r['diff'])} ({int(r['pairs'])})"
    star = "*" if r["significant"] else ""
    return f"{sign(r['diff'])}{star} [{sign(r['low'])}, {sign(r['high'])}] ({int(r['pairs'])})"


@dataclass
class AccuracyTable:
    """Numbers of the table (x100). `stats` is long: row keys, task (or 'avg'), mean, std, n, bold, flag
    (at or below the majority level), n_configs. `references`: label (teacher / majority class), task, mean,
    std, n. `diffs`: row keys, task, diff, low, high, pairs, paired, significant (vs `baseline`)."""

    rows: list[str]
    tasks: list[str]
    stats: pd.DataFrame
    caption: str = ""
    references: pd.DataFrame | None = None
    diffs: pd.DataFrame | None = None
    baseline: str | None = None
    value: str = "best"  # each run's best dev value, or its final (last) one

    @property
    def how_to_read(self) -> str:
        """The 'How to read' line under the table: READ_TABLE, or READ_FINAL_TABLE for final values."""
        return READ_FINAL_TABLE if self.value == "final" else READ_TABLE

    # -------------------------------------------------------------------------------- display frames
    def _keys(self, frame: pd.DataFrame) -> list[tuple]:
        shown = frame[self.rows].replace("", NA).astype(str)
        return list(zip(*(shown[c] for c in self.rows)))

    def row_index(self) -> pd.MultiIndex:
        keys = self.stats[self.rows].drop_duplicates()
        keys = keys.iloc[sorted(range(len(keys)), key=lambda i: tuple(
            sort_key(c)(keys[c].iloc[i]) for c in self.rows))]
        return pd.MultiIndex.from_frame(keys.replace("", NA).astype(str),
                                        names=[axis_label(c) for c in self.rows])

    def columns(self) -> list[str]:
        return self.tasks + ([AVG] if len(self.tasks) > 1 else [])

    def _labels(self) -> list[str]:
        return [TASK_LABELS.get(t, t) if t != AVG else "Avg" for t in self.columns()]

    def frames(self, pm: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(cell text, bold mask): the row axes as columns, then one column per task (+ Avg); the teacher
        row first and the majority-class row last when known. `pm` joins mean and std."""
        cells = {(k, t): r for k, t, r in zip(self._keys(self.stats), self.stats.task,
                                              self.stats.to_dict("records"))}
        refs = self.references if self.references is not None else pd.DataFrame(columns=["label", "task"])
        text, bold = [], []

        def add_reference(label: str) -> None:
            got = {r["task"]: r for r in refs[refs.label == label].to_dict("records")}
            if got:
                head = [label] + [""] * (len(self.rows) - 1)
                text.append(head + [NA if t not in got else _cell(got[t]["mean"], got[t]["std"], got[t]["n"], pm,
                                                                    False) for t in self.columns()])
                bold.append([False] * (len(head) + len(self.columns())))

        add_reference(TEACHER)
        for row in self.row_index():
            row = row if isinstance(row, tuple) else (row,)
            trow, brow = list(row), [False] * len(row)
            for t in self.columns():
                c = cells.get((row, t))
                trow.append(NA if c is None else _cell(c["mean"], c["std"], int(c["n"]), pm, bool(c["flag"])))
                brow.append(c is not None and bool(c["bold"]))
            text.append(trow)
            bold.append(brow)
        add_reference(MAJORITY)
        columns = [axis_label(c) for c in self.rows] + self._labels()
        return pd.DataFrame(text, columns=columns), pd.DataFrame(bold, columns=columns)

    def diff_frame(self, minus: str = "−") -> pd.DataFrame | None:
        """The difference of each row to the baseline per task (see READ_DIFF), or None without a baseline."""
        if self.diffs is None or self.diffs.empty:
            return None
        cells = {(k, t): r for k, t, r in zip(self._keys(self.diffs), self.diffs.task, self.diffs.to_dict("records"))}
        out = []
        for row in self.row_index():
            row = row if isinstance(row, tuple) else (row,)
            if any((row, t) in cells for t in self.tasks):
                out.append([*row, *[_diff_cell(cells[(row, t)], minus) if (row, t) in cells else NA
                                    for t in self.tasks]])
        columns = [axis_label(c) for c in self.rows] + [TASK_LABELS.get(t, t) for t in self.tasks]
        return pd.DataFrame(out, columns=columns) if out else None

    # ------------------------------------------------------------------------------------- formats
    def to_html(self) -> str:
        text, bold = self.frames(" ± ")
        styler = text.style.apply(lambda _: np.where(bold, "font-weight: bold", ""), axis=None).hide(axis="index")
        styler = styler.format(escape="html").format_index(escape="html", axis=1)
        styler = styler.set_table_attributes('class="kdp-table"')
        if self.caption:
            styler = styler.set_caption(self.caption)
        out = styler.to_html() + f'<p class="howto">{self.how_to_read}</p>'
        diff = self.diff_frame()
        if diff is not None:
            out += (f'<h4>Difference to {html.escape(self.baseline or "")}</h4>'
                    + diff.style.hide(axis="index").format(escape="html").format_index(escape="html", axis=1)
                    .set_table_attributes('class="kdp-table kdp-diff"').to_html()
                    + f'<p class="howto">{html.escape(READ_DIFF.format(baseline=self.baseline))}</p>')
        return out

    def to_latex(self) -> str:
        text, bold = self.frames(r" $\pm$ ")
        text = text.map(lambda cell: cell.replace("†", r"$\dagger$"))  # plain str.replace: no regex template
        styler = text.style.apply(lambda _: np.where(bold, "textbf:--rwrap;", ""), axis=None).hide(axis="index")
        labels = [axis_label(c) for c in self.rows]
        styler = styler.format(escape="latex", subset=labels).format_index(escape="latex", axis=1)
        column_format = "l" * len(self.rows) + "c" * (len(text.columns) - len(self.rows))
        caption = (self.caption + " " if self.caption else "") + self.how_to_read.replace("±", r"$\pm$").replace(
            "†", r"$\dagger$")
        return styler.to_latex(hrules=True, column_format=column_format, caption=caption,
                               position_float="centering", environment="table")

    def to_markdown(self) -> str:
        text, bold = self.frames(" ± ")
        shown = text.mask(bold, "**" + text + "**")
        out = shown.to_markdown(index=False) + "\n\n" + self.how_to_read
        diff = self.diff_frame("-")
        if diff is not None:
            out += (f"\n\nDifference to {self.baseline}:\n\n" + diff.to_markdown(index=False) + "\n\n"
                    + READ_DIFF.format(baseline=self.baseline))
        return out

    def to_csv(self) -> str:
        s = self.stats[[*self.rows, "task", "mean", "std", "n", "bold", "flag", "n_configs"]]
        if self.diffs is not None and not self.diffs.empty:
            d = self.diffs[[*self.rows, "task", "diff", "low", "high", "pairs", "paired", "significant"]]
            s = s.merge(d.rename(columns={"diff": f"diff_vs_{self.baseline}"}), on=[*self.rows, "task"], how="left")
        return s.to_csv(index=False, float_format="%.6g")


def _reference_rows(data: ReportData, tasks: list[str]) -> pd.DataFrame:
    """The teacher (mean over teacher runs of their final dev score) and the majority-class level, x100.
    Final, not best: the fine-tune publishes its last model, and that is the teacher the students learn from."""
    rows = []
    t = data.teachers[data.teachers.task.isin(tasks)]
    for task, g in t.groupby("task"):
        pct = g.final_score * 100
        rows.append((TEACHER, task, pct.mean(), pct.std(), len(pct)))
    rows += [(MAJORITY, task, level * 100, np.nan, 1) for task, level in data.majority.items() if task in tasks]
    return pd.DataFrame(rows, columns=["label", "task", "mean", "std", "n"])


def baseline_differences(scores: pd.DataFrame, rows: list[str], baseline: str) -> pd.DataFrame:
    """Per (row, task): the seed difference of the row's runs to the baseline method's runs (x100). When
    several rows hold the baseline method, the one with the best mean on that task is the baseline."""
    out = []
    for task, runs in scores.groupby("task"):
        base = runs[runs.method == baseline]
        if base.empty:
            continue
        best_key = base.groupby(rows).pct.mean().idxmax()
        best_key = best_key if isinstance(best_key, tuple) else (best_key,)
        base = base[(base[rows] == list(best_key)).all(axis=1)]
        base_values = dict(zip(base.seed, base.pct))
        for key, g in runs.groupby(rows):
            key = key if isinstance(key, tuple) else (key,)
            if key == best_key:
                continue
            d = seed_difference(dict(zip(g.seed, g.pct)), base_values)
            out.append((*key, task, d.diff, d.low, d.high, d.n, d.paired, d.excludes_zero))
    return pd.DataFrame(out, columns=[*rows, "task", "diff", "low", "high", "pairs", "paired", "significant"])


def accuracy_table(data: ReportData, rows: list[str] | None = None, metric: str = "score",
                   select: str = "best", caption: str = "", value: str = "best",
                   baseline: str | None = "kd") -> AccuracyTable:
    """Aggregate best (or final) dev values over seeds into the paper table (see module doc)."""
    scores = run_scores(data, metric, value)
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
    stats = _with_average(stats, rows, tasks)
    majority = {t: v * 100 for t, v in data.majority.items()} if metric == "score" else {}
    level = stats.task.map(majority)
    stats["flag"] = (stats["mean"].map(_shown) <= level.map(_shown, na_action="ignore")).fillna(False).astype(bool)
    shown = stats["mean"].map(_shown).where(~stats.flag)
    stats["bold"] = (shown == shown.groupby(stats.task).transform("max")) & ~stats.flag
    stats["n"] = stats["n"].astype("int64")
    order = [*tasks, AVG]
    keys = [stats[c].map(sort_key(c)) for c in rows] + [stats.task.map(order.index)]
    stats = stats.iloc[sorted(range(len(stats)), key=lambda i: tuple(k.iloc[i] for k in keys))]
    diffs = None
    if baseline and "method" in rows and (scores.method == baseline).any():
        diffs = baseline_differences(scores, rows, baseline)
    refs = _reference_rows(data, tasks) if metric == "score" and value == "best" else None
    return AccuracyTable(rows, tasks, stats.reset_index(drop=True), caption, refs, diffs,
                         baseline if diffs is not None else None, value)


def _with_average(stats: pd.DataFrame, rows: list[str], tasks: list[str]) -> pd.DataFrame:
    """Add the Avg column: mean of the row's task means, only for rows that cover every task."""
    if len(tasks) < 2:
        return stats
    per_row = stats.groupby(rows, dropna=False)
    avg = per_row["mean"].mean().reset_index()
    full = per_row.task.nunique().reset_index(drop=True) == len(tasks)
    avg = avg[full.to_numpy()]
    avg["task"], avg["std"], avg["n"] = AVG, np.nan, per_row.n.min().reset_index(drop=True)[full].to_numpy()
    avg["n_configs"] = 1
    return pd.concat([stats, avg], ignore_index=True)
