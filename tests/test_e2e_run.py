"""End-to-end: `kdplatform run` on real GLUE data leaves runs that the plain mlflow client reads back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import write_yaml


def _cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdplatform.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=900)


TINY_TRIAL = """
name: e2e
task: {task}
method: cr_ild
consistency_weight: 0.5
data: {{glue_dir: {glue}, source: glue_dir, max_train_examples: 96, max_dev_examples: 64,
        train_eval_examples: 32, max_seq_length: 32}}
teacher: {{model: {teacher}, finetune: {{epochs: 1, max_steps: 4, batch_size: 16, lr: 1.0e-3}}}}
student: {{init: truncate, layers: 2}}
train:
  - {{name: ild, max_steps: 4, eval_every: 2, batch_size: 16, consistency: {{ramp: step}}}}
  - {{name: pred, max_steps: 4, eval_every: 2, batch_size: 16}}
"""  # ramp: step, since 4 steps are within the first epoch, where the paper's epoch ramp is 0 (refused)


def _runs(uri: str, experiment: str) -> list:
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} not created"
    return c.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_run_logs_a_complete_student_run(tmp_path, glue_dir, tiny_bert_dir, mlflow_uri):
    cfg = write_yaml(tmp_path / "trial.yaml", TINY_TRIAL.format(task="sst2", glue=glue_dir, teacher=tiny_bert_dir))
    proc = _cli("run", str(cfg), "--tracking-uri", mlflow_uri, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    runs = _runs(mlflow_uri, "e2e")
    roles = sorted(r.data.tags["kdp.role"] for r in runs)
    assert roles == ["student", "sweep", "teacher"]
    student = next(r for r in runs if r.data.tags["kdp.role"] == "student")
    assert student.info.status == "FINISHED"
    # stdout is a pipe: plain progress lines, for the teacher's fine-tune and each student stage (4 steps each)
    out = proc.stdout
    assert f"fine-tuning teacher sst2/{tiny_bert_dir} ..." in out, out
    name = student.info.run_name
    for label in (f"fine-tuning teacher sst2/{tiny_bert_dir}", f"{name} ild", f"{name} pred"):
        assert f"{label}: step 4/4 (100%)" in out, out
        assert f"{label}: step 1/4 (25%)" in out, out  # every 10%: here every step
    assert student.info.run_name == "sst2/cr_ild/w0.5/b32/s42"  # last layer by definition: no map in the name

    c = MlflowClient(mlflow_uri)
    for key in ("loss/relation_kl", "loss/consistency", "loss/logit_kd", "loss/total", "train/accuracy",
                "dev/accuracy", "dev/score", "train/distill_loss", "dev/distill_loss", "gap/accuracy",
                "gap/distill_loss", "dev/best_accuracy", "dev/best_score", "stage", "lr"):
        assert key in student.data.metrics, f"missing metric {key}"
    # eval every 2 steps over two stages of 4 steps: steps 2, 4 (ild) and 6, 8 (pred)
    steps = [m.step for m in c.get_metric_history(student.info.run_id, "train/distill_loss")]
    assert steps == [2, 4, 6, 8]
    assert [m.step for m in c.get_metric_history(student.info.run_id, "dev/accuracy")] == [6, 8]
    hist = {m.step: m.value for m in c.get_metric_history(student.info.run_id, "gap/accuracy")}
    train = {m.step: m.value for m in c.get_metric_history(student.info.run_id, "train/accuracy")}
    dev = {m.step: m.value for m in c.get_metric_history(student.info.run_id, "dev/accuracy")}
    assert hist[8] == pytest.approx(train[8] - dev[8])
    best = max(dev.values())
    assert student.data.metrics["dev/best_accuracy"] == pytest.approx(best)

    p = student.data.params
    assert p["task"] == "sst2" and p["method"] == "cr_ild" and p["layer_map"] == ""
    assert p["consistency_weight"] == "0.5" and p["train.ild.mixup"] == "True"
    assert p["train.ild.loss.relation_kl.layer_pairs"] == "[[2, 4]]"
    assert p["data.train_examples"] == "96"
    t = student.data.tags
    assert len(t["kdp.cfg_hash"]) == 16 and len(t["kdp.teacher_hash"]) == 16
    assert "mlflow.source.git.commit" in t and "kdp.git_commit" in t
    arts = [a.path for a in c.list_artifacts(student.info.run_id)]
    assert "config.yaml" in arts
    text = Path(c.download_artifacts(student.info.run_id, "config.yaml", str(tmp_path))).read_text()
    assert "cr_ild" in text and "relation_kl" in text


@pytest.mark.slow
def test_teacher_is_trained_once_and_reused(tmp_path, glue_dir, tiny_bert_dir, mlflow_uri):
    cfg = write_yaml(tmp_path / "trial.yaml", TINY_TRIAL.format(task="rte", glue=glue_dir, teacher=tiny_bert_dir))
    first = _cli("teacher", str(cfg), "--tracking-uri", mlflow_uri, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stdout + first.stderr
    second = _cli("run", str(cfg), "--tracking-uri", mlflow_uri, cwd=tmp_path, env={"OMP_NUM_THREADS": "2"})
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Warning" not in second.stderr, second.stderr  # e.g. MLflow's schema hint on the dataset input
    runs = _runs(mlflow_uri, "e2e")
    assert sorted(r.data.tags["kdp.role"] for r in runs) == ["student", "sweep", "teacher"]
    teacher = next(r for r in runs if r.data.tags["kdp.role"] == "teacher")
    student = next(r for r in runs if r.data.tags["kdp.role"] == "student")
    assert teacher.data.tags["kdp.teacher_hash"] == student.data.tags["kdp.teacher_hash"]
    assert Path(teacher.data.tags["kdp.checkpoint"], "kdp_teacher.json").is_file()
    # the thread count each ran with (it orders float sums): what a bit-for-bit rerun must match
    assert (teacher.data.tags["kdp.torch_threads"], student.data.tags["kdp.torch_threads"]) == ("1", "2")


def test_bad_config_exits_2_without_traceback_or_store(tmp_path):
    cfg = write_yaml(tmp_path / "bad.yaml", "name: x\ntask: sst2\ndata: {max_seq_lenght: 64}\n")
    proc = _cli("run", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "data.max_seq_lenght" in proc.stderr and "bad.yaml" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.e2e
def test_real_minilm_trial_learns(tmp_path, glue_dir, minilm, mlflow_uri):
    """The real pretrained MiniLM-L6 teacher and its 2-layer truncation on real SST-2 data."""
    cfg = write_yaml(tmp_path / "real.yaml", f"""
