"""Plan a sweep before anything runs: trials, what is already done, what the teacher stage must do.

`plan_sweep(path, tracking_uri)` reads and validates the YAML (`config.load_trials`: collapsed and dropped
combinations come back as notes), asks MLflow once which config hashes already have a
FINISHED run (dedupe), and for `search:` keeps the raw trial configs the sampled values are applied to.
No Ray and no torch here: `--dry-run` is this plan printed, after `preflight_plan` (the real run's checks).

>>> plan = plan_sweep("sweeps/quickstart.yaml", "sqlite:////abs/mlflow.db")    # doctest: +SKIP
>>> len(plan.trials), len(plan.to_run), plan.experiment_dir_name                # doctest: +SKIP
(8, 8, 'quickstart-3f2a9c1d')
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pydantic import ValidationError

from kdplatform import runs, tracking
from kdplatform.config import (AXES, ConfigError, ResolvedTrial, SweepSpec, TrialConfig, load_trials, raw_trials,
                               resolve_trial, set_dotted)
from kdplatform.store_check import check_store

# Fields that change how a sweep runs, not what it computes: left out of the spec hash, so a resumed
# sweep finds its Ray experiment folder even when run against another store or with other concurrency.
_NOT_IN_SPEC_HASH = {"tracking_uri", "max_concurrent_trials"}


@dataclass
class SweepPlan:
    spec: SweepSpec
    spec_file: Path
    spec_hash: str
    trials: list[ResolvedTrial]  # every distinct trial of the grid (x seeds)
    notes: list[str]  # collapsed / dropped combinations, for --dry-run
    tracking_uri: str = ""  # absolute
    done: dict[str, str] = field(default_factory=dict)  # cfg_hash -> FINISHED run id
    bases: dict[str, dict[str, Any]] = field(default_factory=dict)  # search: cfg_hash -> raw TrialConfig
    force: bool = False  # --force: finished configs run again
    overrides: list[str] = field(default_factory=list)  # the command line's key=value settings, for hints

    @property
    def to_run(self) -> list[ResolvedTrial]:
        return [t for t in self.trials if t.cfg_hash not in self.done]

    @property
    def experiment(self) -> str:
        return self.spec.name

    @property
    def experiment_dir_name(self) -> str:
        """Ray experiment folder: spec name + spec hash, so `--resume` finds it from the file alone."""
        return f"{slug(self.spec.name)}-{self.spec_hash[:8]}"

    def teachers(self, trials: list[ResolvedTrial] | None = None) -> dict[str, ResolvedTrial]:
        """One representative trial per distinct teacher hash (of `trials`, default: those to run)."""
        out: dict[str, ResolvedTrial] = {}
        for t in self.to_run if trials is None else trials:
            out.setdefault(t.teacher_hash, t)
        return out


def slug(text: str, max_len: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:max_len] or "sweep"


def spec_hash(spec: SweepSpec) -> str:
    """Hash of what the file says (explicit keys only, so a schema that gains a default keeps the hash)."""
    d = spec.model_dump(mode="json", exclude=_NOT_IN_SPEC_HASH, exclude_unset=True)
    d.get("data", {}).pop("glue_dir", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_sweep(path: str | Path, tracking_uri: str | None = None, query_done: bool = True,
               overrides: Sequence[str] = (), force: bool = False) -> SweepPlan:
    """Validate and expand `path` (with command-line `key=value` overrides); with `query_done`, look up
    finished runs in the store (`force`: count none as done, so finished configs run again).

    The store is `tracking.resolve_tracking_uri`'s: `tracking_uri`, else MLFLOW_TRACKING_URI, else the spec's
    `tracking_uri`, else `./mlflow.db`. Trials log to this URI, passed on to them (never re-resolved there).
    """
    spec, trials, notes = load_trials(path, overrides)
    uri = tracking.resolve_tracking_uri(tracking_uri, spec.tracking_uri)
    if query_done:
        check_store(uri)  # a store that is down, refuses us or is corrupt: exit 2 now, not after the teachers
    plan = SweepPlan(spec=spec, spec_file=Path(path).resolve(), spec_hash=spec_hash(spec), trials=trials,
                     notes=notes, tracking_uri=uri, force=force, overrides=list(overrides))
    if spec.search is not None:
        plan.bases = raw_trials(spec, {t.cfg_hash for t in trials})  # the same grid walk as load_trials
        check_search_space(plan)
    if query_done and not spec.search and not force:
        plan.done = runs.finished_cfg_hashes(uri, spec.name, {t.cfg_hash for t in trials})
    return plan


def preflight_plan(plan: SweepPlan, runs_here: bool = True, fetch: bool = True) -> None:
    """Check every file the plan's trials will read (GLUE splits, teacher checkpoints) and, when they run on
    this machine, its device: raises DataError / TeacherError / DeviceError. A real run calls this before it
    writes anything, and `--dry-run` calls it too, so a dry run passes only when the run would start.

    A search draws its samples from every base trial, so all of them are checked; a grid checks the trials
    still to run (finished ones read nothing). `fetch=False` (a dry run) leaves out data from the hub.
    """
    from kdplatform.distill.preflight import preflight

    preflight(plan.trials if plan.spec.search is not None else plan.to_run, runs_here=runs_here, fetch=fetch)


def apply_sample(raw: dict[str, Any], values: dict[str, Any], file: str | None = None) -> ResolvedTrial:
    """A search sample: the base trial's raw config with the drawn values set, validated and resolved."""
    raw = copy.deepcopy(raw)
    for key, value in values.items():
        set_dotted(raw, key, value)
    try:
        cfg = TrialConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ConfigError(file, f"search.space ({loc})", first["msg"], f"got {first.get('input')!r}") from None
    return resolve_trial(cfg, file=file)


def check_search_space(plan: SweepPlan) -> None:
    """Every search axis must be settable on every base trial at both ends of its range."""
    search = plan.spec.search
    assert search is not None
    file = plan.spec.source_file
    for key, dim in search.space.items():
        if key in plan.spec.grid:
            raise ConfigError(file, f"search.space.{key}", "this key is also a grid axis",
                              "sample it or grid it, not both")
        if key in ("seed", "seeds", "name", "tracking_uri"):
            raise ConfigError(file, f"search.space.{key}", "not a searchable setting",
                              f"search over trial settings: {', '.join(AXES)} or dotted keys such as train.ild.lr")
        probes = dim.values if dim.type == "choice" else \
            ([int(dim.low), int(dim.high) - 1] if dim.type == "randint" else [dim.low, dim.high])
        for value in probes:
            for raw in list(plan.bases.values())[:50]:
                apply_sample(raw, {key: value}, file)
