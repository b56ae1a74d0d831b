"""Plotly figures of a report: overfitting curves and gaps, bit-width trade-offs, sweep overviews.

Every builder takes a `ReportData` and returns a list of `Figure` (a file stem, a title, the plotly figure);
it raises `NoData` with a reason when the runs hold nothing it can draw (the page then says so). Curves and
points are means over seeds; bands and error bars are one standard deviation. Scores are drawn x100.

Where a group (by default: a method) still covers several configs, the config with the best mean best dev
score on that task is drawn (as in the table), and its settings are shown in the hover text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kdplatform.report.collect import (CONFIG_AXES, QAT_METHODS, STAGE_KEY, TASK_LABELS, ReportData,
                                       sort_key, tasks_in)
from kdplatform.report.stages import ILD, PRED, STAGE_LABELS, prediction_aligned, staged_history
from kdplatform.report.tables import axis_label, config_columns, select_best_configs

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#843c39", "#7b4173", "#3182bd")
WIDTH, HEIGHT = 900, 520
AXIS_PREFIX = {"layer_map": "map=", "consistency_weight": "w=", "bits": "W", "act_bits": "A",
               "map_coeff": "m=", "output_coeff": "o="}


class NoData(Exception):
    """Nothing to draw for this figure kind in these runs (the reason is shown in the report)."""


@dataclass
class Figure:
    name: str  # file stem, unique within a report
    title: str
    fig: go.Figure
    files: list[tuple[str, str]] = field(default_factory=list)  # exported images: (label, relative path)


def _layout(fig: go.Figure, title: str, xaxis: str, yaxis: str, **kw) -> go.Figure:
    fig.update_layout(title=title, template="plotly_white", width=WIDTH, height=HEIGHT,
                      xaxis_title=xaxis, yaxis_title=yaxis, legend_title_text="", **kw)
    return fig


def group_label(values: dict[str, str], group_by: list[str]) -> str:
    parts = []
    for c in group_by:
        v = str(values[c])
        if v == "":
            continue
        prefix = AXIS_PREFIX.get(c, "" if c == "method" else f"{axis_label(c)}=")
        parts.append(f"{prefix}{v}")
    return " ".join(parts) or "all"


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"


def _config_text(row: dict, configs: list[str], group_by: list[str]) -> str:
    extra = [f"{axis_label(c)}={row[c]}" for c in configs if c not in group_by and str(row[c]) != ""]
    return ", ".join(extra)


def selected_runs(data: ReportData, task: str, group_by: list[str]) -> pd.DataFrame:
    """Runs of `task`, one config per group (the best mean best dev score), with a `group` label column."""
    runs = data.runs[data.runs.task == task].copy()
    if runs.empty:
        raise NoData(f"no runs of {task}")
    runs["value"] = runs["best_score"]
    key = ("config_columns", tuple(group_by))
    if key not in data.cache:
        data.cache[key] = config_columns(data.runs, group_by)
    configs = data.cache[key]
    runs = select_best_configs(runs, group_by, configs)
    runs["group"] = [group_label(r, group_by) for r in runs[group_by].to_dict("records")]
    runs["config"] = [_config_text(r, configs, group_by) for r in runs[configs].to_dict("records")]
    order = sorted(runs[group_by].drop_duplicates().to_dict("records"),
                   key=lambda r: tuple(sort_key(c)(r[c]) for c in group_by))
    labels = [group_label(r, group_by) for r in order]
    runs["group_order"] = runs.group.map(labels.index)
    return runs.sort_values(["group_order", "seed"])


def _history(data: ReportData, key: str, runs: pd.DataFrame) -> pd.DataFrame:
    return data.key_history(key).merge(runs[["run_id", "group", "group_order", "config"]], on="run_id")


def _mean_band(h: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and seed count per (group, step)."""
    return h.groupby(["group_order", "group", "step"]).value.agg(mean="mean", std="std", n="size").reset_index()


