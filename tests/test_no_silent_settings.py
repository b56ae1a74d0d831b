"""No setting parses and does nothing: every schema field changes the resolved trial, or is refused (exit 2,
naming the setting and why), in at least one context where it can act.

The walk enumerates the schema's fields itself, so a field added later is walked too (and fails here until
it acts or is refused).
"""

from __future__ import annotations

import copy
import typing

import pytest
from pydantic import BaseModel

from conftest import GLUE_OK, cli_env, small_kd_yaml, write_yaml
from kdplatform.config import (ConfigError, ConsistencyConfig, LossTermConfig, StageConfig, SweepSpec, TrialConfig,
                               resolve_trial)

# Contexts a setting may need to act: a one-stage method, a two-stage one with mixup and consistency, a
# quantized one with mixing coefficients, the supplementary-sentences one, a subsampled train set. (A
# setting that cannot act in a context is normalised there with a printed note: see config/normalise.py.)
BASES = {
    "kd": {"method": "kd", "student": {"layers": 2}},
    "subsampled": {"method": "kd", "student": {"layers": 2}, "data": {"max_train_examples": 100}},
    "cr_ild": {"method": "cr_ild", "student": {"layers": 2}},
    "kdqat": {"method": "kdqat_unified", "bits": 2, "act_bits": 8, "student": {"layers": 2}},
    "supplementary": {"method": "supplementary_ild", "student": {"layers": 2}, "data": {"supplementary_tasks":
                                                                                         ["qnli"]}},
}
# Values a type alone does not suggest (a valid, different value for each).
ALTERNATES: dict[str, typing.Any] = {
    "name": "other", "tracking_uri": "sqlite:////tmp/other.db", "layer_map": "last", "consistency_weight": 0.3,
    "act_bits": 8, "map_coeff": 0.5, "output_coeff": 0.25, "data.glue_dir": str(GLUE_OK),
    "data.hub_dataset": "someone/glue-copy", "data.supplementary_tasks": ["mrpc"], "teacher.model": "minilm-l6",
    "teacher.checkpoint": "minilm-l6", "student.init": "teacher_copy", "student.layers": 3,
}
SKIPPED_HERE = {"train"}  # walked below, stage by stage


