"""Property-based test of the config parser: random mutations of a valid sweep never crash it.

Whatever a user does to a valid file (wrong types, out-of-range numbers, unknown keys, random strings for
enums, a section deleted or replaced), `parse_spec` + `expand` either succeed or raise `ConfigError` whose
message names the file and a YAML path that exists in the mutated file; never any other exception. A few
mutated files also go through `kdplatform run --dry-run` in a subprocess: exit 0 or 2, never a traceback,
no MLflow store.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdplatform.config import ConfigError, expand, parse_spec

BASE: dict[str, Any] = {
    "name": "prop",
    "task": "sst2",
    "method": "cr_ild",
    "consistency_weight": 0.5,
    "layer_map": "last",
    "bits": 32,
    "act_bits": 32,
    "data": {"source": "glue_dir", "glue_dir": "/nonexistent/glue", "max_train_examples": 100,
             "max_seq_length": 64, "label_noise": 0.0, "supplementary_tasks": []},
    "teacher": {"model": "minilm-l6", "finetune": {"epochs": 1, "lr": 1.0e-4, "batch_size": 16}, "seed": 42},
    "student": {"init": "truncate", "layers": 2, "two_bit": "ternary"},
    "train": [{"name": "ild", "epochs": 2, "lr": 1.0e-4, "mixup": True, "eval_every": 10},
              {"name": "pred", "epochs": 1, "batch_size": 16,
               "losses": [{"name": "logit_kd", "weight": 1.0, "temperature": 2.0}]}],
    "seeds": [42, 43],
    "grid": {"method": ["kd", "tinybert", "cr_ild"], "data.max_train_examples": [100, 200]},
    "max_trials": 100,
}

# Values a user might put anywhere: junk of every YAML type, plus real names from other fields, which reach
# the cross-field checks (layer maps, depths, methods, stages) rather than the type checks.
MEANINGFUL = ["uniform", "last", "2,4", "1:9", "4:6", [1, 2], [6, 6, 6], "custom", "kd", "tinybert", "kdqat_map",
              "supplementary_ild", "ild_last", "sst2", "stsb", "mnli", "hidden_mse", "relation_kl", "ild", "pred",
              "qat", "minilm-l6", "bert-base-uncased", "teacher_copy", "truncate", "glue_dir", "hub", "ema", 2, 4,
              8, 3, 0, -1, 1, 6, 7, 13, 0.0, 1.0, 1e9]
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-3, 30), max_size=4),
    st.dictionaries(st.text(max_size=6), st.integers(-2, 9), max_size=2), st.sampled_from(MEANINGFUL),
).map(copy.deepcopy)  # a fresh object each draw: mutations must not alias MEANINGFUL's lists
NEW_KEYS = st.one_of(st.text(min_size=1, max_size=10),
                     st.sampled_from(["lr", "epochs", "layers", "learning_rate", "mixup", "consistency", "grid",
                                      "data", "seeds", "max_seq_length", "weight", "name", "losses"]))
GRID_KEYS = st.one_of(
    st.sampled_from(["task", "method", "layer_map", "consistency_weight", "bits", "act_bits", "map_coeff",
                     "output_coeff", "seed", "train.pred.lr", "train.ild.epochs", "train.qat.lr", "train.x.lr",
                     "data.max_seq_length", "data.nope", "teacher.finetune.epochs", "student.layers", "lr",
                     "train.pred", "student.layers.x", "train.ild.consistency.loss", "teacher"]),
    st.text(min_size=1, max_size=10))


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, prefix + (i,))
    return out


def get(node: Any, path: tuple) -> Any:
    for p in path:
        node = node[p]
    return node


@st.composite
def mutated(draw) -> tuple[dict, list[str]]:
    """The base config with 1-3 random mutations, and a description of each (for the failure report)."""
    raw = copy.deepcopy(BASE)
    done = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "replace", "meaningful", "delete", "add_key", "grid_axis"]))
        if op == "grid_axis":
            grid = raw.get("grid")
            if not isinstance(grid, dict):
                continue
            key = draw(GRID_KEYS)
            grid[key] = draw(st.one_of(st.lists(JUNK, max_size=3), JUNK))
            done.append(f"grid[{key!r}] = {grid[key]!r}")
            continue
        all_paths = paths(raw)
        if op == "add_key":
            parents = [()] + [p for p in all_paths if isinstance(get(raw, p), dict)]
            parent = draw(st.sampled_from(parents))
            key = draw(NEW_KEYS)
            get(raw, parent)[key] = draw(JUNK)
            done.append(f"add {parent + (key,)!r}")
            continue
        if not all_paths:
            continue
        path = draw(st.sampled_from(all_paths))
        parent = get(raw, path[:-1])
        if op == "delete":
            del parent[path[-1]]
            done.append(f"delete {path!r}")
        else:
            parent[path[-1]] = draw(st.sampled_from(MEANINGFUL).map(copy.deepcopy) if op == "meaningful" else JUNK)
            done.append(f"set {path!r} = {parent[path[-1]]!r}")
    return raw, done


def _top_key_of(path: str, raw: dict) -> bool:
    """Whether a ConfigError path points into the mutated dict (grid keys may contain dots)."""
    if path.startswith("grid.") and isinstance(raw.get("grid"), dict):
        key = re.sub(r"\[\d+\]$", "", path[len("grid."):])
        return key in raw["grid"]
    from kdplatform.config import format_path

    heads = [format_path((k,)) for k in raw]  # keys may hold dots or brackets themselves
    return any(path == h or path.startswith((h + ".", h + "[")) for h in heads)


def check(raw: dict, what: list[str]) -> None:
    try:
        spec = parse_spec(copy.deepcopy(raw), source="mutated.yaml")
        expand(spec)
    except ConfigError as e:
        msg = str(e)
        assert "mutated.yaml" in msg, (what, msg)
        assert e.path, f"{what}: a ConfigError without a YAML path: {msg}"
        assert e.path in msg
        assert _top_key_of(e.path, raw), f"{what}: path {e.path!r} is not in the mutated file: {msg}"
    except Exception as e:  # noqa: BLE001 - the property: nothing but ConfigError
        pytest.fail(f"{what}: {type(e).__name__} instead of ConfigError: {e}")


def test_base_config_is_valid():
    trials, _ = expand(parse_spec(copy.deepcopy(BASE), source="base.yaml"))
    assert len(trials) > 6


@pytest.mark.slow
@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutations_give_config_errors_naming_a_present_path(case):
    raw, what = case
    check(raw, what)


@settings(max_examples=150, deadline=None, database=None)
@given(st.dictionaries(NEW_KEYS, JUNK, max_size=5))
def test_arbitrary_top_level_mappings(raw):
    check(raw, [f"raw = {raw!r}"])


@pytest.mark.slow
@settings(max_examples=5, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated())
def test_mutated_files_through_the_cli(tmp_path_factory, case):
    raw, what = case
    tmp = tmp_path_factory.mktemp("prop_cli")
    (tmp / "mutated.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'm.db'}"}
    proc = subprocess.run([sys.executable, "-m", "kdplatform.cli", "run", "--dry-run", "mutated.yaml"], cwd=tmp,
                          env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode in (0, 2), f"{what}\n{out}"
    assert "Traceback" not in out, f"{what}\n{out}"
    if proc.returncode == 2:
        assert "mutated.yaml" in proc.stderr
    assert not (tmp / "m.db").exists() and not (tmp / "mlflow.db").exists()
