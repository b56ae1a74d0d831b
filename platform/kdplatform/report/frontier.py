"""The accuracy-cost frontier: dev score against measured latency or size on disk (`kdplatform bench`'s
`deploy/<format>/*` metrics), one point per student config (depth x method x bits x ..., mean over seeds,
error bars one std), the Pareto front (no other point is at least as good in both and better in one) drawn
as a line and listed in a table, the teacher's dev score as a reference line.

>>> pareto_front([1.0, 2.0, 3.0, 2.0], [0.5, 0.7, 0.6, 0.7]).tolist()   # cheaper or better, never both worse
[True, True, False, True]
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kdplatform.report.collect import CONFIG_AXES, TASK_LABELS, ReportData, tasks_in
from kdplatform.report.figures import PALETTE, Figure, NoData, _layout, error_array

COSTS = {"latency": ("latency_p50_ms", "batch-1 latency p50 (ms)"), "size": ("size_mb", "size on disk (MB)")}
FORMATS = ("onnx_int8", "onnx_fp32", "torch_fp32")
DEPTH = "params.student_layers"
FRONT_TRACE = "Pareto front"


def pareto_front(costs, scores) -> np.ndarray:
    """Mask of the non-dominated points when cost is minimised and score maximised. One sweep in order of
    increasing cost (higher score first among equal costs): a point is on the front when it beats every
    score before it; an exact duplicate of the last front point is on it too (neither dominates)."""
    c, s = np.asarray(costs, dtype=float), np.asarray(scores, dtype=float)
    front = np.zeros(len(c), dtype=bool)
    best_cost, best_score = np.nan, -np.inf
    for i in np.lexsort((-s, c)):
        if s[i] > best_score or (s[i] == best_score and c[i] == best_cost):
            front[i] = True
            best_cost, best_score = c[i], s[i]
    return front


def config_points(data: ReportData, task: str, x: str, fmt: str) -> pd.DataFrame:
    """One row per student config of `task` with at least one benched run: `label`, `depth`, `bits`, the
    config axes, score mean/std over every seed (x100, `n` seeds), cost mean/std over its benched runs
    (`benched`), and `front` (on the Pareto front). Size and latency are the architecture's, not the seed's,
    so benching one seed of a config prices all of them."""
    key = f"metrics.deploy/{fmt}/{COSTS[x][0]}"
    runs = data.runs[data.runs.task == task].copy()
    if key not in runs.columns or runs[key].isna().all():
        raise NoData(f"no run of {task} has {key[len('metrics.'):]}: run `kdplatform bench RUN_ID...` first")
    runs["depth"] = runs[DEPTH].fillna("") if DEPTH in runs.columns else ""
    runs["pct"], runs["cost"] = runs.best_score * 100, runs[key]
    axes = ["depth", *CONFIG_AXES]
    pts = runs.groupby(axes, dropna=False).agg(score=("pct", "mean"), score_std=("pct", "std"), n=("pct", "size"),
                                               cost=("cost", "mean"), cost_std=("cost", "std"),
                                               benched=("cost", "count")).reset_index()
    pts = pts[pts.benched > 0].copy()
    pts["label"] = [_label(r) for r in pts.to_dict("records")]
    pts["front"] = pareto_front(pts.cost, pts.score)
    return pts.sort_values("cost").reset_index(drop=True)


def _label(r: dict) -> str:
    depth = f"L{r['depth']} " if r["depth"] else ""
    acts = f"A{r['act_bits']}" if r["act_bits"] not in ("", "32") else ""
    extra = " ".join(f"{a}={r[a]}" for a in ("layer_map", "consistency_weight", "map_coeff", "output_coeff")
                     if r[a] not in ("", None))
    return f"{depth}{r['method']} W{r['bits']}{acts}" + (f" {extra}" if extra else "")


def _teacher_score(data: ReportData, task: str) -> float | None:
    t = data.teachers[data.teachers.task == task]
    return float(t.final_score.mean() * 100) if not t.empty else None


def frontier_figures(data: ReportData, x: str = "latency", fmt: str = "onnx_int8") -> list[Figure]:
    """Per task: every config's dev score against its cost, points coloured by weight bits, the front drawn."""
    out = []
    for task in tasks_in(data.runs):
        try:
            pts = config_points(data, task, x, fmt)
        except NoData:
            continue
        fig = go.Figure()
        for i, (bits, p) in enumerate(sorted(pts.groupby("bits"), key=lambda g: -_num(g[0]))):
            fig.add_trace(go.Scatter(
                x=p.cost, y=p.score, mode="markers+text", name=f"W{bits}", text=[f"L{d}" if d else "" for d in p.depth],
                textposition="top center", marker={"size": 10, "color": PALETTE[i % len(PALETTE)]},
                error_y={"type": "data", "array": error_array(p.score_std, p.n)},
                error_x={"type": "data", "array": error_array(p.cost_std, p.benched)},
                customdata=np.stack([p.label, p.n], axis=-1),
                hovertemplate="%{customdata[0]}: %{y:.1f} at %{x:.3g} (%{customdata[1]} seeds)<extra></extra>"))
        front = pts[pts.front].sort_values(["cost", "score"])
        fig.add_trace(go.Scatter(x=front.cost, y=front.score, mode="lines", name=FRONT_TRACE, line_shape="hv",
                                 line={"color": "#444", "dash": "dot"}, hoverinfo="skip"))
        teacher = _teacher_score(data, task)
        if teacher is not None:
            fig.add_hline(y=teacher, line_dash="dash", line_color="#999", annotation_text="teacher",
                          annotation_position="top left")
        label, what = TASK_LABELS.get(task, task), COSTS[x][1]
        title = f"{label}: dev score against {what} ({fmt.replace('_', ' ')})"
        _layout(fig, title, f"{what}, {fmt.replace('_', ' ')}", "best dev score (x100)")
        out.append(Figure(f"frontier-{x}-{task}", title, fig))
    if not out:
        raise NoData(f"no run has deploy/{fmt}/{COSTS[x][0]}: run `kdplatform bench RUN_ID...` on the students")
    return out


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("inf")


