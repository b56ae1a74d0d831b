"""Every encoder family of the family table (`kdplatform/families.py`) on tiny random models built from a config:
each row against the installed transformers, attention maps equal to the family's own `output_attentions`,
QAT of its linears with saved students reloading to identical predictions, every method of `kdplatform
methods` ending FINISHED with dev scores, and a model of another family refused at file-check time."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from conftest import REPO, write_yaml
from family_models import LAYERS, save_tiny, tiny_config
from kdplatform.config import PRESETS, load_trials
from kdplatform.distill.export import load_student, save_student
from kdplatform.distill.losses import masked_log_softmax, masked_scores
from kdplatform.distill.models import encoder_layers, load_classifier, load_tokenizer
from kdplatform.distill.quant import QuantLinear, quantize_bert_
from kdplatform.distill.taps import attention_feature_names, forward_features, tap_features
from kdplatform.families import FAMILIES

FAMILY_NAMES = list(FAMILIES)
POSITION_TERMS = {"mpnet", "deberta-v2", "modernbert"}  # position terms inside the scores
# The whole-trial test per family is slow (6-15 s each); the fast subset keeps one family per way of reading
# maps (recomputed from Q/K, read at the probabilities' dropout, recorded by the attention function).
FAST_TRIAL_FAMILIES = {"bert", "mpnet", "modernbert"}
TRIAL_FAMILIES = [f if f in FAST_TRIAL_FAMILIES else pytest.param(f, marks=pytest.mark.slow) for f in FAMILY_NAMES]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, minilm) -> dict[str, Path]:
    """One tiny random model folder per family (4 layers, width 32), with the MiniLM tokenizer."""
    root = tmp_path_factory.mktemp("families")
    return {f: save_tiny(f, root / f, minilm) for f in FAMILY_NAMES}


@pytest.fixture(scope="session")
def family_teachers(tmp_path_factory, family_dirs) -> dict[str, Path]:
    """Each tiny model as a 2-label classifier checkpoint (`teacher.checkpoint`: no fine-tune before a trial)."""
    root = tmp_path_factory.mktemp("family_teachers")
    for family, folder in family_dirs.items():
        torch.manual_seed(0)
        load_classifier(str(folder), 2).save_pretrained(root / family)
        load_tokenizer(str(folder)).save_pretrained(root / family)
    return {f: root / f for f in family_dirs}


@pytest.fixture(scope="session")
def family_store(tmp_path_factory) -> str:
    """One MLflow store for the family trials (a fresh SQLite store costs seconds to create)."""
    return f"sqlite:///{tmp_path_factory.mktemp('family_store') / 'mlflow.db'}"


def _batch(tokenizer_dir: Path, family: str) -> dict[str, torch.Tensor]:
    """Three padded sentences (16, 10 and 5 valid tokens) as the collator gives them."""
    torch.manual_seed(1)
    ids = torch.randint(1000, 3000, (3, 16))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[1, 10:], mask[2, 5:] = 0, 0
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _inputs(batch: dict, family: str) -> dict:
    return {k: v for k, v in batch.items() if k != "token_type_ids" or FAMILIES[family].token_type_ids}


# ----------------------------------------------------------------------------------------- the table
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_each_row_names_real_modules_of_its_family(family):
    """Every path of the row exists on a model of the family, as the kind of module the row says."""
    from transformers import AutoModelForSequenceClassification

    fam = FAMILIES[family]
    cfg = tiny_config(family)
    assert cfg.model_type in fam.model_types
    raw = cfg.to_dict()
    assert (raw[fam.depth_key], raw[fam.width_key], raw[fam.heads_key]) == (LAYERS, 32, 4)
    cfg.num_labels = 2
    model = AutoModelForSequenceClassification.from_config(cfg, attn_implementation=fam.attn_implementation)
    layers = encoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == LAYERS
    layer = layers[0]
    for path in fam.linears():
        assert isinstance(layer.get_submodule(path), nn.Linear), path
    for path in (fam.attention, fam.attn_out_tap) + ((fam.probs_dropout,) if fam.probs_dropout else ()):
        layer.get_submodule(path)
    if fam.probs_dropout:
        assert isinstance(layer.get_submodule(fam.probs_dropout), nn.Dropout)
    assert isinstance(model.base_model.get_submodule(fam.word_embeddings), nn.Embedding)
    model.base_model.get_submodule(fam.embeddings)
    takes_types = "token_type_ids" in inspect.signature(model.base_model.forward).parameters
    assert takes_types == fam.token_type_ids


def test_depth_and_width_of_every_family_folder_are_read_before_loading(family_dirs):
    """config.json keys per family (DistilBERT: n_layers / dim), so layer maps are checked at file-check time."""
    from kdplatform.config.models import model_depth, model_family, model_width

    for family, folder in family_dirs.items():
        assert (model_depth(str(folder)), model_width(str(folder))) == (LAYERS, 32), family
        assert model_family(str(folder)) is FAMILIES[family]


def test_module_paths_are_named_only_in_the_family_table():
    """grep: no other file of the package writes a family's module paths."""
    pattern = re.compile(r"attention\.self|encoder\.layer|base_model\.encoder|attention\.output|\.Wqkv|q_lin")
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "platform" / "kdplatform").rglob("*.py")
                 if p.name != "families.py" and pattern.search(p.read_text())]
    assert offenders == []