def _band_trace(x, mean, std, colour: str, group: str) -> go.Scatter:
    std = np.nan_to_num(np.asarray(std, dtype=float))
    upper, lower = np.asarray(mean) + std, np.asarray(mean) - std
    return go.Scatter(x=list(x) + list(x)[::-1], y=list(upper) + list(lower)[::-1], fill="toself", mode="lines",
                      fillcolor=_rgba(colour, 0.12), line={"width": 0}, hoverinfo="skip", showlegend=False,
                      legendgroup=group, meta={"group": group, "kind": "band"})


def error_array(std: pd.Series, n: pd.Series) -> list:
    """Error bar lengths: the std where at least 2 seeds were averaged, none (null) where n = 1."""
    return [float(s) if k > 1 and pd.notna(s) else None for s, k in zip(std, n)]


def _reference_lines(fig: go.Figure, data: ReportData, task: str, x_range: tuple[float, float]) -> None:
    """Teacher dev score (the final one of each teacher run: its last model is the one distilled) and the
    majority-class level as horizontal lines (x100)."""
    t = data.teachers[data.teachers.task == task]
    for i, r in enumerate(t.itertuples()):
        name = "teacher (dev)" if len(t) == 1 else f"teacher {r.teacher_hash[:8]} (dev)"
        fig.add_trace(go.Scatter(x=list(x_range), y=[r.final_score * 100] * 2, mode="lines", name=name,
                                 line={"color": "#000000", "dash": "dashdot", "width": 2},
                                 hovertemplate=f"{name}: %{{y:.2f}}<extra></extra>",
                                 meta={"kind": "teacher", "run_id": r.run_id}))
    level = data.majority.get(task)
    if level is not None:
        fig.add_trace(go.Scatter(x=list(x_range), y=[level * 100] * 2, mode="lines", name="majority class",
                                 line={"color": "#888888", "dash": "dot", "width": 2},
                                 hovertemplate="majority class: %{y:.2f}<extra></extra>", meta={"kind": "majority"}))


WHOLE_RUN_X = "training step (runs shifted so that prediction KD starts at the ILD | prediction KD line)"


def _stage_line(fig: go.Figure, x: float | None) -> None:
    if x is not None:
        fig.add_vline(x=x, line={"color": "#555555", "dash": "dot", "width": 1.5},
                      annotation_text="ILD | prediction KD", annotation_position="top right",
                      annotation_font_size=11)


def _aligned_history(data: ReportData, key: str, runs: pd.DataFrame, aligned: pd.DataFrame) -> pd.DataFrame:
    """`key`'s history with step = the prediction-aligned x (the global step where a point has no stage)."""
    h = _history(data, key, runs).merge(aligned, on=["run_id", "step"], how="left")
    return h.assign(step=h.x.fillna(h.step)).drop(columns="x")


