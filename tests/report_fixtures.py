"""Synthetic MLflow stores for the report tests and the report benchmark.

Runs are written through the public MLflow client exactly as the worker writes them (DESIGN.md schema:
tags `kdp.*`, string params with '' for axes that do not apply, metrics `train/*`, `dev/*`, `gap/*`,
`loss/*` at every evaluation, task metrics only in stages that train the prediction head), with values
chosen so that each run's best dev score and final gap are known exactly.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from kdplatform.task_table import TASKS

TASK_METRICS = {name: t.metrics for name, t in TASKS.items()}  # the task table's, as the worker averages them
QAT_METHODS = ("ternarybert", "kdqat_map", "kdqat_output", "kdqat_unified")
TWO_STAGE_METHODS = ("tinybert", "minilm", "ild_last", "cr_ild", "supplementary_ild")


@dataclass
class SynthRun:
    """One student trial with known outcome: max(dev/score) == best, last gap/score == final_gap."""

    task: str
    method: str
    seed: int
    best: float
    final_gap: float = 0.1
    layer_map: str = ""
    consistency_weight: str = ""
    bits: str = "32"
    act_bits: str = "32"
    map_coeff: str = ""
    output_coeff: str = ""
    extra_params: dict[str, str] = field(default_factory=dict)
    n_points: int = 8
    eval_every: int = 50
    size_mb: float | None = None
    status: str = "FINISHED"
    with_dev: bool = True
    full_metrics: bool = False  # also log per-metric dev/train/gap and loss terms (benchmark realism)
    sweep_id: str | None = None
    start_time: int | None = None

    @property
    def two_stage(self) -> bool:
        return self.method in TWO_STAGE_METHODS

    @property
    def run_name(self) -> str:
        parts = [self.task, self.method]
        if self.layer_map:
            parts.append(self.layer_map.replace(",", "-"))
        if self.consistency_weight:
            parts.append(f"w{self.consistency_weight}")
        if self.map_coeff:
            parts.append(f"m{self.map_coeff}")
        if self.output_coeff:
            parts.append(f"o{self.output_coeff}")
        parts += [f"b{self.bits}", f"s{self.seed}"]
        return "/".join(parts)

    def params(self) -> dict[str, str]:
        p = {"task": self.task, "method": self.method, "layer_map": self.layer_map,
             "consistency_weight": self.consistency_weight, "bits": self.bits, "act_bits": self.act_bits,
             "map_coeff": self.map_coeff, "output_coeff": self.output_coeff, "seed": str(self.seed),
             "train.pred.lr": "3e-05", "train.pred.batch_size": "16", "data.max_train_examples": "1000",
             "data.train_eval_examples": "512", "student.model": "minilm-l6", "student.num_layers": "2"}
        p.update(self.extra_params)
        return p

    def dev_scores(self) -> list[float]:
        """dev/score at the evaluations of the prediction stage; the maximum is exactly `best` and it is
        not the last value (the report must take the max, not the last)."""
        n = self.n_metric_points
        peak = max(0, (2 * n) // 3 - 1)
        return [self.best - 0.002 * abs(i - peak) for i in range(n)]

    def gaps(self) -> list[float]:
        n = self.n_metric_points
        return [self.final_gap * (i + 1) / n for i in range(n)]

    @property
    def n_metric_points(self) -> int:
        return self.n_points // 2 if self.two_stage else self.n_points

    def metrics(self, t0: int) -> list[Metric]:
        out: list[Metric] = []
        first_pred = self.n_points - self.n_metric_points
        dev, gaps = self.dev_scores(), self.gaps()
        best = float("-inf")
        for i in range(self.n_points):
            step, ts = (i + 1) * self.eval_every, t0 + i

            def log(key: str, value: float) -> None:
                out.append(Metric(key, float(value), ts, step))

            stage = 1 if (self.two_stage and i >= first_pred) else 0
            log("stage", stage)
            log("lr", 3e-5 * (1 - i / self.n_points))
            train_dl = 1.0 / (1 + 0.1 * i) + 0.01 * (self.seed - 42)
            dev_dl = train_dl + 0.02 * i
            log("train/distill_loss", train_dl)
            log("dev/distill_loss", dev_dl)
            log("gap/distill_loss", dev_dl - train_dl)
            log("loss/logit_kd", train_dl)
            log("loss/total", train_dl * 1.5)
            if self.full_metrics:
                for term in ("hidden_mse", "relation_kl", "consistency"):
                    log(f"loss/{term}", train_dl / 3)
            if i < first_pred or not self.with_dev:
                if not self.with_dev and i >= first_pred:
                    log("train/score", 0.5)
                continue
            j = i - first_pred
            d, g = dev[j], gaps[j]
            best = max(best, d)
            log("dev/score", d)
            log("train/score", d + g)
            log("gap/score", g)
            log("dev/best_score", best)
            if self.full_metrics:
                for m in TASK_METRICS[self.task]:
                    log(f"dev/{m}", d)
                    log(f"train/{m}", d + g)
                    log(f"gap/{m}", g)
                    log(f"dev/best_{m}", best)
        if self.size_mb is not None:
            out += [Metric("model/size_mb", self.size_mb, t0, 0),
                    Metric("model/size_mb_fp32", 87.0, t0, 0),
                    Metric("quant/params", 1e6, t0, 0), Metric("quant/fraction", 0.9, t0, 0)]
        return out


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def log_run(client: MlflowClient, experiment_id: str, run: SynthRun, t0: int | None = None) -> str:
    tags = {"kdp.role": "student", "kdp.task": run.task, "kdp.method": run.method, "kdp.seed": str(run.seed),
            "kdp.cfg_hash": hashlib.sha1(repr(sorted(run.params().items())).encode()).hexdigest()[:16],
            "kdp.teacher_hash": f"t-{run.task}", "kdp.git_commit": "0" * 40}
    if run.sweep_id:
        tags["mlflow.parentRunId"] = run.sweep_id
        tags["kdp.sweep"] = run.sweep_id
    start = run.start_time if run.start_time is not None else int(time.time() * 1000)
    r = client.create_run(experiment_id, run_name=run.run_name, tags=tags, start_time=start)
    rid = r.info.run_id
    params = [Param(k, v) for k, v in run.params().items()]
    metrics = run.metrics(t0 if t0 is not None else start)
    for chunk in _chunks(params, 100):
        client.log_batch(rid, params=chunk)
    for chunk in _chunks(metrics, 1000):
        client.log_batch(rid, metrics=chunk)
    client.set_terminated(rid, status=run.status)
    return rid


def create_sweep(client: MlflowClient, experiment_id: str, name: str = "sweep",
                 search_axes: list[str] | None = None) -> str:
    tags = {"kdp.role": "sweep"}
    if search_axes:
        tags["kdp.search"] = "optuna"
        tags["kdp.search_axes"] = ",".join(search_axes)
    r = client.create_run(experiment_id, run_name=name, tags=tags)
    client.set_terminated(r.info.run_id)
    return r.info.run_id


def small_store(root: str | os.PathLike, experiment: str, runs: list[SynthRun]) -> tuple[str, MlflowClient, str]:
    """A store of its own under `root` holding `runs` in `experiment`: (uri, client, experiment id)."""
    uri = f"sqlite:///{Path(root) / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(experiment)
    for r in runs:
        log_run(client, exp, r)
    return uri, client, exp


def log_teacher_run(client: MlflowClient, experiment_id: str, task: str, dev_scores: list[float]) -> str:
    """A finished teacher fine-tune of `task` (teacher hash t-<task>, as the students of log_run name it), as
    the worker logs it: dev/score at each evaluation, and the kdp.dev_score tag of the model it publishes,
    the last one."""
    tags = {"kdp.role": "teacher", "kdp.task": task, "kdp.teacher_hash": f"t-{task}",
            "kdp.dev_score": f"{dev_scores[-1]:.4f}"}
    t = client.create_run(experiment_id, run_name=f"{task}/teacher/minilm-l6", tags=tags)
    client.log_batch(t.info.run_id, params=[Param("task", task)],
                     metrics=[Metric("dev/score", v, i, 10 * (i + 1)) for i, v in enumerate(dev_scores)])
    client.set_terminated(t.info.run_id)
    return t.info.run_id


def write_dev_tsv(glue_root: str | os.PathLike, labels: list[str]) -> Path:
    """An RTE dev file with these labels under `glue_root` (the GLUE layout the report reads)."""
    folder = Path(glue_root) / "RTE"
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["index\tsentence1\tsentence2\tlabel"] + [f"{i}\ta\tb\t{y}" for i, y in enumerate(labels)]
    (folder / "dev.tsv").write_text("\n".join(rows) + "\n")
    return Path(glue_root)


# ------------------------------------------------------------------------------ the test store
MAIN = "synth"          # paper-style grid: several methods, tasks, seeds, bits
OPTUNA = "synth_optuna"  # an Optuna search over consistency weight and learning rate
EMPTY = "synth_empty"    # an experiment with no student run
NODEV = "synth_nodev"    # student runs that never reached a dev evaluation

SEEDS = (42, 43, 44)
# best dev score per (task, config) for seeds 42, 43, 44; a missing seed is None
KNOWN: dict[tuple, dict[str, tuple]] = {
    # (method, layer_map, consistency_weight, bits): {task: (s42, s43, s44)}
    ("kd", "", "", "32"): {"rte": (0.60, 0.62, 0.64), "mrpc": (0.80, 0.81, 0.82)},
    ("pkd", "uniform", "", "32"): {"rte": (0.61, 0.61, 0.64), "mrpc": (0.83, 0.85, None)},
    ("ild_last", "last", "", "32"): {"rte": (0.63, 0.65, 0.64), "mrpc": (0.84, 0.84, 0.84)},
    ("cr_ild", "last", "0.1", "32"): {"rte": (0.66, 0.68, 0.70), "mrpc": (0.85, 0.86, 0.87)},
    ("cr_ild", "last", "0.5", "32"): {"rte": (0.65, 0.66, 0.67), "mrpc": (0.86, 0.87, 0.88)},
    ("cr_ild", "uniform", "0.1", "32"): {"rte": (0.62, 0.63, 0.64), "mrpc": (0.82, 0.83, 0.84)},
    ("cr_ild", "uniform", "0.5", "32"): {"rte": (0.61, 0.62, 0.63), "mrpc": (0.81, 0.82, 0.83)},
    ("ternarybert", "", "", "2"): {"rte": (0.55, 0.56, 0.57), "mrpc": (0.75, 0.76, 0.77)},
    ("ternarybert", "", "", "4"): {"rte": (0.60, 0.61, 0.62), "mrpc": (0.79, 0.80, 0.81)},
    ("ternarybert", "", "", "8"): {"rte": (0.63, 0.63, 0.63), "mrpc": (0.82, 0.82, 0.82)},
    ("kdqat_unified", "", "", "2"): {"rte": (0.58, 0.59, 0.60), "mrpc": (0.78, 0.79, 0.80)},
    ("kdqat_unified", "", "", "4"): {"rte": (0.62, 0.63, 0.64), "mrpc": (0.81, 0.82, 0.83)},
    ("kdqat_unified", "", "", "8"): {"rte": (0.64, 0.64, 0.65), "mrpc": (0.83, 0.83, 0.84)},
}
SIZE_MB = {"2": 6.0, "4": 11.0, "8": 22.0}
FINAL_GAP = {"kd": 0.05, "pkd": 0.12, "ild_last": 0.08, "cr_ild": 0.03, "ternarybert": 0.02,
             "kdqat_unified": 0.01}


def final_gap(method: str, seed: int) -> float:
    return FINAL_GAP[method] + 0.01 * (seed - 42)


def main_runs(sweep_id: str | None = None) -> list[SynthRun]:
    runs = []
    for (method, lmap, w, bits), per_task in KNOWN.items():
        for task, scores in per_task.items():
            for seed, best in zip(SEEDS, scores):
                if best is None:
                    continue
                runs.append(SynthRun(task=task, method=method, seed=seed, best=best, layer_map=lmap,
                                     consistency_weight=w, bits=bits,
                                     act_bits="8" if bits != "32" else "32",
                                     final_gap=final_gap(method, seed),
                                     size_mb=SIZE_MB.get(bits) if method in QAT_METHODS else None,
                                     sweep_id=sweep_id))
    return runs


OPTUNA_TRIALS = [  # (task, consistency_weight, lr, seed, best)
    ("rte", "0.1", "1e-05", 42, 0.60), ("rte", "0.2", "2e-05", 42, 0.62), ("rte", "0.4", "3e-05", 42, 0.66),
    ("rte", "0.8", "5e-05", 42, 0.70), ("rte", "0.3", "4e-05", 42, 0.67), ("rte", "0.6", "1e-05", 42, 0.61),
    ("rte", "0.5", "2e-05", 42, 0.64), ("rte", "0.7", "3e-05", 42, 0.69), ("rte", "0.9", "5e-05", 42, 0.72),
    ("rte", "0.15", "4e-05", 42, 0.61),
]


def build_test_store(root: str | os.PathLike) -> dict:
    """Write the test store under `root` (mlflow.db) and return what was written: ids and specs."""
    root = Path(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    info: dict = {"uri": uri, "root": str(root)}

    exp = client.create_experiment(MAIN)
    info["main_experiment_id"] = exp
    sweep = create_sweep(client, exp)
    info["main_sweep"] = sweep
    runs = main_runs(sweep)
    info["main_runs"] = runs
    info["run_ids"] = {}
    for r in runs:
        info["run_ids"][r.run_name] = log_run(client, exp, r)
    # noise the report must ignore: a teacher run, a failed student, and an older duplicate of a trial
    t = client.create_run(exp, run_name="teacher/rte", tags={"kdp.role": "teacher", "kdp.task": "rte",
                                                             "kdp.teacher_hash": "t-rte"})
    client.log_batch(t.info.run_id, metrics=[Metric("dev/score", 0.99, 0, 50)])
    client.set_terminated(t.info.run_id)
    log_run(client, exp, SynthRun("rte", "kd", 45, 0.99, status="FAILED", sweep_id=sweep))
    dup = SynthRun("rte", "kd", 42, 0.10, sweep_id=sweep, start_time=1_000)  # older attempt, same cfg
    info["stale_duplicate"] = log_run(client, exp, dup)

    oexp = client.create_experiment(OPTUNA)
    osweep = create_sweep(client, oexp, search_axes=["consistency_weight", "train.pred.lr"])
    info["optuna_sweep"] = osweep
    for task, w, lr, seed, best in OPTUNA_TRIALS:
        log_run(client, oexp, SynthRun(task, "cr_ild", seed, best, layer_map="last", consistency_weight=w,
                                       extra_params={"train.pred.lr": lr}, sweep_id=osweep))

    client.create_experiment(EMPTY)
    nexp = client.create_experiment(NODEV)
    for seed in SEEDS:
        log_run(client, nexp, SynthRun("rte", "kd", seed, 0.5, with_dev=False))
    return info


_CACHE: dict[str, dict] = {}


def cached_test_store(dest: str | os.PathLike) -> dict:
    """The test store, built once per process and copied to `dest` (tests may then change their copy)."""
    if "store" not in _CACHE:
        # tmpfs when there is one: SQLite commits there cost no fsync (the build takes ~3x less time)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        root = tempfile.mkdtemp(prefix="kdp-report-store-", dir=shm)
        atexit.register(shutil.rmtree, root, True)
        _CACHE["store"] = build_test_store(root)
    src = _CACHE["store"]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(src["root"]) / "mlflow.db", dest / "mlflow.db")
    info = dict(src)
    info["root"] = str(dest)
    info["uri"] = f"sqlite:///{dest / 'mlflow.db'}"
    return info
