"""Which training stage each evaluation belongs to, and the step within that stage.

The worker logs `stage` (the stage index, 0, 1, ...) at every evaluation, at the same global step as the
other metrics. A run's last stage is its prediction stage (KD on the logits, where the score is selected);
earlier stages are intermediate-layer distillation (ILD). Aligning stages by kind, not by global step, puts
one-stage `kd` next to the prediction stage of two-stage methods; in the whole-run view, every run is shifted
so that its prediction stage starts at the same x (`prediction_aligned`).

The step within a stage counts from the previous stage's last evaluation, so a stage that starts at global
step 120 starts at 0 here.
"""

from __future__ import annotations

import pandas as pd

from kdplatform.report.collect import STAGE_KEY, ReportData

ILD, PRED = "ild", "pred"
STAGE_LABELS = {ILD: "ILD stage", PRED: "prediction stage"}


def stage_of_points(data: ReportData) -> pd.DataFrame:
    """Per (run_id, step): stage (index), kind (ILD/PRED) and stage_step; cached on `data`."""
    if "stage_points" in data.cache:
        return data.cache["stage_points"]
    s = data.key_history(STAGE_KEY)[["run_id", "step", "value"]].rename(columns={"value": "stage"})
    s = s.dropna(subset=["stage"]).astype({"stage": "int64"})
    n_stages = data.runs.set_index("run_id").n_stages
    last = s.groupby(["run_id", "stage"]).step.max().rename("last").reset_index()
    # Offset of stage k = the last evaluated step of any earlier stage of the run (0 for the first stage).
    previous = last.groupby("run_id")["last"].shift(1).fillna(0)
    last["offset"] = previous.groupby(last.run_id).cummax()
    s = s.merge(last[["run_id", "stage", "offset"]], on=["run_id", "stage"])
    total = s.run_id.map(n_stages).fillna(1).clip(lower=s.groupby("run_id").stage.transform("max") + 1)
    s["kind"] = (s.stage == total - 1).map({True: PRED, False: ILD})
    s["stage_step"] = (s.step - s.offset).astype("int64")
    data.cache["stage_points"] = s
    return s


def staged_history(data: ReportData, key: str, kind: str | None = None) -> pd.DataFrame:
    """History rows of `key` with stage, kind and stage_step; only the points of stage `kind` if given.
    Split by kind once per key, then cached on `data` (figures ask for the same keys per task)."""
    cache_key = ("staged", key)
    if cache_key not in data.cache:
        h = data.key_history(key).merge(stage_of_points(data), on=["run_id", "step"], how="inner")
        data.cache[cache_key] = {None: h, **{k: g for k, g in h.groupby("kind", sort=False)}}
    parts = data.cache[cache_key]
    return parts.get(kind, parts[None].iloc[0:0])


def prediction_aligned(data: ReportData, run_ids) -> tuple[pd.DataFrame, float | None]:
    """The whole-run x axis of `run_ids`: per (run_id, step), x = the global step shifted so that every
    run's prediction stage starts at the same x, the latest start among the runs (one-stage `kd` moves right
    by the length of the others' ILD; two-stage runs of equal ILD length keep their steps). Also returns
    that common start, the ILD | prediction KD boundary, or None where no run has an ILD stage."""
    s = stage_of_points(data)
    s = s[s.run_id.isin(set(run_ids))]
    # A run still in (or stopped during) ILD would start prediction KD after its last evaluation.
    pred_start = s.groupby("run_id").step.max().astype(float)
    pred_start.update(s[s.kind == PRED].groupby("run_id").offset.min())
    start = float(pred_start.max()) if len(pred_start) else 0.0
    shift = s.run_id.map(start - pred_start).where(s.run_id.isin(s[s.kind == PRED].run_id), 0.0)
    out = s[["run_id", "step"]].assign(x=s.step + shift)
    return out, (start if (s.kind == ILD).any() else None)