# ----------------------------------------------------------------------------------------- attention maps
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tapped_maps_equal_the_familys_output_attentions(family, family_dirs):
    """The maps the losses read (`Features.probs`) from the model as the worker loads it (SDPA where the
    family supports it) equal the family's own eager `output_attentions` to 1e-5, over every valid query
    row; for families with position terms in the scores, softmax(QK^T/sqrt(d)) would not."""
    from transformers import AutoModelForSequenceClassification

    folder, fam = family_dirs[family], FAMILIES[family]
    model = load_classifier(str(folder), 2).eval()
    assert model.config._attn_implementation == fam.attn_implementation
    eager = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    eager.eval()
    batch = _batch(folder, family)
    names = set().union(*(attention_feature_names(fam, n) | {f"q.{n}", f"k.{n}"} for n in range(1, LAYERS + 1)))
    tap = tap_features(model, names)
    with torch.no_grad():
        feats = forward_features(model, batch, tap, need_hidden=False)
        ref = eager(**_inputs(batch, family), output_attentions=True)
    tap.remove()
    assert model.config._attn_implementation == fam.attn_implementation  # restored after the tap
    rows = batch["attention_mask"].bool()[:, None, :, None].expand(-1, 4, -1, 16)
    naive_gap = 0.0
    for n in range(1, LAYERS + 1):
        want = ref.attentions[n - 1]
        assert (feats.probs(n) - want).abs()[rows].max() < 1e-5, f"layer {n}"
        # the tokens' projections (DeBERTa also projects its relative position embeddings with them)
        assert feats.q[n].shape == feats.k[n].shape == (3, 16, 32)
        naive = masked_log_softmax(masked_scores(feats.q[n], feats.k[n], 4), batch["attention_mask"]).exp()
        naive_gap = max(naive_gap, float((naive - want).abs()[rows].max()))
    assert torch.allclose(feats.logits, ref.logits, atol=1e-5)
    if family in POSITION_TERMS:
        assert naive_gap > 1e-3  # the test can fail: recomputed maps miss the position terms
    else:
        assert naive_gap < 1e-5


# ----------------------------------------------------------------------------------------- regression head
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_new_regression_head_starts_at_the_label_mean_and_a_saved_one_is_kept(family, family_dirs, tmp_path):
    """STS-B: the one-output head the pretrained folder lacks starts at `regression_start`: the same random
    head (same seed) outputs exactly that much more; a checkpoint's own regression head is not touched."""
    batch = _inputs(_batch(family_dirs[family], family), family)
    with torch.no_grad():
        torch.manual_seed(0)
        plain = load_classifier(str(family_dirs[family]), 1).eval()(**batch).logits
        torch.manual_seed(0)
        started = load_classifier(str(family_dirs[family]), 1, regression_start=2.7).eval()
        logits = started(**batch).logits
    torch.testing.assert_close(logits, plain + 2.7)
    started.save_pretrained(tmp_path / "fine_tuned")  # a regression checkpoint: its head is kept as trained
    with torch.no_grad():
        again = load_classifier(str(tmp_path / "fine_tuned"), 1, regression_start=-5.0).eval()(**batch).logits
    torch.testing.assert_close(again, logits)


