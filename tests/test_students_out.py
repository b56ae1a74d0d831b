"""Students out: each finished student run saves its best-dev (and last) model as a Hugging Face folder in
MLflow, `kdplatform export` copies it out, and the reloaded model reproduces the run's logged dev scores on
real SST-2 with the real MiniLM (quantized students through `load_student`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import write_yaml

TRIAL = """
name: out
task: sst2
method: kd
bits: {bits}
act_bits: {act_bits}
data: {{glue_dir: {glue}, source: glue_dir, max_train_examples: 100, max_dev_examples: 64,
        train_eval_examples: 32, max_seq_length: 32}}
teacher: {{model: minilm-l6, finetune: {{epochs: 1, max_steps: 2, batch_size: 16, lr: 1.0e-4}}}}
student: {{init: truncate, layers: 2}}
train:
  - {{name: pred, max_steps: 6, eval_every: 2, batch_size: 16, lr: 5.0e-4}}
speed: {{precision: fp32}}
output: {{keep_models: {keep}}}
"""


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdplatform.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One store for the module: the MiniLM teacher is fine-tuned once and found again by the second trial."""
    return f"sqlite:///{tmp_path_factory.mktemp('out_store') / 'mlflow.db'}"


def _run(tmp_path: Path, store: str, glue_dir: Path, *, bits: int = 32, act_bits: int = 32,
         keep: str = "best+last"):
    from kdplatform.config import load_trials
    from kdplatform.distill.worker import run_trial

    cfg = write_yaml(tmp_path / "trial.yaml", TRIAL.format(glue=glue_dir, bits=bits, act_bits=act_bits, keep=keep))
    _, trials, _ = load_trials(cfg)
    result = run_trial(trials[0], tracking_uri=store)
    return trials[0], MlflowClient(store).get_run(result.run_id)


def _dev_logits(model, trial) -> tuple[torch.Tensor, list]:
    """Logits and labels of the dev set, batched as the worker evaluates it (same loader, same batch size)."""
    from kdplatform.distill.data import eval_loader, prepare_data
    from kdplatform.distill.models import load_tokenizer

    data = prepare_data(trial, load_tokenizer(trial.teacher.model))
    batches = list(eval_loader(data.dev["dev"], max(trial.train[-1].batch_size, 64), data.collator))
    with torch.inference_mode():
        logits = [model(**{k: v for k, v in b.items() if k not in ("idx", "labels")}).logits for b in batches]
    return torch.cat(logits), torch.cat([b["labels"] for b in batches])


def _score(task: str, logits: torch.Tensor, labels: torch.Tensor) -> float:
    from kdplatform.distill.tasks import compute_metrics

    return compute_metrics(task, logits.numpy(), labels.numpy())["score"]


@pytest.mark.slow
@pytest.mark.e2e
def test_best_and_last_students_export_and_reproduce_the_logged_dev_scores(tmp_path, store, glue_dir, minilm):
    from transformers import AutoModelForSequenceClassification

    from kdplatform.distill.export import ExportError, export_run_model

    trial, run = _run(tmp_path, store, glue_dir)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags["kdp.model.best"].endswith("/model/best")
    assert run.data.tags["kdp.model.last"].endswith("/model/last")

    for which, key in (("best", "dev/best_score"), ("last", "dev/score")):
        dest = tmp_path / f"exported_{which}"
        if which == "best":  # through the command line once; the same function in-process for the rest
            proc = _cli("export", run_id, str(dest), "--tracking-uri", store, "--which", which, cwd=tmp_path)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        else:
            export_run_model(store, run_id, dest, which)
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in dest.iterdir()}
        model = AutoModelForSequenceClassification.from_pretrained(dest).eval()
        logits, labels = _dev_logits(model, trial)
        # dev/score's last value is the last student's; dev/best_score the best student's
        assert _score(trial.task, logits, labels) == pytest.approx(run.data.metrics[key], abs=1e-6), which
    n_params = sum(p.numel() for p in model.parameters())
    assert run.data.metrics["model/packed_mb"] == pytest.approx(n_params * 4 / 1e6)
    assert run.data.metrics["model/best_artifact_mb"] > n_params * 4 / 1e6  # the fp32 weights + tokenizer

    # one clear line, exit 2: an unknown run id; a run without a model (the teacher's), a non-empty folder
    proc = _cli("export", "0" * 32, str(tmp_path / "x"), "--tracking-uri", store, cwd=tmp_path)
    assert proc.returncode == 2 and "no run" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    teacher_run = MlflowClient(store).search_runs([run.info.experiment_id], "tags.`kdp.role` = 'teacher'")[0]
    with pytest.raises(ExportError, match="has no model/best artifact"):
        export_run_model(store, teacher_run.info.run_id, tmp_path / "y")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_run_model(store, run_id, tmp_path / "exported_best")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
