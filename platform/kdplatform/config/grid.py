"""The one grid walk: grid axes x seeds -> raw trial configs -> resolved trials, collapsed when equal.

Every axis value is a top-level trial field or a dotted key path (`data.max_train_examples`,
`train.pred.lr`: stages are addressed by name). `overrides:` entries then set values on the trials that
match their `when` (e.g. a per-task max length). `expand` is what commands use; `raw_trials` gives the raw
configs behind given hashes (a search sample is applied to those).
"""

from __future__ import annotations

import copy
import itertools
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from pydantic import ValidationError

from kdplatform.config.errors import ConfigError
from kdplatform.config.overrides import apply_overrides, blame_override, refuse_shadowed
from kdplatform.config.resolve import resolve_with_notes
from kdplatform.config.schema import AXES, REGRESSION_TASKS, SweepSpec, TrialConfig, is_setting_key
from kdplatform.config.trial import ResolvedTrial
from kdplatform.config.yaml_io import errors_to_config_error, parse_spec, read_yaml, relabel_error

# SweepSpec fields that say how to run the sweep, not what a trial is.
SWEEP_ONLY = {"seeds", "grid", "max_trials", "search", "scheduler", "resources", "max_concurrent_trials",
              "max_failures", "overrides", "source_file"}
_LABEL_NOISE_DROP = "label noise has no classes to flip on regression task stsb (dropped, not run)"
# Settings of the whole file, not of a trial: one experiment in one store per file.
_PER_FILE = {"name": "every trial of a file goes to one MLflow experiment",
             "tracking_uri": "every trial of a file logs to one tracking store"}