class FrontierTable:
    """The Pareto-front configs of every task (and the teacher's score), in the report's table formats."""

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame

    def to_html(self) -> str:
        return self.frame.to_html(index=False, classes="kdp-table", border=0, na_rep="–")

    def to_markdown(self) -> str:
        return self.frame.astype(object).where(self.frame.notna(), "–").to_markdown(index=False)

    def to_latex(self) -> str:
        return self.frame.to_latex(index=False, na_rep="--")

    def to_csv(self) -> str:
        return self.frame.to_csv(index=False)


def frontier_table(data: ReportData, x: str = "latency", fmt: str = "onnx_int8") -> FrontierTable:
    """Rows: each task's front, cheapest first, then its teacher (score only: teachers are not benched)."""
    what = COSTS[x][1]
    rows = []
    for task in tasks_in(data.runs):
        try:
            pts = config_points(data, task, x, fmt)
        except NoData:
            continue
        for r in pts[pts.front].to_dict("records"):
            rows.append({"Task": TASK_LABELS.get(task, task), "Config": r["label"], what: round(r["cost"], 3),
                         "Dev score": _mean_std(r["score"], r["score_std"], r["n"]), "Seeds": r["n"]})
        teacher = _teacher_score(data, task)
        if teacher is not None:
            rows.append({"Task": TASK_LABELS.get(task, task), "Config": "teacher (reference)", what: None,
                         "Dev score": f"{teacher:.1f}", "Seeds": None})
    if not rows:
        raise NoData(f"no run has deploy/{fmt}/{COSTS[x][0]}: run `kdplatform bench RUN_ID...` on the students")
    frame = pd.DataFrame(rows)
    frame["Seeds"] = frame["Seeds"].astype("Int64")  # whole numbers, none for the teacher
    return FrontierTable(frame)


def _mean_std(mean: float, std: float, n: int) -> str:
    return f"{mean:.1f} ± {std:.1f}" if n > 1 and pd.notna(std) else f"{mean:.1f}"