name: e2e-real
task: sst2
method: kd
data: {{glue_dir: {glue_dir}, source: glue_dir, max_train_examples: 1000, max_dev_examples: 300,
        train_eval_examples: 64, max_seq_length: 48}}
teacher: {{model: minilm-l6, finetune: {{epochs: 2, batch_size: 32, lr: 1.0e-4}}}}
student: {{init: truncate, layers: 2}}
train: [{{name: pred, epochs: 3, batch_size: 32, lr: 5.0e-4, eval_every: 32}}]
""")
    proc = _cli("run", str(cfg), "--tracking-uri", mlflow_uri, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = {r.data.tags["kdp.role"]: r for r in _runs(mlflow_uri, "e2e-real")}
    assert runs["teacher"].data.metrics["dev/accuracy"] > 0.7
    assert runs["student"].data.metrics["dev/best_accuracy"] > 0.6


@pytest.mark.slow
def test_same_seed_repeats_exactly_on_cpu(tmp_path, glue_dir, tiny_bert_dir):
    """Two runs of one config give identical loss and metric histories; another seed does not."""
    from kdplatform.config import load_trials
    from kdplatform.distill.worker import run_trial

    cfg = write_yaml(tmp_path / "t.yaml", TINY_TRIAL.format(task="sst2", glue=glue_dir, teacher=tiny_bert_dir)
                     + "seeds: [42, 7]\n")
    _, trials, _ = load_trials(cfg)
    histories = []
    for i, trial in enumerate([trials[0], trials[0], trials[1]]):
        uri = f"sqlite:///{tmp_path}/repeat{i}.db"
        res = run_trial(trial, tracking_uri=uri)
        c = MlflowClient(uri)
        histories.append({k: [m.value for m in c.get_metric_history(res.run_id, k)]
                          for k in ("loss/total", "loss/consistency", "dev/accuracy", "train/distill_loss")})
    assert histories[0] == histories[1]
    assert histories[0]["loss/total"] != histories[2]["loss/total"]


@pytest.mark.slow
@pytest.mark.e2e
def test_real_ternary_student_recovers_with_kdqat_unified(tmp_path, glue_dir, minilm, mlflow_uri):
    """KD-QAT on CPU: the fine-tuned MiniLM-L6 teacher, its ternary (2-bit weights, 8-bit activations) copy
    as student; dev accuracy well above chance and every KD-QAT term decreasing."""
    cfg = write_yaml(tmp_path / "qat.yaml", f"""