@dataclass
class GridPoint:
    """One raw trial config of the walk, with where each grid value came from (for error messages)."""

    raw: dict[str, Any]
    relabel: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    dotted: list[str] = field(default_factory=list)  # 'train.pred.lr=0.0001': the run-name suffix
    dotted_keys: list[str] = field(default_factory=list)  # the axis of each `dotted` entry
    overrides: list[int] = field(default_factory=list)  # indices of the `overrides:` entries it matched


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` (a field or dotted path; `train.<stage>.<field>` addresses a stage by name) in a raw config."""
    parts = key.split(".")
    if parts[0] == "train" and len(parts) >= 3:
        stages = raw.setdefault("train", [])
        stage = next((s for s in stages if isinstance(s, dict) and s.get("name") == parts[1]), None)
        if stage is None:
            stage = {"name": parts[1]}
            stages.append(stage)
        node, parts = stage, parts[2:]
    else:
        node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def get_dotted(cfg: TrialConfig, key: str) -> Any:
    """The validated value of `key` in a trial (None for a stage the file does not mention)."""
    parts = key.split(".")
    node: Any = cfg
    if parts[0] == "train" and len(parts) >= 3:
        node = next((s for s in cfg.train if s.name == parts[1]), None)
        parts = parts[2:]
    for p in parts:
        node = getattr(node, p, None) if node is not None else None
    return node


def grid_axes(spec: SweepSpec, file: str | None, lines: dict) -> list[tuple[str, list[Any]]]:
    axes = []
    for key, values in spec.grid.items():
        if key in ("seed", "seeds"):
            raise ConfigError(file, f"grid.{key}", "seeds are not a grid axis", "use the top-level seeds: [...]",
                              line=lines.get(("grid", key)))
        if key in _PER_FILE:
            raise ConfigError(file, f"grid.{key}", f"not a grid axis: {_PER_FILE[key]}",
                              f"write one file per {key} (or pass {key}=... on the command line)",
                              line=lines.get(("grid", key)))
        if not is_setting_key(key):
            raise ConfigError(file, f"grid.{key}[0]", f"unknown key '{key}': not an axis or a dotted key path",
                              f"axes are {', '.join(AXES)}; any other field is a dotted path such as "
                              "train.pred.lr, data.max_train_examples or teacher.finetune.epochs",
                              line=lines.get(("grid", key)))
        if not isinstance(values, list) or not values:
            raise ConfigError(file, f"grid.{key}", "an axis needs a non-empty list of values",
                              f"e.g. {key}: [value1, value2]", line=lines.get(("grid", key)))
        axes.append((key, values))
    for i, ov in enumerate(spec.overrides):
        for key in ov.set:
            if key in _PER_FILE:
                raise ConfigError(file, f"overrides[{i}].set.{key}", f"cannot differ between trials: "
                                  f"{_PER_FILE[key]}", f"set {key} once at the top of the file",
                                  line=lines.get(("overrides", i, "set", key)))
            if key in spec.grid:
                raise ConfigError(file, f"overrides[{i}].set.{key}", "this key is also a grid axis, so the "
                                  "grid value would be overwritten", "grid it or override it, not both",
                                  line=lines.get(("overrides", i, "set", key)))
    return axes


def walk_grid(spec: SweepSpec, lines: dict | None = None) -> Iterator[GridPoint]:
    """Every grid combination x seed as a raw trial config, before conditional overrides."""
    file, lines = spec.source_file, lines or {}
    base = spec.model_dump(mode="json", exclude=SWEEP_ONLY, exclude_unset=True)
    axes = grid_axes(spec, file, lines)
    n = len(spec.seeds)
    for _, vals in axes:
        n *= len(vals)
    if n > spec.max_trials:
        raise ConfigError(file, "grid", f"the grid expands to {n} trials, over max_trials={spec.max_trials}",
                          "shrink the grid or raise max_trials if you mean it")
    for combo in itertools.product(*[vals for _, vals in axes]):
        point = GridPoint(copy.deepcopy(base))
        for (key, vals), value in zip(axes, combo):
            set_dotted(point.raw, key, value)
            i = vals.index(value)
            target = (f"grid.{key}[{i}]", lines.get(("grid", key, i)) or lines.get(("grid", key)))
            point.relabel[key] = target
            parts = key.split(".")
            if parts[0] == "train" and len(parts) >= 3:  # the stage list entry set_dotted wrote into
                idx = next(j for j, st in enumerate(point.raw["train"]) if st.get("name") == parts[1])
                point.relabel[f"train[{idx}]." + ".".join(parts[2:])] = target
            if "." in key:
                point.dotted.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
                point.dotted_keys.append(key)
        for seed in spec.seeds:
            yield GridPoint({**copy.deepcopy(point.raw), "seed": seed}, dict(point.relabel), list(point.dotted),
                            dotted_keys=list(point.dotted_keys))


def validate_point(spec: SweepSpec, point: GridPoint, lines: dict | None = None) -> TrialConfig:
    """Validate a grid point and apply the `overrides:` whose `when` it matches."""
    file, lines = spec.source_file, lines or {}
    cfg = _validate(point, file, lines)
    for i, ov in enumerate(spec.overrides):
        if all(get_dotted(cfg, k) == v for k, v in ov.when.items()):
            for key, value in ov.set.items():
                set_dotted(point.raw, key, value)
                point.relabel[key] = (f"overrides[{i}].set.{key}", lines.get(("overrides", i, "set", key)))
            point.overrides.append(i)
    return _validate(point, file, lines) if point.overrides else cfg


def _validate(point: GridPoint, file: str | None, lines: dict) -> TrialConfig:
    try:
        return TrialConfig.model_validate(point.raw)
    except ValidationError as e:
        raise errors_to_config_error(e, file, lines, point.relabel, raw=point.raw) from None


def resolved_points(spec: SweepSpec, lines: dict | None = None
                    ) -> Iterator[tuple[GridPoint, ResolvedTrial | None, list[str]]]:
    """(point, resolved trial, notes) per grid point; trial None for a dropped point (notes say why)."""
    for point in walk_grid(spec, lines):
        cfg = validate_point(spec, point, lines)
        if cfg.data.label_noise > 0 and cfg.task in REGRESSION_TASKS and "task" in spec.grid:
            yield point, None, [_LABEL_NOISE_DROP]  # a grid of tasks x label noise: no classes to flip
            continue
        try:
            trial, notes = resolve_with_notes(cfg, file=spec.source_file)
        except ConfigError as e:
            raise relabel_error(e, point.relabel) from None
        unused = [key for key in point.dotted_keys if not axis_in_effect(key, trial, notes)]
        notes += [_unused_note(key, trial) for key in unused if not _noted(key, notes)]
        labels = [label for key, label in zip(point.dotted_keys, point.dotted) if key not in unused]
        if labels:
            trial = trial.model_copy(update={"run_suffix": ",".join(labels)})
        yield point, trial, notes


def axis_in_effect(key: str, trial: ResolvedTrial, notes: list[str]) -> bool:
    """Whether a dotted grid axis acts in the resolved trial: no note says it was reset as a no-op, and the
    stage (or optional section, e.g. a stage's consistency) it addresses is part of the trial."""
    if _noted(key, notes):
        return False
    parts = key.split(".")
    node: Any = trial
    if parts[0] == "train" and len(parts) >= 3:
        node = next((st for st in trial.train if st.name == parts[1]), None)
        parts = parts[2:]
    for part in parts[:-1]:
        if node is None or not hasattr(node, part):
            break
        node = getattr(node, part)
    return node is not None


def _noted(key: str, notes: list[str]) -> bool:
    """Whether a note says the setting (or its section) has no effect: 'student.two_bit has no effect ...',
    'teacher.finetune has no effect ...'."""
    parts = key.split(".")
    heads = tuple(f"{'.'.join(parts[:i])} has no effect" for i in range(1, len(parts) + 1))
    return any(n.startswith(heads) for n in notes)


def _unused_note(key: str, trial: ResolvedTrial) -> str:
    parts = key.split(".")
    if parts[0] == "train" and len(parts) >= 3 and all(st.name != parts[1] for st in trial.train):
        stages = ", ".join(st.name for st in trial.train)
        return f"grid axis {key} has no effect on method {trial.method} (no stage '{parts[1]}'; it trains {stages})"
    return f"grid axis {key} has no effect in these trials (not part of their run names)"


def expand(spec: SweepSpec, lines: dict | None = None) -> tuple[list[ResolvedTrial], list[str]]:
    """Cartesian product of grid axes x seeds, validated and resolved; equal configs collapse to one.

    Returns the trials and human-readable notes about what was collapsed, dropped or normalised.
    """
    trials: dict[str, ResolvedTrial] = {}
    collapsed: Counter[str] = Counter()
    normalised: Counter[str] = Counter()
    unmatched = set(range(len(spec.overrides)))
    for point, trial, notes in resolved_points(spec, lines):
        unmatched -= set(point.overrides)
        why = "; ".join(notes)
        if trial is None:
            collapsed[why] += 1
        elif trial.cfg_hash in trials:
            collapsed[why or "same resolved configuration as another trial"] += 1
        else:
            trials[trial.cfg_hash] = trial
            if why:
                normalised[why] += 1
    if unmatched:  # an override that no trial matches does nothing: most likely a typo in `when`
        i = min(unmatched)
        raise ConfigError(spec.source_file, f"overrides[{i}].when", "matches no trial of the file, so it does "
                          "nothing", "check its keys and values against the grid (e.g. task names)",
                          line=(lines or {}).get(("overrides", i, "when")))
    out = [f"{k} trial(s) collapsed: {why}" for why, k in collapsed.items()]
    out += [f"{k} trial(s) normalised: {why}" for why, k in normalised.items() if why not in collapsed]
    out += unused_stage_notes(spec, list(trials.values()))
    return list(trials.values()), out


def unused_stage_notes(spec: SweepSpec, trials: list[ResolvedTrial]) -> list[str]:
    """A note for each `train:` entry that no trial trains (a `qat` stage in a file of kd and cr_ild): it is
    fine in a file whose grid is narrowed on the command line (`grid.method=[kd]`), so not an error, but it
    must not do nothing in silence."""
    trained = {st.name for t in trials for st in t.train}
    methods = ", ".join(sorted({t.method for t in trials}))
    return [f"train[{i}] (stage '{st.name}') has no effect: none of this file's methods ({methods}) trains a "
            f"stage '{st.name}'" for i, st in enumerate(spec.train) if st.name not in trained]


def raw_trials(spec: SweepSpec, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """cfg_hash -> the raw trial config it was resolved from, for the hashes in `wanted` (search samples)."""
    out: dict[str, dict[str, Any]] = {}
    for point, trial, _ in resolved_points(spec):
        if trial is not None and trial.cfg_hash in wanted and trial.cfg_hash not in out:
            out[trial.cfg_hash] = copy.deepcopy(point.raw)
    return out


def load_trials(path: str | os.PathLike, overrides: Sequence[str] = ()
                ) -> tuple[SweepSpec, list[ResolvedTrial], list[str]]:
    """Read, validate and expand a YAML file: everything a command needs before it runs anything.

    `overrides` are command-line `key.path=value` settings (see `config.overrides`), set on the file's raw
    YAML before validation; an error in a value one of them set names that override.
    """
    raw, lines = read_yaml(path)
    applied = apply_overrides(raw, overrides, path)
    try:
        spec = parse_spec(raw, source=str(path), lines=lines)
        refuse_shadowed(applied, spec.grid, path)
        trials, notes = expand(spec, lines)
    except ConfigError as e:
        raise blame_override(e, applied) from None
    return spec, trials, notes
