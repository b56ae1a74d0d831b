"""The sweep dry run's "this machine" section: GPUs asked for but not visible (and the real run's refusal, or
`--num-gpus 0` on the CPU), hub downloads under offline mode, estimated hours from the throughput table, disk.

The hour and parameter figures are checked against computations written here from their definitions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification
from typer.testing import CliRunner

from conftest import write_yaml
from kdplatform.cli import app
from kdplatform.config import load_trials
from kdplatform.sweep import machine

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
GPU_SWEEP = ("name: g\ntask: sst2\nmethod: kd\ndata: {source: hub, max_seq_length: 128}\n"
             "teacher: {model: bert-base-uncased}\nstudent: {layers: 6}\nresources: {cpu: 1, gpu: 0.5}\n")


@pytest.fixture()
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setenv("KDP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("KDP_GLUE_DIR", raising=False)
    return tmp_path


@no_gpu
def test_dry_run_warns_of_missing_gpus_and_offline_hub_and_estimates_hours(work):
    spec = write_yaml(work / "g.yaml", GPU_SWEEP)
    out = CliRunner().invoke(app, ["sweep", str(spec), "--dry-run"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    gpu = next(line for line in lines if "warning GPUs" in line)
    assert "none visible" in gpu and "0.5 GPU" in gpu and "--num-gpus 0" in out.output
    hub = next(line for line in lines if "warning hub" in line)
    assert "google-bert/bert-base-uncased" in hub and "sst2" in hub and "HF_HUB_OFFLINE" in hub
    cpu_hours = next(line for line in lines if "CPU hours" in line)
    assert "teachers" in cpu_hours and "students" in cpu_hours and "bench_throughput.py" in cpu_hours
    gpu_hours = next(line for line in lines if "GPU hours" in line)
    assert "no GPU measurement" in gpu_hours
    assert any(line.startswith("disk") or "warning disk" in line for line in lines)
    assert sorted(p.name for p in work.iterdir()) == ["g.yaml"], "a dry run wrote something"


@no_gpu
def test_the_real_sweep_refuses_gpu_trials_without_a_gpu_and_writes_nothing(work):
    spec = write_yaml(work / "g.yaml", GPU_SWEEP)
    out = CliRunner().invoke(app, ["sweep", str(spec)], catch_exceptions=False)
    assert out.exit_code == 2, out.output
    assert "torch sees no GPU" in out.stderr and "--num-gpus 0" in out.stderr, out.stderr
    assert sorted(p.name for p in work.iterdir()) == ["g.yaml"]


def test_num_gpus_zero_drops_every_gpu_request(work):
    spec, _, _ = load_trials(write_yaml(work / "g.yaml", GPU_SWEEP))
    cpu = machine.cpu_only_resources(spec)
    assert (cpu.resources.gpu, cpu.resources.teacher_gpu, cpu.resources.cpu) == (0, 0, 1)
    assert machine.gpu_refusal(spec, None, 0) is None and machine.gpu_refusal(spec, "auto", None) is None


def test_estimated_hours_follow_the_table(work):
    """A kd trial on 1,000 SST-2 examples: 4 prediction epochs, teacher outputs cached (one teacher pass),
    eval every 50 steps on 872 dev + 512 train-eval examples; the teacher: 3 epochs, one dev eval per epoch."""
    text = GPU_SWEEP.replace("max_seq_length: 128}", "max_seq_length: 128, max_train_examples: 1000}")
    _, trials, _ = load_trials(write_yaml(work / "g.yaml", text))
    t = trials[0]
    table = {"cpu": {"source": "s", "rows": [
        {"layers": 12, "width": 768, "seq": 128, "train_examples_per_s": 2.0, "forward_examples_per_s": 8.0},
        {"layers": 6, "width": 768, "seq": 128, "train_examples_per_s": 4.0, "forward_examples_per_s": 16.0}]}}
    stage = t.train[0]
    assert (stage.epochs, stage.batch_size, stage.eval_every) == (4, 16, 50)
    seen = 1000 * 4
    evals = seen // (50 * 16)
    want = seen / 4.0 + 1000 / 8.0 + evals * (872 + 512) / 16.0
    assert machine.student_seconds(t, table, "cpu") == pytest.approx(want)
    ft = t.teacher.finetune
    assert machine.teacher_seconds(t, table, "cpu") == pytest.approx(1000 * ft.epochs / 2.0 + ft.epochs * 872 / 8.0)
    assert machine.student_seconds(t, table, "cuda") is None, "no GPU rows: no GPU estimate"


def test_data_not_local_falls_back_to_max_seq_length_as_an_upper_bound(work):
    _, trials, _ = load_trials(write_yaml(work / "g.yaml", GPU_SWEEP))  # hub data, a hub model, offline
    lengths = machine.mean_lengths(trials[0])
    assert (lengths.train, lengths.dev, lengths.measured) == (128, 128, False)


def test_local_data_prices_the_mean_token_length_not_max_seq_length(work, glue_dir, minilm):
    """Batches are length-grouped, so a trial costs what its examples' mean length costs: CoLA sentences are
    about 11 tokens, far below max_seq_length 128. Checked against the whole train split tokenized here."""
    text = (f"name: c\ntask: cola\nmethod: kd\ndata: {{glue_dir: {glue_dir}, source: glue_dir, max_seq_length: 128,"
            f" max_train_examples: 1000}}\nteacher: {{model: {minilm}}}\nstudent: {{layers: 3}}\n")
    _, trials, _ = load_trials(write_yaml(work / "c.yaml", text))
    lengths = machine.mean_lengths(trials[0])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    rows = [line.split("\t") for line in (glue_dir / "CoLA" / "train.tsv").read_text().splitlines()]
    ids = tokenizer([r[3] for r in rows], truncation=True, max_length=128)["input_ids"]
    assert lengths.measured
    assert lengths.train == pytest.approx(sum(map(len, ids)) / len(ids), abs=0.5)  # a 2,000-sentence sample
    assert 8 < lengths.dev < 16
    table = {"cpu": {"source": "s", "rows": [
        {"layers": 12, "width": 384, "seq": 128, "train_examples_per_s": 2.0, "forward_examples_per_s": 8.0}]}}
    at_mean = machine.student_seconds(trials[0], table, "cpu")
    padded = machine.student_seconds(trials[0].model_copy(update={"data": trials[0].data.model_copy(
        update={"glue_dir": None, "source": "hub"})}), table, "cpu")
    assert at_mean < padded / 5, "11-token sentences priced as if padded to 128"


def test_an_unmeasured_size_is_scaled_by_flops_from_the_nearest_row():
    table = {"cpu": {"rows": [{"layers": 6, "width": 384, "seq": 64, "train_examples_per_s": 30.0,
                               "forward_examples_per_s": 90.0}]}}
    rate = machine.rate_for(table, "cpu", 3, 384, 64)  # half the layers: twice the speed
    assert rate.train == pytest.approx(60.0) and rate.forward == pytest.approx(180.0)


def test_the_shipped_throughput_table_states_its_source_and_has_cpu_rows():
    table = json.loads(machine.THROUGHPUT_TABLE.read_text())
    assert "bench_throughput.py" in table["cpu"]["source"]
    sizes = {(r["layers"], r["width"], r["seq"]) for r in table["cpu"]["rows"]}
    assert {(12, 768, 128), (6, 768, 128), (2, 384, 64)} <= sizes
    assert all(r["train_examples_per_s"] > 0 and r["forward_examples_per_s"] > 0 for r in table["cpu"]["rows"])


@pytest.mark.parametrize("layers, width", [(2, 128), (1, 64)])
def test_parameter_count_matches_a_real_bert_classifier(layers, width):
    model = BertForSequenceClassification(BertConfig(num_hidden_layers=layers, hidden_size=width,
                                                     num_attention_heads=2, intermediate_size=4 * width))
    real = sum(p.numel() for p in model.parameters())
    assert machine.parameters(layers, width) == pytest.approx(real, rel=1e-3)