@pytest.mark.e2e
def test_a_resumed_trial_still_saves_its_best_student(tmp_path, store, glue_dir, minilm):
    """The best-dev copy travels in the resume checkpoint: a trial killed after its best eval and resumed
    in a new process state saves that student, not only what it reaches after the restart."""
    from transformers import AutoModelForSequenceClassification

    from kdplatform.config import load_trials
    from kdplatform.distill.export import export_run_model
    from kdplatform.distill.worker import Callbacks, run_trial

    text = TRIAL.format(glue=glue_dir, bits=32, act_bits=32, keep="best").replace("max_steps: 6", "max_steps: 10")
    _, trials, _ = load_trials(write_yaml(tmp_path / "trial.yaml", text.replace("name: out", "name: out_resume")))
    ckpt = tmp_path / "ckpt"

    def save_then_crash(save, info):  # 7 steps an epoch: evals at steps 3 and 6 came before this checkpoint
        save(ckpt)
        raise RuntimeError("killed after the first checkpoint")

    with pytest.raises(RuntimeError, match="killed"):
        run_trial(trials[0], tracking_uri=store, callbacks=Callbacks(on_checkpoint=save_then_crash))
    result = run_trial(trials[0], tracking_uri=store, resume_dir=ckpt)
    run = MlflowClient(store).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    model = AutoModelForSequenceClassification.from_pretrained(
        export_run_model(store, result.run_id, tmp_path / "best")).eval()
    logits, labels = _dev_logits(model, trials[0])
    assert _score(trials[0].task, logits, labels) == pytest.approx(run.data.metrics["dev/best_score"], abs=1e-6)


def _packed_bits_2bit(model) -> int:
    """2-bit weights + one fp32 scale for the 6 linears of every encoder layer and the pooler; the rest fp32."""
    base = model.base_model
    low = [getattr(layer.get_submodule(p.rsplit(".", 1)[0]), p.rsplit(".", 1)[1]).weight
           for layer in base.encoder.layer
           for p in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense", "intermediate.dense", "output.dense")] + [base.pooler.dense.weight]
    low_ids = {id(w) for w in low}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in low_ids)
    return sum(w.numel() * 2 + 32 for w in low) + rest * 32


@pytest.mark.slow
@pytest.mark.e2e
def test_quantized_student_reloads_with_the_same_predictions(tmp_path, store, glue_dir, minilm):
    from transformers import AutoModelForSequenceClassification

    from kdplatform.distill.export import export_run_model, load_student, save_student
    from kdplatform.distill.models import load_tokenizer

    trial, run = _run(tmp_path, store, glue_dir, bits=2, act_bits=8, keep="best")
    assert run.info.status == "FINISHED" and "kdp.model.last" not in run.data.tags
    dest = export_run_model(store, run.info.run_id, tmp_path / "q")
    assert "load_student" in (dest / "README.md").read_text()
    q = json.loads((dest / "quantization.json").read_text())
    assert {k: q[k] for k in ("bits", "act_bits", "two_bit", "quantize_embeddings")} == \
        {"bits": 2, "act_bits": 8, "two_bit": "ternary", "quantize_embeddings": False}

    model = load_student(dest)
    logits, labels = _dev_logits(model, trial)
    assert _score(trial.task, logits, labels) == pytest.approx(run.data.metrics["dev/best_score"], abs=1e-6)
    # saved again and reloaded: exactly the same logits on the real dev batches
    again = load_student(save_student(model, load_tokenizer(str(dest)), tmp_path / "again", q))
    assert torch.equal(_dev_logits(again, trial)[0], logits)
    # the folder's weights are the latent full-precision ones: plain from_pretrained predicts differently
    plain = AutoModelForSequenceClassification.from_pretrained(dest).eval()
    assert not torch.allclose(_dev_logits(plain, trial)[0], logits, atol=1e-4)
    # packed size, from the formula: 2 bits per quantized weight + a scale per matrix, fp32 for the rest
    expected_mb = _packed_bits_2bit(plain) / 8 / 1e6
    assert q["packed_mb"] == pytest.approx(expected_mb)
    assert run.data.metrics["model/packed_mb"] == pytest.approx(expected_mb)


