"""The public Python API: the few entry points the CLI is built on, importable from `kdplatform`.

Each function imports its layer when called, so `import kdplatform` stays light (no torch, Ray or MLflow)
and `build_report` never loads torch.

>>> from kdplatform import load_spec, expand, run_trial, build_report
>>> spec = load_spec("sweeps/quickstart.yaml")                  # validated; ConfigError names file and field
>>> trials, notes = expand(spec)                                 # fully resolved trials, before anything runs
>>> [t.run_name for t in trials]
['sst2/kd/b32/s42', 'sst2/tinybert/uniform/b32/s42', 'sst2/ild_last/b32/s42', 'sst2/cr_ild/w0.5/b32/s42']
>>> result = run_trial(trials[0], tracking_uri="sqlite:///mlflow.db")        # doctest: +SKIP
>>> result.status, result.best["dev/best_score"]                              # doctest: +SKIP
('FINISHED', 0.8...)
>>> build_report("sqlite:///mlflow.db", "report", experiment="quickstart")    # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # the types only: importing them at run time would load the layers
    from kdplatform.config import ResolvedTrial, SweepSpec
    from kdplatform.distill.student import Callbacks, TrialResult
    from kdplatform.sweep.session import SweepOutcome


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a trial or sweep YAML file (raises `ConfigError`: file, field, fix).

    >>> spec = load_spec("sweeps/quickstart.yaml")
    >>> spec.name, spec.grid["method"]
    ('quickstart', ['kd', 'tinybert', 'ild_last', 'cr_ild'])
    """
    from kdplatform.config import load_spec as _load_spec

    return _load_spec(path)


def expand(spec: SweepSpec) -> tuple[list[ResolvedTrial], list[str]]:
    """The spec's trials (grid x seeds), validated and fully resolved, and notes on collapsed duplicates.

    >>> trials, notes = expand(load_spec("sweeps/quickstart.yaml"))
    >>> trials[0].run_name, trials[0].cfg_hash == trials[0].cfg_hash, len(trials)
    ('sst2/kd/b32/s42', True, 4)
    """
    from kdplatform.config import expand as _expand

    return _expand(spec)


def run_trial(trial: ResolvedTrial, *, tracking_uri: str | None = None, parent_run_id: str | None = None,
              callbacks: Callbacks | None = None) -> TrialResult:
    """Train one student (fine-tuning its teacher first if no cached one exists) as one MLflow run.

    The store is `tracking_uri`, else MLFLOW_TRACKING_URI, else the trial's `tracking_uri`, else ./mlflow.db.
    Raises `DivergedError` (the run is FAILED with the reason), `DataError` / `TeacherError` on bad inputs.
    `callbacks.on_progress(label, step, total)` is called after every training step.

    >>> trials, _ = expand(load_spec("sweeps/quickstart.yaml"))
    >>> result = run_trial(trials[0], tracking_uri="sqlite:///mlflow.db")     # doctest: +SKIP
    >>> result.run_id, result.best["dev/best_score"]                           # doctest: +SKIP
    ('3f2c...', 0.8...)
    """
    from kdplatform.distill.worker import run_trial as _run_trial

    return _run_trial(trial, tracking_uri=tracking_uri, parent_run_id=parent_run_id, callbacks=callbacks)


def run_sweep(file: str | os.PathLike, *, tracking_uri: str | None = None, dry_run: bool = False,
              overrides: Sequence[str] = (), **options: Any) -> SweepOutcome:
    """`kdplatform sweep FILE` from Python: the missing trials on a local Ray cluster under one parent run.

    `options`: the command's other flags (resume, fresh, force, address, max_concurrent, storage, num_cpus,
    num_gpus, console). Raises `ConfigError` / `SweepError` on user mistakes.

    >>> outcome = run_sweep("sweeps/quickstart.yaml", tracking_uri="sqlite:///mlflow.db", num_cpus=2)  # doctest: +SKIP
    >>> outcome.exit_code, outcome.counts["finished"], outcome.parent_run_id                          # doctest: +SKIP
    (0, 4, '9a1b...')
    """
    from kdplatform.sweep.driver import run_sweep as _run_sweep

    return _run_sweep(file, tracking_uri=tracking_uri, dry_run=dry_run, overrides=overrides, **options)


def build_report(tracking_uri: str, out: str | os.PathLike, *, experiment: str | None = None,
                 sweep: str | None = None, dashboards: list[str] | None = None,
                 formats: str = "all") -> dict[str, Any]:
    """Write the report of an experiment (or one sweep, by parent run id) to the folder `out`; returns a summary
    (runs, tables, figures, the index path). Raises `ReportError` (e.g. no student runs). Never loads torch.

    >>> summary = build_report("sqlite:///mlflow.db", "report", experiment="quickstart")  # doctest: +SKIP
    >>> summary["index"], summary["runs"]                                                # doctest: +SKIP
    ('/.../report/index.html', 4)
    """
    from kdplatform.report.render import generate

    return generate(tracking_uri, Path(out), experiment=experiment, sweep=sweep, dashboards=dashboards,
                    formats=formats)
