"""Command-line overrides (`kdplatform run|sweep FILE key.path=value ...`): set on the file's raw YAML before
validation, so they change exactly the settings they name, are validated like the file, and an error names
the override (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import GLUE_OK

from kdplatform.config import ConfigError, load_trials
from kdplatform.config.overrides import apply_overrides, parse_override

FILE = """\
name: ov
task: sst2
method: kd
data: {max_train_examples: 100, max_seq_length: 32}
teacher: {model: minilm-l6}
student: {layers: 2}
seeds: [42, 43]
"""


def write(tmp_path: Path, text: str = FILE, name: str = "f.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'm.db'}", "HF_HUB_OFFLINE": "1"}
    # a dry run reads the SST-2 files as a real run would: the corpus's small valid folder when no GLUE is set
    env.setdefault("KDP_GLUE_DIR", str(GLUE_OK))
    return subprocess.run([sys.executable, "-m", "kdplatform.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


def changed(a: dict[str, str], b: dict[str, str]) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


# ------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("text, key, value", [
    ("train.pred.lr=1e-4", "train.pred.lr", 1e-4), ("seeds=[1, 2]", "seeds", [1, 2]), ("bits=2", "bits", 2),
    ("name=my run", "name", "my run"), ("layer_map=1:3,2:6", "layer_map", "1:3,2:6"),
    ("data.max_train_examples=null", "data.max_train_examples", None), ("x.y=a=b", "x.y", "a=b"),
    ("speed.compile=true", "speed.compile", True)])
def test_values_are_read_as_yaml(text, key, value):
    ov = parse_override(text)
    assert (ov.key, ov.value) == (key, value)


def test_overrides_apply_in_order_and_address_stages_by_name():
    raw = {"train": [{"name": "ild", "epochs": 2}], "grid": {"method": ["kd"]}}
    apply_overrides(raw, ["train.ild.lr=1e-4", "train.pred.epochs=3", "grid.train.pred.lr=[1e-4]", "seeds=[1]",
                          "seeds=[2]", "teacher.finetune.epochs=1"])
    assert raw == {"train": [{"name": "ild", "epochs": 2, "lr": 1e-4}, {"name": "pred", "epochs": 3}],
                   "grid": {"method": ["kd"], "train.pred.lr": [1e-4]}, "seeds": [2],
                   "teacher": {"finetune": {"epochs": 1}}}


def test_run_overrides_change_exactly_the_named_values(tmp_path):
    """What is logged as MLflow params (flat_params) differs only in the overridden settings and the hash."""
    path = write(tmp_path)
    _, before, _ = load_trials(path)
    _, after, _ = load_trials(path, ["train.pred.lr=1e-4", "seeds=[1]"])
    assert [t.seed for t in before] == [42, 43] and [t.seed for t in after] == [1]
    old, new = before[0].flat_params(), after[0].flat_params()
    assert changed(old, new) == {"train.pred.lr", "seed", "cfg_hash"}
    assert (new["train.pred.lr"], new["seed"]) == ("0.0001", "1")
    assert new["teacher_hash"] == old["teacher_hash"]  # the student's lr and seed do not touch the teacher


def test_a_grid_axis_can_be_overridden_whole(tmp_path):
    path = write(tmp_path, FILE + "grid: {train.pred.lr: [1.0e-5, 2.0e-5]}\n")
    _, trials, _ = load_trials(path, ["grid.train.pred.lr=[3e-5]", "grid.method=[kd, tinybert]"])
    assert sorted((t.method, t.train[-1].lr) for t in trials if t.seed == 42) == [("kd", 3e-5), ("tinybert", 3e-5)]


@pytest.mark.slow
def test_the_cli_dry_run_shows_the_overridden_trials(tmp_path):
    write(tmp_path)
    r = cli(["run", "f.yaml", "train.pred.lr=1e-4", "seeds=[1]", "--dry-run"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 trial(s) from f.yaml" in r.stdout and "sst2/kd/b32/s1" in r.stdout
    assert "lr 0.0001" in r.stdout
    assert not (tmp_path / "m.db").exists()


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("override, fragment", [
    ("train.pred.lr=abc", "valid number"), ("train.pred.lrr=1", "unknown key 'lrr'"),
    ("seeds=[-1]", "greater than or equal to 0"), ("train.nope.lr=1", "no method has a stage 'nope'"),
    ("student.layers=12", "the teacher has only 6"), ("method=kdqat", "Input should be"),
    ("name=exp[/]", "no brackets"), ("lr", "not a key.path=value override"), ("seeds=", "no value after '='"),
    ("seeds=[1", "the value is not YAML"), ("teacher.model.x=1", "teacher.model is a value in the file"),
    ("grid.name=[a, b]", "not a grid axis"), ("seeds=*a", "the value is not YAML")])
def test_an_error_names_the_override(tmp_path, override, fragment):
    with pytest.raises(ConfigError) as e:
        load_trials(write(tmp_path), [override])
    assert f"override '{override}'" in str(e.value) and fragment in str(e.value), str(e.value)
    assert "f.yaml" in str(e.value)


def test_an_override_the_grid_would_replace_is_refused(tmp_path):
    path = write(tmp_path, FILE + "grid: {train.pred.lr: [1.0e-5, 2.0e-5]}\n")
    with pytest.raises(ConfigError, match=r"override 'train.pred.lr=1e-4': this key is a grid axis"):
        load_trials(path, ["train.pred.lr=1e-4"])


def test_an_error_elsewhere_says_which_overrides_were_given(tmp_path):
    path = write(tmp_path, FILE.replace("method: kd", "method: tinybert\nlayer_map: '1:9'"))
    with pytest.raises(ConfigError) as e:
        load_trials(path, ["seeds=[1]"])
    assert e.value.path == "layer_map" and "the command line also set 'seeds=[1]'" in str(e.value)


@pytest.mark.slow
def test_a_bad_override_exits_2_naming_it_through_run_and_sweep(tmp_path):
    write(tmp_path)
    for command in ("run", "sweep"):
        r = cli([command, "f.yaml", "seeds=[1]", "train.pred.lr=abc"], tmp_path)
        assert r.returncode == 2, r.stdout + r.stderr
        assert r.stderr.startswith("error: ") and "override 'train.pred.lr=abc'" in r.stderr, r.stderr
        assert "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "ray_results").exists()


def test_the_sweep_plan_takes_the_overrides(tmp_path):
    from kdplatform.sweep.expand import plan_sweep

    path = write(tmp_path)
    plain = plan_sweep(path, f"sqlite:///{tmp_path / 'm.db'}", query_done=False)
    plan = plan_sweep(path, f"sqlite:///{tmp_path / 'm.db'}", query_done=False, overrides=["seeds=[7]"])
    assert [t.seed for t in plan.trials] == [7]
    assert plan.spec_hash != plain.spec_hash  # another Ray experiment folder: --resume needs the same overrides


# --------------------------------------------------------------------------------- a real run's params
@pytest.mark.slow
def test_the_overridden_values_are_the_runs_mlflow_params(tmp_path, glue_dir, tiny_bert_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    write(tmp_path, f"""\
        name: ov-e2e
        task: sst2
        method: kd
        data: {{glue_dir: {glue_dir}, source: glue_dir, max_train_examples: 48, max_dev_examples: 32,
                train_eval_examples: 16, max_seq_length: 32}}
        teacher: {{model: {tiny_bert_dir}, finetune: {{epochs: 1, max_steps: 2, batch_size: 16}}}}
        student: {{init: truncate, layers: 2}}
        train: [{{name: pred, max_steps: 2, eval_every: 2, batch_size: 16, lr: 5.0e-5}}]
        """)
    r = subprocess.run([sys.executable, "-m", "kdplatform.cli", "run", "f.yaml", "train.pred.lr=1e-4", "seeds=[1]",
                        "--tracking-uri", uri], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ov-e2e")
    student = next(run for run in client.search_runs([exp.experiment_id]) if run.data.tags["kdp.role"] == "student")
    assert student.data.params["train.pred.lr"] == "0.0001" and student.data.params["seed"] == "1"
    assert student.info.run_name == "sst2/kd/b32/s1"