SWEEP = """
name: out_sweep
task: sst2
data: {{glue_dir: {glue}, source: glue_dir, max_train_examples: 100, max_dev_examples: 64,
        train_eval_examples: 32, max_seq_length: 32}}
teacher: {{model: minilm-l6, finetune: {{epochs: 1, max_steps: 2, batch_size: 16, lr: 1.0e-4}}}}
student: {{init: truncate, layers: 2}}
train:                         # 7 steps an epoch: ild ends with a checkpoint, pred makes one after epoch 1
  - {{name: ild, max_steps: 3, batch_size: 16, eval_every: 3}}
  - {{name: pred, max_steps: 9, batch_size: 16, eval_every: 3, lr: 5.0e-4}}
speed: {{precision: fp32}}
seeds: [42]
grid:
  method: [kd, ild_last]
resources: {{cpu: 1}}
max_concurrent_trials: 2
"""


@pytest.mark.slow
@pytest.mark.e2e
def test_sweep_leaves_loadable_students_and_no_ray_checkpoints(tmp_path, glue_dir, minilm, mlflow_uri):
    """The quickstart's shape, tiny: every student run's best model reproduces its best dev score, and the
    trials' Ray checkpoints (made at epoch ends, for resume) are gone once the trials finished."""
    from transformers import AutoModelForSequenceClassification

    from kdplatform.config import load_trials
    from kdplatform.distill.export import export_run_model

    spec = write_yaml(tmp_path / "sweep.yaml", SWEEP.format(glue=glue_dir))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}
    env.pop("PYTEST_CURRENT_TEST", None)
    proc = subprocess.run([sys.executable, "-m", "kdplatform.cli", "sweep", str(spec), "--tracking-uri",
                           mlflow_uri, "--num-cpus", "2", "--storage", str(tmp_path / "ray_results")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    _, trials, _ = load_trials(spec)
    c = MlflowClient(mlflow_uri)
    exp = c.get_experiment_by_name("out_sweep")
    students = c.search_runs([exp.experiment_id], "tags.`kdp.role` = 'student'")
    assert sorted(r.data.tags["kdp.method"] for r in students) == ["ild_last", "kd"]
    for run in students:
        assert run.info.status == "FINISHED"
        trial = next(t for t in trials if t.cfg_hash == run.data.tags["kdp.cfg_hash"])
        dest = export_run_model(mlflow_uri, run.info.run_id, tmp_path / run.info.run_id)
        model = AutoModelForSequenceClassification.from_pretrained(dest).eval()
        logits, labels = _dev_logits(model, trial)
        assert _score(trial.task, logits, labels) == pytest.approx(run.data.metrics["dev/best_score"], abs=1e-6)

    trial_dirs = [d for d in (tmp_path / "ray_results").glob("*/*") if (d / "result.json").is_file()]
    assert len(trial_dirs) == 2
    for d in trial_dirs:
        rows = [json.loads(line) for line in (d / "result.json").read_text().splitlines() if line.strip()]
        made = {r["checkpoint_dir_name"] for r in rows if r.get("checkpoint_dir_name")}
        assert made, f"{d.name}: the trial reported no checkpoint, so this test shows nothing"
        assert not list(d.glob("checkpoint_*")), f"{d.name} kept {sorted(p.name for p in d.glob('checkpoint_*'))}"


def test_keep_models_is_validated_and_left_out_of_the_config_hash(tmp_path, glue_dir):
    from kdplatform.config import ConfigError, load_trials

    cfg = write_yaml(tmp_path / "trial.yaml", TRIAL.format(glue=glue_dir, bits=32, act_bits=32, keep="best"))
    hashes = {load_trials(cfg, [f"output.keep_models={k}"])[1][0].cfg_hash for k in ("none", "best", "best+last")}
    assert len(hashes) == 1
    with pytest.raises(ConfigError, match="keep_models"):
        load_trials(cfg, ["output.keep_models=all"])
