"""The config layer (kdplatform.config): expansion of grids into trials, run names, collapse of unused axes, hashes,
and every rejection naming the file and the YAML path of the bad value. Plus the CLI's exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import GLUE_OK

from kdplatform.config import ConfigError, TrialConfig, load_trials, resolve_trial

BASE = """\
name: test
task: sst2
data:
  max_train_examples: 1500
  max_seq_length: 64
teacher:
  model: minilm-l6
  finetune: {epochs: 3, lr: 1.0e-4, batch_size: 32}
student:
  init: truncate
  layers: 2
"""

QUICKSTART_LIKE = BASE + """\
train:
  - {name: ild, epochs: 2, lr: 1.0e-4, batch_size: 32, eval_every: 25}
  - {name: pred, epochs: 2, lr: 1.0e-4, batch_size: 32, eval_every: 25}
seeds: [42, 43]
grid:
  method: [kd, tinybert, ild_last, cr_ild]
  consistency_weight: [0.1, 0.5]
"""


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def rejected(tmp_path: Path, text: str) -> ConfigError:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_trials(p)
    err = e.value
    assert str(p) in str(err), "the message names the file"
    assert err.path in str(err)
    return err


# ------------------------------------------------------------------------------------------ expansion
def test_quickstart_like_file_expands_grid_times_seeds_with_collapse(tmp_path):
    spec, trials, notes = load_trials(write(tmp_path, QUICKSTART_LIKE))
    assert spec.seeds == [42, 43]
    # 4 methods x 2 weights x 2 seeds = 16 combos; the weight means nothing to kd/tinybert/ild_last,
    # so their 2 weights collapse to one: (3 x 1 + 1 x 2) x 2 seeds = 10 trials, 6 collapsed
    assert len(trials) == 10
    names = sorted(t.run_name for t in trials)
    assert names == sorted(
        [f"sst2/{m}/b32/s{s}" for m in ("kd", "ild_last") for s in (42, 43)]
        + [f"sst2/tinybert/uniform/b32/s{s}" for s in (42, 43)]
        + [f"sst2/cr_ild/w{w}/b32/s{s}" for w in ("0.1", "0.5") for s in (42, 43)])
    assert len({t.cfg_hash for t in trials}) == 10
    text = " | ".join(notes)
    for m in ("kd", "tinybert", "ild_last"):
        assert f"2 trial(s) collapsed: consistency_weight has no effect on method {m}" in notes, text
    assert "cr_ild" not in text
    assert sum(int(n.split()[0]) for n in notes) == 6


def test_resolved_trial_contents(tmp_path):
    _, trials, _ = load_trials(write(tmp_path, QUICKSTART_LIKE))
    by = {t.run_name: t for t in trials}
    cr = by["sst2/cr_ild/w0.1/b32/s42"]
    assert (cr.student_layers, cr.teacher_layers, cr.consistency_weight) == (2, 6, 0.1)
    ild, pred = cr.train
    assert (ild.name, ild.mixup, ild.epochs, ild.lr, ild.eval_every) == ("ild", True, 2, 1e-4, 25)
    assert [(l.name, l.layer_pairs, l.relations) for l in ild.losses] == [("relation_kl", [(2, 6)], ["q", "k", "v"])]
    assert ild.consistency is not None and ild.consistency.weight == 0.1
    assert (ild.consistency.losses, ild.consistency.ramp, ild.consistency.target) == (
        ["attention_kl", "hidden_mse"], "epoch", "no_grad")  # the paper's D and ramp
    assert [(l.name, l.temperature) for l in pred.losses] == [("logit_kd", 2.0)]  # CR-ILD stage 2: T=2, no CE
    tb = by["sst2/tinybert/uniform/b32/s42"]
    hid, att = tb.train[0].losses
    assert hid.layer_pairs == [(0, 0), (1, 3), (2, 6)] and att.layer_pairs == [(1, 3), (2, 6)]
    kd = by["sst2/kd/b32/s43"]
    assert kd.consistency_weight is None and kd.layer_map is None and [s.name for s in kd.train] == ["pred"]


def test_single_trial_file_is_one_trial(tmp_path):
    _, trials, notes = load_trials(write(tmp_path, BASE + "method: kd\n"))
    assert len(trials) == 1 and notes == [] and trials[0].run_name == "sst2/kd/b32/s42"


def test_dotted_grid_keys(tmp_path):
    text = BASE + """\
method: kd
grid:
  train.pred.lr: [1.0e-4, 3.0e-5]
  data.max_train_examples: [100, 200, 300]