def train_dev_curves(data: ReportData, task: str, train_key: str, dev_key: str, group_by: list[str],
                     scale: float, ytitle: str, name: str, title: str, kind: str | None = None,
                     references: bool = False) -> Figure:
    """Train (dashed) and dev (solid) curves per group, mean over seeds with a std band where n > 1.
    kind=None: the whole run, every run shifted so that its prediction stage starts at the one boundary
    drawn; kind='ild'/'pred': only that stage's points, against the step within the stage. references: add the teacher and majority-class lines."""
    runs = selected_runs(data, task, group_by)
    if kind is not None:
        # unique() first: pandas' isin on arrow strings converts every value it is given one by one
        runs = runs[runs.run_id.isin(staged_history(data, STAGE_KEY, kind).run_id.unique())]
    traces: list = []  # added at once: plotly re-validates the figure on every add_trace
    configs = dict(zip(runs.group, runs.config))
    drawn, xs = 0, []
    aligned, boundary = prediction_aligned(data, runs.run_id) if kind is None else (None, None)
    for split, key, dash in (("train", train_key, "dash"), ("dev", dev_key, "solid")):
        if kind is None:
            h = _aligned_history(data, key, runs, aligned)
        else:
            h = staged_history(data, key, kind)[["run_id", "stage_step", "value"]].rename(columns={"stage_step": "step"})
            h = h.merge(runs[["run_id", "group", "group_order", "config"]], on="run_id")
        stats = _mean_band(h)
        for (order, group), s in stats.groupby(["group_order", "group"], sort=True):
            colour = PALETTE[order % len(PALETTE)]
            mean, std = s["mean"] * scale, s["std"] * scale
            if (s.n > 1).any():
                traces.append(_band_trace(s.step, mean, std, colour, group))
            config = configs[group]
            traces.append(go.Scatter(
                x=s.step, y=mean, mode="lines+markers", name=f"{group} ({split})", legendgroup=group,
                line={"color": colour, "dash": dash}, marker={"size": 4, "color": colour},
                customdata=np.stack([std.fillna(0), s.n], axis=-1),
                hovertemplate=f"{group} {split}{' (' + config + ')' if config else ''}<br>step %{{x}}: "
                              "%{y:.2f} ± %{customdata[0]:.2f} (%{customdata[1]} seeds)<extra></extra>",
                meta={"group": group, "split": split, "key": key}))
            xs += [s.step.min(), s.step.max()]
            drawn += 1
    if not drawn:
        raise NoData(f"no {dev_key} / {train_key} history for {task}")
    fig = go.Figure(data=traces)
    if references:
        _reference_lines(fig, data, task, (min(xs), max(xs)))
    if kind is None:
        _stage_line(fig, boundary)
    _layout(fig, title, WHOLE_RUN_X if kind is None else f"step within the {STAGE_LABELS[kind]}", ytitle)
    return Figure(name, title, fig)


def score_curves(data: ReportData, group_by: list[str], metric: str = "score") -> list[Figure]:
    """Per task: train and dev `metric` against the training step, per group (dashed = train), with the
    teacher and majority-class lines (score only) and the stage boundaries."""
    out = []
    for task in tasks_in(data.runs):
        try:
            out.append(train_dev_curves(
                data, task, f"train/{metric}", f"dev/{metric}", group_by, 100.0, f"{metric} (x100)",
                f"curves-{metric}-{task}", f"{TASK_LABELS.get(task, task)}: train vs dev {metric} (whole run)",
                references=metric == "score"))
        except NoData:
            continue
    if not out:
        raise NoData(f"no train/{metric} and dev/{metric} histories")
    return out


def distill_loss_curves(data: ReportData, group_by: list[str]) -> list[Figure]:
    """Per task: the distillation loss on the train subset and on dev against the step (dashed = train).
    The loss changes meaning at a stage boundary (ILD loss, then KD loss): the boundary is marked."""
    out = []
    for task in tasks_in(data.runs):
        try:
            out.append(train_dev_curves(
                data, task, "train/distill_loss", "dev/distill_loss", group_by, 1.0, "distillation loss",
                f"distill-loss-{task}", f"{TASK_LABELS.get(task, task)}: distillation loss, train vs dev "
                                        f"(whole run)"))
        except NoData:
            continue
    if not out:
        raise NoData("no train/distill_loss and dev/distill_loss histories")
    return out


# What each stage is trained on: (train key, dev key, scale, axis title, file stem, title) per figure.
STAGE_OBJECTIVES = {
    ILD: [("train/distill_loss", "dev/distill_loss", 1.0, "ILD loss", "ild-loss",
           "ILD stage: ILD loss, train vs dev")],
    PRED: [("train/score", "dev/score", 100.0, "score (x100)", "pred-score",
            "prediction stage: score, train vs dev"),
           ("train/distill_loss", "dev/distill_loss", 1.0, "KD loss", "pred-kd-loss",
            "prediction stage: KD loss, train vs dev")],
}