# ----------------------------------------------------------------------------------------- QAT
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_qat_quantizes_the_familys_linears_and_reloads_identically(family, family_dirs, tmp_path):
    fam = FAMILIES[family]
    model = load_classifier(str(family_dirs[family]), 2)
    act_bits = 8 if fam.attention_interface else 32
    report = quantize_bert_(model, bits=2, act_bits=act_bits, quantize_embeddings=True)
    layers = encoder_layers(model)
    for layer in layers:
        for path in fam.linears():
            q = layer.get_submodule(path)
            assert isinstance(q, QuantLinear) and q.bits == 2 and q.act_bits == act_bits
            assert q.groups == (3 if path == fam.qkv else 1)
    quantized_linears = [m for m in report.quantized_modules if not m.endswith(fam.word_embeddings)]
    assert len(quantized_linears) in (LAYERS * len(fam.linears()), LAYERS * len(fam.linears()) + 1)  # + pooler
    first = layers[0].get_submodule(fam.linears()[0])  # Q, or the fused QKV
    with torch.no_grad():  # the weight the layer computes with: ternary {-alpha, 0, alpha} per (Q/K/V) block
        w_q = (first(torch.eye(first.in_features)) - (0 if first.bias is None else first.bias)).T
    for block in w_q.chunk(first.groups):
        assert torch.unique(block).numel() <= 3
    if not fam.attention_interface:
        with pytest.raises(ValueError, match=f"the {fam.name} family's attention"):
            quantize_bert_(load_classifier(str(family_dirs[family]), 2), bits=2, act_bits=8)
    model.eval()
    batch = _inputs(_batch(family_dirs[family], family), family)
    with torch.no_grad():
        before = model(**batch).logits
    folder = save_student(model, load_tokenizer(str(family_dirs[family])), tmp_path / "student",
                          {"bits": 2, "act_bits": act_bits, "two_bit": "ternary", "clip": 2.5, "act_clip": 2.5,
                           "quantize_embeddings": True})
    with torch.no_grad():
        after = load_student(folder)(**batch).logits
    assert torch.equal(before, after)


# ----------------------------------------------------------------------------------------- every method
DATA = ("data: {{glue_dir: {glue}, source: glue_dir, max_train_examples: 16, max_dev_examples: 16, "
        "train_eval_examples: 8, max_seq_length: 16{extra}}}\n"
        "teacher: {{model: {teacher}, finetune: {{epochs: 1, max_steps: 2, batch_size: 8}}}}\n")
STEPS = "max_steps: 2, eval_every: 2, batch_size: 8"
ILD_METHODS = ["kd", "finetune", "pkd", "tinybert", "minilm", "ild_last", "cr_ild", "supplementary_ild"]
QAT_METHODS = ["ternarybert", "kdqat_map", "kdqat_output", "kdqat_unified"]
ALL_LOSSES = ["logit_kd", "hidden_mse", "attention_score_mse", "attention_kl", "relation_kl", "pkd",
              "attention_map_kl", "attention_output_mse"]


def _truncate_file(glue: Path, teacher: Path, methods: list[str]) -> str:
    """A 2-layer truncated student; cr_ild's consistency ramps by step (its 2 steps are within one epoch)."""
    cr = ", consistency: {ramp: step}" if methods == ["cr_ild"] else ""
    return (f"name: fam\ntask: sst2\n"
            + DATA.format(glue=glue, teacher=teacher, extra=", supplementary_tasks: [cola], supplementary_examples: 8")
            + "student: {init: truncate, layers: 2}\nconsistency_weight: 0.5\n"
            f"train:\n  - {{name: ild, {STEPS}{cr}}}\n  - {{name: pred, {STEPS}}}\n"
            f"grid:\n  method: {methods}\n")


def _qat_file(glue: Path, teacher: Path, methods: list[str], act_bits: int, checkpoint: Path | None = None) -> str:
    data = DATA.format(glue=glue, teacher=teacher, extra="")
    if checkpoint is not None:
        data = data.replace("finetune:", f"checkpoint: {checkpoint}, finetune:")
    return (f"name: fam\ntask: sst2\n" + data
            + f"student: {{init: teacher_copy, quantize_embeddings: true}}\nbits: 2\nact_bits: {act_bits}\n"
            f"train:\n  - {{name: qat, {STEPS}}}\ngrid:\n  method: {methods}\n")


def _custom_file(glue: Path, teacher: Path) -> str:
    """One stage with every loss of the menu, on a 2-layer truncated student (maps, Q/K/V, outputs, states)."""
    losses = ", ".join(f"{{name: {n}}}" for n in ALL_LOSSES)
    return (f"name: fam\ntask: sst2\nmethod: custom\nlayer_map: uniform\n"
            + DATA.format(glue=glue, teacher=teacher, extra="")
            + f"student: {{init: truncate, layers: 2}}\ntrain:\n  - {{name: all, {STEPS}, losses: [{losses}]}}\n")


def _run_all(path: Path, uri: str) -> list:
    """Every trial of the file, in this process, one after the other (as `kdplatform run`)."""
    from kdplatform.distill.worker import run_trial

    _, trials, _ = load_trials(path)
    return [(t.method, run_trial(t, tracking_uri=uri)) for t in trials]