"""
    _, trials, _ = load_trials(write(tmp_path, text))
    assert len(trials) == 6
    got = sorted((t.train[0].lr, t.data.max_train_examples) for t in trials)
    assert got == sorted((lr, n) for lr in (1e-4, 3e-5) for n in (100, 200, 300))
    # the other stage settings keep the preset's defaults (CR-ILD stage 2: batch 16, 4 epochs)
    assert {(t.train[0].batch_size, t.train[0].epochs) for t in trials} == {(16, 4)}
    # the teacher is fine-tuned on the train data: its hash follows max_train_examples, not the student lr
    assert len({t.teacher_hash for t in trials}) == 3


def test_dotted_grid_key_merges_into_an_existing_stage_override(tmp_path):
    text = BASE + """\
method: kd
train:
  - {name: pred, epochs: 1, batch_size: 8}
grid:
  train.pred.lr: [1.0e-4, 3.0e-5]
"""
    _, trials, _ = load_trials(write(tmp_path, text))
    assert sorted((t.train[0].lr, t.train[0].epochs, t.train[0].batch_size) for t in trials) == \
        [(3e-5, 1, 8), (1e-4, 1, 8)]


def test_cfg_hash_stable_and_sensitive(tmp_path):
    a = load_trials(write(tmp_path, QUICKSTART_LIKE, "a.yaml"))[1]
    b = load_trials(write(tmp_path, QUICKSTART_LIKE, "b.yaml"))[1]
    assert [t.cfg_hash for t in a] == [t.cfg_hash for t in b]
    # name (the MLflow experiment) and tracking_uri do not change results: same hash
    c = load_trials(write(tmp_path, QUICKSTART_LIKE.replace("name: test", "name: other\ntracking_uri: sqlite:///x.db"),
                          "c.yaml"))[1]
    assert [t.cfg_hash for t in a] == [t.cfg_hash for t in c]
    # a changed hyper-parameter changes every hash
    d = load_trials(write(tmp_path, QUICKSTART_LIKE.replace("max_seq_length: 64", "max_seq_length: 32"),
                          "d.yaml"))[1]
    assert not ({t.cfg_hash for t in a} & {t.cfg_hash for t in d})
    e = load_trials(write(tmp_path, QUICKSTART_LIKE.replace("{name: pred, epochs: 2", "{name: pred, epochs: 3"),
                          "e.yaml"))[1]
    assert not ({t.cfg_hash for t in a} & {t.cfg_hash for t in e})


def test_teacher_hash_shared_across_methods_and_seeds_but_not_teacher_finetune(tmp_path):
    a = load_trials(write(tmp_path, QUICKSTART_LIKE, "a.yaml"))[1]
    assert len({t.teacher_hash for t in a}) == 1  # student method, weight and seed do not matter
    other_lr = QUICKSTART_LIKE.replace("lr: 1.0e-4, batch_size: 32}", "lr: 5.0e-5, batch_size: 32}")  # teacher only
    assert other_lr.count("5.0e-5") == 1
    b = load_trials(write(tmp_path, other_lr, "b.yaml"))[1]
    assert len({t.teacher_hash for t in b}) == 1
    assert a[0].teacher_hash != b[0].teacher_hash
    # and the students' hashes change with their teacher
    assert not ({t.cfg_hash for t in a} & {t.cfg_hash for t in b})


def test_resolve_trial_from_a_local_teacher_folder(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text('{"model_type": "bert", "num_hidden_layers": 4}')
    cfg = TrialConfig(task="rte", method="minilm", teacher={"model": str(tmp_path / "t")},
                      student={"layers": 2})
    trial = resolve_trial(cfg)
    assert (trial.teacher_layers, trial.student_layers) == (4, 2)
    assert trial.train[0].losses[0].layer_pairs == [(1, 2), (2, 4)]
    assert trial.train[0].epochs == 20  # CR-ILD ILD epochs for RTE


# ------------------------------------------------------------------------------------------ rejection
def test_unknown_top_level_key(tmp_path):
    err = rejected(tmp_path, BASE + "method: kd\nlearning_rate: 1.0e-4\n")
    assert err.path == "learning_rate" and "unknown key 'learning_rate'" in str(err)


def test_unknown_nested_key_typo(tmp_path):
    err = rejected(tmp_path, BASE.replace("max_seq_length: 64", "max_seq_lenght: 64"))
    assert err.path == "data.max_seq_lenght" and "unknown key" in str(err)
    assert err.line == 5 and f":{err.line}:" in str(err)


def test_wrong_type(tmp_path):
    err = rejected(tmp_path, BASE.replace("max_seq_length: 64", "max_seq_length: long"))
    assert err.path == "data.max_seq_length" and "integer" in str(err)


def test_negative_lr_in_a_train_stage(tmp_path):
    err = rejected(tmp_path, BASE + "method: kd\ntrain:\n  - {name: pred, lr: -1.0e-4}\n")
    assert err.path == "train[0].lr" and "greater than 0" in str(err)


def test_negative_teacher_finetune_lr(tmp_path):
    err = rejected(tmp_path, BASE.replace("lr: 1.0e-4, batch_size", "lr: -1.0e-4, batch_size"))
    assert err.path == "teacher.finetune.lr"


def test_unsupported_task(tmp_path):
    err = rejected(tmp_path, BASE.replace("task: sst2", "task: imdb"))
    assert err.path == "task" and "imdb" in str(err)


def test_unsupported_method_in_grid_names_the_grid_entry(tmp_path):
    err = rejected(tmp_path, BASE + "grid:\n  method: [kd, distilbert, tinybert]\n")
    assert err.path == "grid.method[1]" and "distilbert" in str(err)


def test_layer_index_beyond_teacher_depth_names_the_teacher(tmp_path):
    err = rejected(tmp_path, BASE + "method: tinybert\nlayer_map: '1:3,2:9'\n")
    assert err.path == "layer_map"
    assert "teacher layer 9" in str(err) and "1..6" in str(err)


def test_layer_index_beyond_student_depth_names_the_student(tmp_path):
    err = rejected(tmp_path, BASE + "method: tinybert\nlayer_map: '1:3,3:6'\n")
    assert err.path == "layer_map" and "student layer 3" in str(err) and "1..2" in str(err)


def test_layer_map_of_a_loss_term_names_that_term(tmp_path):
    text = BASE + """\