def _leaves(model: type[BaseModel], prefix: str = ""):
    """(dotted path, annotation, default) of every leaf field of `model`."""
    for name, field in model.model_fields.items():
        path = prefix + name
        sub = next((a for a in (field.annotation, *typing.get_args(field.annotation))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None and path not in SKIPPED_HERE:
            yield from _leaves(sub, path + ".")
        else:
            yield path, field.annotation, field.get_default(call_default_factory=True)


def _alternate(path: str, annotation, default):
    if path in ALTERNATES:
        return ALTERNATES[path]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    literal = next((a for a in ([annotation] + args) if typing.get_origin(a) is typing.Literal), None)
    if literal is not None:
        return next(v for v in typing.get_args(literal) if v != default)
    kind = args[0] if args and annotation not in (int, float, bool) else annotation
    if kind is bool or isinstance(default, bool):
        return not default
    if kind is int or isinstance(default, int):
        return (default or 1) * 2 + 1
    if kind is float or isinstance(default, float):
        return (default or 0.1) * 3
    raise AssertionError(f"no alternate value for {path} ({annotation}): add one to ALTERNATES")


def _set(raw: dict, path: str, value) -> dict:
    out = copy.deepcopy(raw)
    *parents, key = path.split(".")
    node = out
    for p in parents:
        node = node.setdefault(p, {})
    node[key] = value
    return out


def _outcome(raw: dict):
    """The resolved trial as data, or the ConfigError's text."""
    try:
        return resolve_trial(TrialConfig.model_validate(raw)).model_dump(mode="json")
    except ConfigError as e:
        return f"refused: {e}"


def _acts(change) -> list[str]:
    """The bases where `change(raw)` changes the resolved trial or is refused (with what happened)."""
    seen = []
    for label, base in BASES.items():
        before, after = _outcome(base), _outcome(change(base))
        assert not str(before).startswith("refused"), before
        if after != before:
            seen.append(f"{label}: {after if isinstance(after, str) else 'changed'}")
    return seen


TRIAL_FIELDS = [(p, a, d) for p, a, d in _leaves(TrialConfig) if p not in SKIPPED_HERE]


@pytest.mark.parametrize("path,annotation,default", TRIAL_FIELDS, ids=[p for p, _, _ in TRIAL_FIELDS])
def test_every_trial_field_changes_the_trial_or_is_refused(path, annotation, default):
    value = _alternate(path, annotation, default)
    assert value != default
    assert _acts(lambda raw: _set(raw, path, value)), f"{path}: {value!r} changed no trial and was not refused"


# Stage fields: as an override of cr_ild's ild stage (mixup + consistency), loss-term options on the
# term of the menu that reads them, consistency fields on that stage's consistency section.
STAGE_ALTERNATES = {"losses": [{"name": "hidden_mse", "layer_map": "last"}], "epochs": 5, "max_steps": 3,
                    "lr": 1e-3, "batch_size": 16, "warmup": 0.2, "weight_decay": 0.1, "max_grad_norm": 2.0,
                    "eval_every": 5, "mixup": False, "consistency": {"ramp": "step"}}
TERM_ALTERNATES = {"name": ("logit_kd", "ce"), "weight": ("logit_kd", 2.0), "layer_map": ("hidden_mse", "1:2"),
                   "temperature": ("logit_kd", 4.0), "relations": ("relation_kl", ["q", "k"]),
                   "include_embeddings": ("hidden_mse", True), "projection": ("hidden_mse", True)}
CONSISTENCY_ALTERNATES = {"losses": ["attention_kl"], "ramp": "step", "target": "ema", "ema_decay": 0.9}


def test_the_walk_covers_every_stage_term_and_consistency_field():
    assert set(StageConfig.model_fields) - {"name"} == set(STAGE_ALTERNATES)
    assert set(LossTermConfig.model_fields) == set(TERM_ALTERNATES)
    assert set(ConsistencyConfig.model_fields) == set(CONSISTENCY_ALTERNATES)


@pytest.mark.parametrize("key", sorted(STAGE_ALTERNATES))
def test_every_stage_field_changes_the_trial_or_is_refused(key):
    def change(raw):
        return {**raw, "train": [{"name": "ild", key: STAGE_ALTERNATES[key]}]}
    assert _acts(change), f"train[].{key} changed no trial and was not refused"


@pytest.mark.parametrize("key", sorted(TERM_ALTERNATES))
def test_every_loss_term_field_changes_the_trial_or_is_refused(key):
    loss, value = TERM_ALTERNATES[key]
    stage = {"name": "mine", "epochs": 1}
    base = {"method": "custom", "student": {"layers": 2}, "layer_map": "uniform"}
    term = {"name": loss, **({} if key == "name" else {"layer_map": "last"} if LOSS_PER_LAYER(loss) else {})}
    before = _outcome({**base, "train": [{**stage, "losses": [term]}]})
    after = _outcome({**base, "train": [{**stage, "losses": [{**term, key: value}]}]})
    assert not str(before).startswith("refused"), before
    assert after != before, f"losses[].{key}: {value!r} changed no trial and was not refused"


def LOSS_PER_LAYER(name: str) -> bool:  # noqa: N802 - reads as the menu's column
    from kdplatform.loss_menu import LOSS_MENU

    return LOSS_MENU[name].per_layer


@pytest.mark.parametrize("key", sorted(CONSISTENCY_ALTERNATES))
def test_every_consistency_field_changes_the_trial_or_is_refused(key):
    extra = {"target": "ema"} if key == "ema_decay" else {}  # the decay belongs to the EMA target
    base = {"method": "cr_ild", "student": {"layers": 2}, "train": [{"name": "ild", "consistency": extra}]}
    changed = copy.deepcopy(base)
    changed["train"][0]["consistency"][key] = CONSISTENCY_ALTERNATES[key]
    assert _outcome(changed) != _outcome(base)


# Sweep-level settings shape the set of trials or how they run, not one trial: each named with where it acts.
SWEEP_ONLY = {
    "seeds": "one trial per seed", "grid": "one trial per grid point", "max_trials": "refuses larger grids",
    "overrides": "changes the trials it matches", "search": "Optuna sampling (sweep); refused by run",
    "scheduler": "ASHA early stopping (sweep); refused by run",
    "resources": "Ray per-trial resources (sweep); refused by run unless default",
    "max_concurrent_trials": "at most N trials at once (sweep); run's one at a time keeps it",
    "max_failures": "Ray retries (sweep); refused by run unless default", "source_file": "internal, not YAML",
}


def test_every_sweep_only_field_is_accounted_for():
    assert set(SweepSpec.model_fields) - set(TrialConfig.model_fields) == set(SWEEP_ONLY)


# ------------------------------------------------------------------------------ the four named settings
def _config_error(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        resolve_trial(TrialConfig.model_validate(raw))
    return str(e.value)


def test_map_coeff_is_refused_when_the_qat_stage_lists_its_own_losses():
    raw = {"method": "kdqat_unified", "bits": 2, "act_bits": 8, "map_coeff": 0.5, "student": {"layers": 2},
           "train": [{"name": "qat", "losses": [{"name": "logit_kd"}, {"name": "attention_map_kl", "weight": 2}]}]}
    text = _config_error(raw)
    assert "map_coeff: map_coeff weights the preset's attention_map_kl term of stage 'qat'" in text
    assert "would weight nothing" in text
    # without the stage's own losses it weights the preset's term
    del raw["train"]
    trial = resolve_trial(TrialConfig.model_validate(raw))
    assert {t.name: t.weight for t in trial.train[0].losses}["attention_map_kl"] == 0.5


def test_student_layers_with_a_model_name_init_is_refused_unless_it_is_that_models_depth():
    raw = {"method": "kd", "teacher": {"model": "bert-base-uncased"}, "student": {"init": "minilm-l6"}}
    assert resolve_trial(TrialConfig.model_validate(_set(raw, "student.layers", 6))).student_layers == 6
    text = _config_error(_set(raw, "student.layers", 2))
    assert "student.layers: student.init 'minilm-l6' is loaded with all its 6 layers" in text


def test_glue_dir_with_source_hub_is_refused():
    text = _config_error({"method": "kd", "student": {"layers": 2},
                          "data": {"source": "hub", "glue_dir": str(GLUE_OK)}})
    assert "data.glue_dir: data.source 'hub' reads the GLUE hub dataset" in text


@pytest.mark.parametrize("extra,setting", [("max_failures: 3\n", "max_failures: 3"),
                                           ("resources: {cpu: 4}\n", "resources: {'cpu': 4.0}")])
def test_run_refuses_ray_only_settings_with_exit_2_and_writes_nothing(tmp_path, extra, setting):
    import subprocess
    import sys

    spec = write_yaml(tmp_path / "s.yaml", small_kd_yaml("ray-only", extra))
    db = tmp_path / "m.db"
    proc = subprocess.run([sys.executable, "-m", "kdplatform.cli", "run", str(spec), "--tracking-uri",
                           f"sqlite:///{db}"], capture_output=True, text=True, env=cli_env(tmp_path), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{setting} would not be applied by `kdplatform run`" in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr and not db.exists()