def _assert_finished_with_dev_scores(results: list, uri: str) -> None:
    c = MlflowClient(uri)
    for method, res in results:
        run = c.get_run(res.run_id)
        assert run.info.status == "FINISHED", method
        assert "dev/score" in run.data.metrics and "dev/best_score" in run.data.metrics, method


def test_every_method_is_covered_here():
    assert set(ILD_METHODS) | set(QAT_METHODS) | {"custom"} == set(PRESETS)


@pytest.mark.parametrize("family", TRIAL_FAMILIES)
def test_kdqat_unified_at_2_bits_finishes_on_every_family(family, family_dirs, family_teachers, family_store,
                                                          glue_dir, tmp_path):
    """The quick whole trial per family: a ternary copy of a ready teacher checkpoint (8-bit activations where the
    family's attention passes through the attention interface) trained with every KD-QAT term, maps included."""
    act_bits = 8 if FAMILIES[family].attention_interface else 32
    cfg = write_yaml(tmp_path / "qat.yaml", _qat_file(glue_dir, family_dirs[family], ["kdqat_unified"], act_bits,
                                                      checkpoint=family_teachers[family]))
    uri = family_store
    results = _run_all(cfg, uri)
    assert [m for m, _ in results] == ["kdqat_unified"]
    _assert_finished_with_dev_scores(results, uri)
    run = MlflowClient(uri).get_run(results[0][1].run_id)
    for key in ("loss/attention_map_kl", "loss/attention_output_mse", "loss/hidden_mse", "quant/fraction"):
        assert key in run.data.metrics, key


@pytest.mark.slow  # 12 trials a family
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_method_finishes_on_every_family(family, family_dirs, glue_dir, tmp_path):
    teacher = family_dirs[family]
    act_bits = 8 if FAMILIES[family].attention_interface else 32
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ild = [m for m in ILD_METHODS if m != "cr_ild"]
    results = _run_all(write_yaml(tmp_path / "ild.yaml", _truncate_file(glue_dir, teacher, ild)), uri)
    results += _run_all(write_yaml(tmp_path / "cr.yaml", _truncate_file(glue_dir, teacher, ["cr_ild"])), uri)
    results += _run_all(write_yaml(tmp_path / "qat.yaml", _qat_file(glue_dir, teacher, QAT_METHODS, act_bits)), uri)
    results += _run_all(write_yaml(tmp_path / "custom.yaml", _custom_file(glue_dir, teacher)), uri)
    assert sorted(m for m, _ in results) == sorted(PRESETS)
    _assert_finished_with_dev_scores(results, uri)


# ----------------------------------------------------------------------------------------- other families
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "kdplatform.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=300)


def test_a_model_of_another_family_exits_2_with_one_line(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 32}))
    cfg = write_yaml(tmp_path / "t.yaml", f"name: other\ntask: sst2\nmethod: kd\nteacher: {{model: {folder}}}\n"
                                          "student: {layers: 1}\n")
    proc = _cli("run", str(cfg), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "'gpt2'" in lines[0] and "teacher.model" in lines[0] and "Traceback" not in lines[0]
    assert all(f in lines[0] for f in FAMILIES)
    assert not (tmp_path / "m.db").exists()


def test_act_bits_on_a_family_without_the_attention_interface_exits_2_with_one_line(tmp_path, family_dirs):
    cfg = write_yaml(tmp_path / "t.yaml", f"name: q\ntask: sst2\nmethod: kdqat_unified\nbits: 2\nact_bits: 8\n"
                                          f"teacher: {{model: {family_dirs['deberta-v2']}}}\n"
                                          "student: {init: teacher_copy}\n")
    proc = _cli("run", str(cfg), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "act_bits" in lines[0] and "deberta-v2 family" in lines[0], lines


def test_models_lists_the_known_names_and_the_family_table(tmp_path):
    from kdplatform.config import MODEL_ALIASES
    from kdplatform.families import family_rows

    proc = subprocess.run([sys.executable, "-m", "kdplatform.cli", "models"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "400"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("mpnet-base", "deberta-v3-base", "modernbert-base", "distilbert-base-uncased", "roberta-base",
                 "xlm-roberta-base"):
        assert name in MODEL_ALIASES and name in proc.stdout
    rows = family_rows()
    assert [r["family"] for r in rows] == list(FAMILIES)
    for row in rows:  # generated from the table: each row's cells as printed
        line = next(ln for ln in proc.stdout.splitlines() if ln.strip("│ ").startswith(row["family"] + " "))
        assert row["QAT activations"] in line and row["depth / width"] in line