method: custom
train:
  - name: mine
    losses:
      - {name: logit_kd}
      - {name: hidden_mse, layer_map: '2,7'}
"""
    err = rejected(tmp_path, text)
    assert err.path == "train[0].losses[1].layer_map" and "teacher layer 7" in str(err)


def test_bad_layer_map_in_grid_names_the_grid_entry(tmp_path):
    err = rejected(tmp_path, BASE + "method: tinybert\ngrid:\n  layer_map: [uniform, '1:9']\n")
    assert err.path == "grid.layer_map[1]"


def test_bad_value_on_a_dotted_stage_axis_names_the_grid_entry(tmp_path):
    err = rejected(tmp_path, BASE + "method: kd\ngrid:\n  train.pred.lr: [1.0e-4, -1.0]\n")
    assert err.path == "grid.train.pred.lr[1]"


def test_bad_grid_value_points_at_the_grid_line_not_line_1(tmp_path):
    err = rejected(tmp_path, BASE + "grid:\n  method: [kd, distilbert]\n")
    grid_line = (BASE + "grid:\n").count("\n") + 1
    assert err.line in (None, grid_line)


def test_grid_over_seed_is_not_silently_dropped(tmp_path):
    p = write(tmp_path, BASE + "method: kd\ngrid:\n  seed: [1, 2, 3]\n")
    try:
        _, trials, _ = load_trials(p)
    except ConfigError as e:  # refusing it ("use seeds: [...]") is fine too
        assert e.path.startswith("grid.seed")
        return
    assert sorted(t.seed for t in trials) == [1, 2, 3]


def test_unknown_grid_key_names_the_grid_entry(tmp_path):
    err = rejected(tmp_path, BASE + "method: kd\ngrid:\n  methd: [kd]\n")
    assert err.path == "grid.methd[0]" and "unknown key 'methd'" in str(err)


def test_bad_value_on_a_dotted_data_axis_names_the_grid_entry(tmp_path):
    err = rejected(tmp_path, BASE + "method: kd\ngrid:\n  data.max_seq_length: [64, 4]\n")
    assert err.path == "grid.data.max_seq_length[1]"


def test_student_deeper_than_teacher(tmp_path):
    err = rejected(tmp_path, BASE.replace("layers: 2", "layers: 8") + "method: kd\n")
    assert err.path == "student.layers" and "8 layers" in str(err) and "only 6" in str(err)


def test_yaml_syntax_error_has_a_line_number(tmp_path):
    text = "task: sst2\nmethod: kd\ndata: {max_seq_length: 64\nseeds: [42]\n"
    err = rejected(tmp_path, text)
    assert "YAML syntax error" in str(err)
    assert isinstance(err.line, int) and 3 <= err.line <= 5
    assert f"sweep.yaml:{err.line}:" in str(err)


def test_yaml_bad_indentation_has_a_line_number(tmp_path):
    err = rejected(tmp_path, "task: sst2\ndata:\n  max_seq_length: 64\n   source: auto\n")
    assert "YAML syntax error" in str(err) and err.line == 4


def test_duplicate_key(tmp_path):
    err = rejected(tmp_path, "task: sst2\nmethod: kd\ntask: rte\n")
    assert "duplicate key 'task'" in str(err) and "first on line 1" in str(err) and err.line == 3


def test_duplicate_nested_key(tmp_path):
    err = rejected(tmp_path, BASE.replace("max_seq_length: 64", "max_seq_length: 64\n  max_seq_length: 32"))
    assert "duplicate key 'max_seq_length'" in str(err) and err.line == 6


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path, text):
    err = rejected(tmp_path, text)
    assert "empty" in str(err)


def test_top_level_not_a_mapping(tmp_path):
    err = rejected(tmp_path, "- task: sst2\n")
    assert "mapping" in str(err)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_trials(tmp_path / "nope.yaml")


def test_empty_grid_axis(tmp_path):
    err = rejected(tmp_path, BASE + "grid:\n  method: []\n")
    assert err.path == "grid.method" and "non-empty" in str(err)


def test_grid_over_max_trials(tmp_path):
    err = rejected(tmp_path, BASE + "max_trials: 5\nseeds: [42, 43]\ngrid:\n  method: [kd, tinybert, minilm]\n")
    assert err.path == "grid" and "6 trials" in str(err) and "max_trials=5" in str(err)


def test_consistency_section_with_zero_weight(tmp_path):
    text = BASE + "method: cr_ild\nconsistency_weight: 0\ntrain:\n  - name: ild\n    consistency: {target: ema}\n"
    err = rejected(tmp_path, text)
    assert err.path == "consistency_weight" and "never contribute" in str(err)


def test_cr_ild_zero_weight_without_section_is_the_mixup_only_ablation(tmp_path):
    _, trials, _ = load_trials(write(tmp_path, BASE + "method: cr_ild\nconsistency_weight: 0\n"))
    (t,) = trials
    assert t.train[0].mixup and t.train[0].consistency is None


def test_consistency_without_mixup_is_refused(tmp_path):
    err = rejected(tmp_path, BASE + "method: cr_ild\ntrain:\n  - {name: ild, mixup: false}\n")
    assert err.path == "train[0].mixup" and "never fires" in str(err)


def test_supplementary_ild_without_supplementary_tasks(tmp_path):
    err = rejected(tmp_path, BASE + "method: supplementary_ild\n")
    assert err.path == "data.supplementary_tasks"


def test_supplementary_ild_with_tasks_is_fine(tmp_path):
    text = BASE.replace("max_seq_length: 64", "max_seq_length: 64\n  supplementary_tasks: [qnli, mrpc]")
    _, (t,), _ = load_trials(write(tmp_path, text + "method: supplementary_ild\n"))
    assert t.train[0].supplementary


def test_unknown_stage_name(tmp_path):
    err = rejected(tmp_path, BASE + "method: kd\ntrain:\n  - {name: pred}\n  - {name: ildd, lr: 1.0e-4}\n")
    assert err.path == "train[1].name" and "ildd" in str(err)


def test_teacher_model_with_unknown_depth(tmp_path):
    err = rejected(tmp_path, BASE.replace("model: minilm-l6", "model: some-org/unknown-bert") + "method: kd\n")
    assert err.path == "teacher.model" and "unknown depth" in str(err)


def test_zero_loss_weight_is_refused(tmp_path):
    text = BASE + "method: custom\ntrain:\n  - name: mine\n    losses: [{name: logit_kd, weight: 0}]\n"
    err = rejected(tmp_path, text)
    assert err.path == "train[0].losses[0].weight"


# ------------------------------------------------------------------------------------------------ CLI
def _cli(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store would be ./mlflow.db in cwd
    # a dry run reads the SST-2 files as a real run would: the corpus's small valid folder when no GLUE is set
    env.setdefault("KDP_GLUE_DIR", str(GLUE_OK))
    script = Path(sys.executable).parent / "kdplatform"  # the console script of this environment
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "kdplatform.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("bad", [
    BASE + "method: kd\nlearning_rate: 1\n",
    BASE + "method: tinybert\nlayer_map: '1:9'\n",
    "task: sst2\ndata: {max_seq_length: 64\n",
], ids=["unknown-key", "layer-beyond-teacher", "yaml-syntax"])
@pytest.mark.slow
def test_cli_run_bad_yaml_exits_2_without_traceback_or_store(tmp_path, bad):
    write(tmp_path, bad, "BAD.yaml")
    r = _cli(["run", "BAD.yaml"], cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out
    assert "error" in out and "BAD.yaml" in out
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_cli_run_dry_run_of_a_valid_file_lists_trials_and_writes_nothing(tmp_path):
    write(tmp_path, QUICKSTART_LIKE, "ok.yaml")
    r = _cli(["run", "--dry-run", "ok.yaml"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "10 trial(s)" in r.stdout and "collapsed" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.yaml"]