def stage_curves(data: ReportData, group_by: list[str]) -> list[Figure]:
    """Per task and stage: the stage's own objective on train vs dev against the step within the stage;
    the ILD loss during ILD is a figure of its own (the overfitting of intermediate layers)."""
    out = []
    for task in tasks_in(data.runs):
        for kind, figs in STAGE_OBJECTIVES.items():
            for train_key, dev_key, scale, ytitle, stem, title in figs:
                try:
                    out.append(train_dev_curves(
                        data, task, train_key, dev_key, group_by, scale, ytitle, f"{stem}-{task}",
                        f"{TASK_LABELS.get(task, task)}, {title}", kind=kind, references=dev_key == "dev/score"))
                except NoData:
                    continue
    if not out:
        raise NoData("no stage history (metric `stage`) with train and dev values")
    return out


def final_gaps(data: ReportData, runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Each run's gap at the end of training: the last `gap/<metric>` point (or train - dev at the last
    step both were logged). Columns: run_id, gap."""
    g = data.key_history(f"gap/{metric}")
    gap = g[g.run_id.isin(runs.run_id)].sort_values("step").groupby("run_id").value.last()
    missing = runs.run_id[~runs.run_id.isin(gap.index)]
    if len(missing):
        tr = data.key_history(f"train/{metric}")
        tr = tr[tr.run_id.isin(missing)]
        dv = data.key_history(f"dev/{metric}")
        dv = dv[dv.run_id.isin(missing)]
        both = tr.merge(dv, on=["run_id", "step"], suffixes=("_train", "_dev")).sort_values("step")
        last = both.groupby("run_id").last()
        sign = -1.0 if metric == "distill_loss" else 1.0  # loss gap = dev - train, score gap = train - dev
        gap = pd.concat([gap, sign * (last.value_train - last.value_dev)])
    return gap.rename("gap").reset_index().rename(columns={"index": "run_id"})


def _gap_bar_figure(g: pd.DataFrame, x_col: str, x_order: list[str], title: str, ytitle: str, name: str) -> Figure:
    """Bars of `g` (run_id, group, group_order, gap, x_col): mean over seeds per x and group, std error
    bars only where at least 2 seeds were averaged."""
    stats = g.groupby(["group_order", "group", x_col]).gap.agg(mean="mean", std="std", n="size").reset_index()
    fig = go.Figure()
    for (order, group), s in stats.groupby(["group_order", "group"], sort=True):
        s = s.sort_values(x_col, key=lambda t: t.map(x_order.index))
        fig.add_trace(go.Bar(x=list(s[x_col]), y=s["mean"], name=group,
                             error_y={"type": "data", "array": error_array(s["std"], s.n)},
                             marker_color=PALETTE[order % len(PALETTE)], customdata=s.n,
                             hovertemplate=f"{group}: %{{y:.2f}} (%{{customdata}} seeds)<extra></extra>",
                             meta={"group": group, "x": list(s[x_col])}))
    _layout(fig, title, "", ytitle, barmode="group")
    fig.update_xaxes(categoryorder="array", categoryarray=x_order)
    return Figure(name, title, fig)


def _runs_per_task(data: ReportData, group_by: list[str]):
    """The selected runs of each task that has any (tasks without data are skipped, not an error)."""
    for task in tasks_in(data.runs):
        try:
            yield selected_runs(data, task, group_by)
        except NoData:
            continue


def gap_bars(data: ReportData, group_by: list[str], metric: str = "score") -> list[Figure]:
    """The gap at the end of training per task (x) and group (bars): train - dev score (x100), or
    dev - train distillation loss; mean over seeds with std error bars (none where n = 1)."""
    scale = 100.0 if metric != "distill_loss" else 1.0
    rows = []
    for runs in _runs_per_task(data, group_by):
        g = final_gaps(data, runs, metric).merge(runs[["run_id", "group", "group_order", "task"]], on="run_id")
        rows.append(g)
    if not rows or all(r.empty for r in rows):
        raise NoData(f"no gap/{metric} (or train/dev {metric}) histories")
    g = pd.concat(rows, ignore_index=True)
    g["gap"] *= scale
    g["label"] = g.task.map(lambda t: TASK_LABELS.get(t, t))
    order = [TASK_LABELS.get(t, t) for t in tasks_in(g)]
    what = "train - dev score (x100)" if metric == "score" else \
        "dev - train distillation loss" if metric == "distill_loss" else f"train - dev {metric} (x100)"
    title = f"Gap at the end of training: {what}"
    return [_gap_bar_figure(g, "label", order, title, what, f"final-gap-{metric.replace('_', '-')}")]


# The gap of each stage's own objective: (stage kind, gap key, scale, axis title).
STAGE_GAPS = ((ILD, "gap/distill_loss", 1.0, "ILD loss: dev - train"),
              (PRED, "gap/score", 100.0, "score: train - dev (x100)"),
              (PRED, "gap/distill_loss", 1.0, "KD loss: dev - train"))


def stage_gap_bars(data: ReportData, group_by: list[str]) -> list[Figure]:
    """Per stage objective: the gap at the last evaluation of the stage, per task (x) and group (bars)."""
    out = []
    for kind, key, scale, what in STAGE_GAPS:
        rows = []
        for runs in _runs_per_task(data, group_by):
            h = staged_history(data, key, kind)
            last = h[h.run_id.isin(runs.run_id)].sort_values("step").groupby("run_id").value.last()
            g = last.rename("gap").reset_index().merge(runs[["run_id", "group", "group_order", "task"]], on="run_id")
            rows.append(g)
        g = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
        if g.empty:
            continue
        g["gap"] *= scale
        g["label"] = g.task.map(lambda t: TASK_LABELS.get(t, t))
        order = [TASK_LABELS.get(t, t) for t in tasks_in(g)]
        title = f"Gap at the end of the {STAGE_LABELS[kind]}: {what}"
        out.append(_gap_bar_figure(g, "label", order, title, what, f"stage-gap-{kind}-{key.split('/')[1]}"))
    if not out:
        raise NoData("no gap history with a stage (metric `stage`)")
    return out


def bits_figures(data: ReportData, x: str = "bits") -> list[Figure]:
    """Per task: best dev score (x100) against weight bits (x='bits') or model size in MB (x='size') for
    each QAT method (and any method run at several bit widths)."""
    runs = data.runs
    multi_bits = runs.groupby("method").bits.nunique()
    methods = set(QAT_METHODS) | set(multi_bits[multi_bits > 1].index)
    q = runs[runs.method.isin(methods) & (runs.bits != "")]
    if q.empty:
        raise NoData("no quantized (QAT) runs")
    size_col = "metrics.model/size_mb"
    if x == "size" and (size_col not in q.columns or q[size_col].isna().all()):
        raise NoData("no run logged model/size_mb")
    out = []
    sub = data.subset(data.runs.run_id.isin(q.run_id))
    for task in tasks_in(q):
        try:
            sel = selected_runs(sub, task, ["method", "bits"])
        except NoData:
            continue
        sel["bits_n"] = pd.to_numeric(sel.bits, errors="coerce")
        sel["size"] = sel[size_col] if size_col in sel.columns else np.nan
        sel["pct"] = sel.best_score * 100
        stats = sel.groupby(["method", "bits_n"]).agg(mean=("pct", "mean"), std=("pct", "std"),
                                                      n=("pct", "size"), size=("size", "mean")).reset_index()
        if x == "size":
            stats = stats.dropna(subset=["size"])
        fig = go.Figure()
        for i, (method, s) in enumerate(sorted(stats.groupby("method"), key=lambda m: sort_key("method")(m[0]))):
            s = s.sort_values("bits_n")
            xs = s.bits_n if x == "bits" else s["size"]
            fig.add_trace(go.Scatter(
                x=xs, y=s["mean"], mode="lines+markers", name=method,
                error_y={"type": "data", "array": error_array(s["std"], s.n)},
                line={"color": PALETTE[i % len(PALETTE)]}, marker={"color": PALETTE[i % len(PALETTE)]},
                customdata=np.stack([s.bits_n, s.n], axis=-1),
                hovertemplate=f"{method} W%{{customdata[0]}}: %{{y:.1f}} (%{{customdata[1]}} seeds)<extra></extra>",
                meta={"group": method}))
        if not fig.data:
            continue
        label = TASK_LABELS.get(task, task)
        if x == "bits":
            title = f"{label}: dev score against weight bits"
            _layout(fig, title, "weight bits", "best dev score (x100)")
            ticks = sorted(stats.bits_n.dropna().unique())
            fig.update_xaxes(type="log", tickvals=ticks, ticktext=[str(int(t)) for t in ticks])
        else:
            title = f"{label}: dev score against model size"
            _layout(fig, title, "model size (MB)", "best dev score (x100)")
        out.append(Figure(f"{'bits' if x == 'bits' else 'size'}-{task}", title, fig))
    if not out:
        raise NoData("no quantized runs with dev scores")
    return out


def heatmaps(data: ReportData, x: str = "consistency_weight", y: str = "layer_map") -> list[Figure]:
    """Per task and method: mean best dev score (x100) over an x-axis by y-axis grid of two trial axes."""
    cols = {c: c if c in data.runs.columns else f"params.{c}" for c in (x, y)}
    for c in cols.values():
        if c not in data.runs.columns:
            raise NoData(f"no run has the axis {c}")
    runs = data.runs[(data.runs[cols[x]].fillna("") != "") & (data.runs[cols[y]].fillna("") != "")]
    if runs.empty:
        raise NoData(f"no run sets both {x} and {y}")
    out = []
    sub = data.subset(data.runs.run_id.isin(runs.run_id))
    for task in tasks_in(runs):
        sel = selected_runs(sub, task, ["method", cols[x], cols[y]])
        for method, m in sorted(sel.groupby("method"), key=lambda t: sort_key("method")(t[0])):
            if m[cols[x]].nunique() < 2 and m[cols[y]].nunique() < 2:
                continue
            z = (m.assign(pct=m.best_score * 100).groupby([cols[y], cols[x]]).pct.mean().unstack(cols[x]))
            z = z.reindex(index=sorted(z.index, key=sort_key(cols[y])),
                          columns=sorted(z.columns, key=sort_key(cols[x])))
            label = TASK_LABELS.get(task, task)
            title = f"{label}, {method}: best dev score by {axis_label(cols[x])} and {axis_label(cols[y])}"
            fig = go.Figure(go.Heatmap(z=z.to_numpy(), x=[str(v) for v in z.columns],
                                       y=[str(v) for v in z.index], colorscale="Viridis",
                                       texttemplate="%{z:.1f}", colorbar={"title": {"text": "x100"}},
                                       hovertemplate=f"{axis_label(cols[x])}=%{{x}}, {axis_label(cols[y])}="
                                                     "%{y}: %{z:.2f}<extra></extra>"))
            _layout(fig, title, axis_label(cols[x]), axis_label(cols[y]))
            fig.update_xaxes(type="category")
            fig.update_yaxes(type="category")
            out.append(Figure(f"heatmap-{task}-{method}", title, fig))
    if not out:
        raise NoData(f"no method varies {x} or {y}")
    return out


def _numeric(values: pd.Series) -> pd.Series | None:
    num = pd.to_numeric(values.replace("", np.nan), errors="coerce")
    return num if num.notna().all() else None


def parallel_coordinates(data: ReportData) -> list[Figure]:
    """Per task: every axis that varies (trial axes, dotted grid axes, Optuna-searched params) against the
    best dev score, one line per run, coloured by the score."""
    out = []
    axes = config_columns(data.runs, ["method"])
    for s in data.search_axes:
        col = s if s in CONFIG_AXES else f"params.{s}"
        if col in data.runs.columns and col not in axes:
            axes.append(col)
    for task in tasks_in(data.runs):
        runs = data.runs[data.runs.task == task]
        dims = []
        for c in axes:
            values = runs[c].fillna("").astype(str).replace("None", "")  # unset params log as "None"
            if values.nunique() < 2:
                continue
            num = _numeric(values)
            if num is not None:
                dims.append({"label": axis_label(c), "values": num.tolist()})
            else:
                cats = sorted(values.unique(), key=sort_key(c))
                codes = values.map({v: i for i, v in enumerate(cats)})
                dims.append({"label": axis_label(c), "values": codes.tolist(), "tickvals": list(range(len(cats))),
                             "ticktext": [v if v else "n/a" for v in cats]})
        if len(runs) < 2 or not dims:
            continue
        score = runs.best_score * 100
        dims.append({"label": "best dev score (x100)", "values": score.tolist()})
        label = TASK_LABELS.get(task, task)
        title = f"{label}: all axes against the best dev score"
        # Range labels (each axis' min/max drawn at its ends) overlap the tick labels and, for categorical
        # axes, show category codes: hidden; the ticks carry the values. Slanted axis titles do not collide.
        fig = go.Figure(go.Parcoords(line={"color": score.tolist(), "colorscale": "Viridis", "showscale": True},
                                     dimensions=dims, labelangle=-20, labelside="top",
                                     rangefont={"size": 1, "color": "rgba(0,0,0,0)"}, tickfont={"size": 11}))
        fig.update_layout(title=title, template="plotly_white", width=WIDTH, height=HEIGHT,
                          margin={"t": 150, "l": 80, "r": 80, "b": 40})
        out.append(Figure(f"parallel-{task}", title, fig))
    if not out:
        raise NoData("no axis varies across runs")
    return out


def param_importance(data: ReportData) -> list[Figure]:
    """Per task: fANOVA importance (Optuna) of the searched params for the best dev score. Only for runs
    of an Optuna search (the sweep run's tag kdp.search = optuna names the searched params)."""
    if not data.search_axes:
        raise NoData("no Optuna search in these runs")
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = []
    for task in tasks_in(data.runs):
        runs = data.runs[data.runs.task == task]
        dists, values = {}, {}
        for name in data.search_axes:
            col = name if name in CONFIG_AXES else f"params.{name}"
            if col not in runs.columns:
                continue
            v = runs[col].fillna("").astype(str)
            if v.nunique() < 2:
                continue
            num = _numeric(v)
            if num is not None:
                lo, hi = float(num.min()), float(num.max())
                dists[name] = FloatDistribution(lo, hi, log=lo > 0 and hi / lo >= 100)
                values[name] = num.astype(float).tolist()
            else:
                dists[name] = CategoricalDistribution(sorted(v.unique()))
                values[name] = v.tolist()
        if not dists or len(runs) < 3:
            continue
        study = optuna.create_study(direction="maximize")
        for i, score in enumerate(runs.best_score.tolist()):
            study.add_trial(optuna.trial.create_trial(
                params={k: values[k][i] for k in dists}, distributions=dists, value=float(score)))
        imp = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        names = list(imp)[::-1]
        label = TASK_LABELS.get(task, task)
        title = f"{label}: parameter importance for the best dev score (fANOVA, {len(runs)} trials)"
        fig = go.Figure(go.Bar(x=[float(imp[n]) for n in names], y=names, orientation="h",
                               marker_color=PALETTE[0], hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
        _layout(fig, title, "importance", "parameter")
        out.append(Figure(f"importance-{task}", title, fig))
    if not out:
        raise NoData("too few Optuna trials with varying searched params")
    return out