name: e2e-qat
task: sst2
method: kdqat_unified
bits: 2
act_bits: 8
data: {{glue_dir: {glue_dir}, source: glue_dir, max_train_examples: 1000, max_dev_examples: 300,
        train_eval_examples: 64, max_seq_length: 48}}
teacher: {{model: minilm-l6, finetune: {{epochs: 2, batch_size: 32, lr: 1.0e-4}}}}
student: {{init: teacher_copy, act_clip: 10.0}}
train: [{{name: qat, max_steps: 24, batch_size: 32, lr: 1.0e-4, eval_every: 8}}]
""")
    proc = _cli("run", str(cfg), "--tracking-uri", mlflow_uri, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    student = next(r for r in _runs(mlflow_uri, "e2e-qat") if r.data.tags["kdp.role"] == "student")
    c = MlflowClient(mlflow_uri)
    assert student.data.metrics["dev/best_accuracy"] > 0.65
    assert student.data.params["bits"] == "2" and student.data.params["act_bits"] == "8"
    assert student.data.metrics["quant/params"] > 0 and student.data.metrics["model/size_mb"] < 60
    for term in ("attention_map_kl", "attention_output_mse", "hidden_mse", "logit_kd"):
        values = [m.value for m in c.get_metric_history(student.info.run_id, f"loss/{term}")]
        assert len(values) == 3 and values[-1] < values[0], (term, values)


def _background_job() -> None:
    """As `cmd &` in a script (or nohup): a shell without job control starts it with SIGINT ignored."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_sigterm_ends_the_open_run_killed_not_running(stop, tmp_path, glue_dir, tiny_bert_dir, mlflow_uri):
    """`kill`/`timeout` on `kdplatform run` must not leave a run RUNNING forever; nor must `kill -INT` on a
    run started in the background of a script, where SIGINT arrives ignored (Python installs no handler)."""
    import signal
    import time

    cfg = write_yaml(tmp_path / "t.yaml", TINY_TRIAL.format(task="sst2", glue=glue_dir, teacher=tiny_bert_dir))
    env = {**os.environ, "KDP_FAULTS": "sst2/*:slow@0:1.0", "KDP_FAULTS_DIR": str(tmp_path / "faults")}
    proc = subprocess.Popen([sys.executable, "-m", "kdplatform.cli", "run", str(cfg), "--tracking-uri", mlflow_uri],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_background_job if stop == "SIGINT" else None)
    c = MlflowClient(mlflow_uri)
    deadline = time.time() + 300
    while time.time() < deadline:
        exp = c.get_experiment_by_name("e2e") if (tmp_path / "mlflow.db").exists() else None
        if exp and c.search_runs([exp.experiment_id], "tags.`kdp.role` = 'student'"):
            break
        time.sleep(0.5)
    proc.send_signal(getattr(signal, stop))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KILLED" in stderr
    students = _runs(mlflow_uri, "e2e")
    student = next(r for r in students if r.data.tags["kdp.role"] == "student")
    assert student.info.status == "KILLED", stderr[-3000:]


@pytest.mark.slow
def test_teacher_found_through_mlflow_is_reused_from_another_cache(tmp_path, glue_dir, tiny_bert_dir, mlflow_uri):
    """A second machine/cache with the same store finds the teacher run and does not fine-tune again."""
    cfg = write_yaml(tmp_path / "t.yaml", TINY_TRIAL.format(task="sst2", glue=glue_dir, teacher=tiny_bert_dir))
    first = _cli("teacher", str(cfg), "--tracking-uri", mlflow_uri, cwd=tmp_path,
                 env={"KDP_CACHE_DIR": str(tmp_path / "cache_a")})
    assert first.returncode == 0, first.stdout + first.stderr
    second = _cli("run", str(cfg), "--tracking-uri", mlflow_uri, cwd=tmp_path,
                  env={"KDP_CACHE_DIR": str(tmp_path / "cache_b")})
    assert second.returncode == 0, second.stdout + second.stderr
    roles = sorted(r.data.tags["kdp.role"] for r in _runs(mlflow_uri, "e2e"))
    assert roles == ["student", "sweep", "teacher"]
    linked = next((tmp_path / "cache_b" / "teachers").iterdir())
    assert linked.is_symlink() and linked.resolve().parent == (tmp_path / "cache_a" / "teachers").resolve()
