"""The loss menu is the one source of a loss's roles: nothing else decides by a loss's name.

A loss added with one menu entry and one registered function (both here, in the test) is accepted by the
config, trained by the worker and, since its entry says it trains the head, logs dev task scores.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO
from kdplatform.config import ConfigError, TrialConfig, load_trials, resolve_trial
from kdplatform.config.describe import describe_loss
from kdplatform.distill import losses
from kdplatform.loss_menu import LOSS_MENU, LossInfo, consistency_losses

PACKAGE = REPO / "platform" / "kdplatform"
# Where a loss may be named: its menu entry, its function, and the method presets that use it.
OWNERS = {PACKAGE / "loss_menu.py", PACKAGE / "distill" / "losses.py", PACKAGE / "config" / "presets.py"}


def _compared_names(path: Path) -> list[str]:
    """`x == 'hidden_mse'`, `x in ('logit_kd', 'ce')`, `'ce' not in names`: loss names used in a comparison."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            for part in [node.left, *node.comparators]:
                consts = part.elts if isinstance(part, (ast.Tuple, ast.List, ast.Set)) else [part]
                hits += [f"{path.relative_to(PACKAGE)}:{node.lineno}: {c.value}" for c in consts
                         if isinstance(c, ast.Constant) and c.value in LOSS_MENU]
    return hits


def test_no_loss_name_is_compared_outside_the_menu_its_functions_and_presets():
    hits = [h for p in sorted(PACKAGE.rglob("*.py")) if p not in OWNERS for h in _compared_names(p)]
    assert hits == []


def test_the_scan_sees_a_comparison_by_name(tmp_path):
    bad = PACKAGE / "_probe_for_test.py"  # inside the package so relative_to works; removed at once
    bad.write_text("def f(t):\n    return t.name in ('logit_kd', 'x') or t.name == 'hidden_mse'\n")
    try:
        assert [h.split(": ")[1] for h in _compared_names(bad)] == ["logit_kd", "hidden_mse"]
    finally:
        bad.unlink()


def test_menu_roles_decide_what_the_config_layer_does(tmp_path):
    assert consistency_losses() == ("hidden_mse", "attention_kl", "relation_kl")
    term = resolve_trial(TrialConfig(task="sst2", method="kd", student={"layers": 2})).train[0].losses[0]
    assert describe_loss(term) == f"logit_kd x1 T={term.temperature:g}"  # its menu options hold temperature
    bad = tmp_path / "bad.yaml"
    for stage, says in ((
            "{name: s, losses: [{name: logit_mse}]}", "unknown loss 'logit_mse'"), (
            "{name: s, mixup: true, losses: [{name: ce}]}", "'ce' reads gold labels"), (
            "{name: s, mixup: true, losses: [{name: logit_kd}], consistency: {losses: [pkd]}}",
            "'pkd' is not a consistency distance")):
        text = f"name: x\nmethod: custom\nstudent: {{layers: 2}}\nconsistency_weight: 1\ntrain: [{stage}]\n"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=says):
            load_trials(bad)


@pytest.fixture()
def logit_mse():
    """A new loss: one menu entry and one registered function, removed again after the test."""
    import torch

    LOSS_MENU["logit_mse"] = LossInfo("logit_mse", frozenset({"logits"}), per_layer=False, trains_head=True,
                                      summary="MSE of student and teacher logits")

    @losses.loss("logit_mse")
    def _logit_mse(s, t, pairs, x):
        return torch.mean((s.logits.float() - t.logits.float()) ** 2)

    yield
    del LOSS_MENU["logit_mse"], losses.TERMS["logit_mse"]


@pytest.mark.slow  # a whole trial (teacher fine-tune + student) on the tiny BERT: ~30-50 s on 2 busy cores
def test_a_loss_added_in_one_entry_and_one_function_trains_and_logs_dev_scores(
        logit_mse, glue_dir, tiny_bert_dir, mlflow_uri, tmp_path, monkeypatch):
    from kdplatform.distill.worker import run_trial

    monkeypatch.setenv("KDP_CACHE_DIR", str(tmp_path / "cache"))
    trial = resolve_trial(TrialConfig.model_validate(dict(
        name="newloss", task="sst2", method="custom", seed=1,
        data=dict(source="glue_dir", glue_dir=str(glue_dir), max_train_examples=32, max_dev_examples=32,
                  max_seq_length=16),
        teacher=dict(model=str(tiny_bert_dir), finetune=dict(epochs=1, max_steps=2, batch_size=16)),
        student=dict(init="truncate", layers=1),
        train=[dict(name="distill", epochs=1, batch_size=16, eval_every=0, losses=[dict(name="logit_mse")])])))
    assert trial.train[0].predicts and trial.train[0].reads_teacher_cache
    res = run_trial(trial, tracking_uri=mlflow_uri)
    client = MlflowClient(mlflow_uri)
    loss = [m.value for m in client.get_metric_history(res.run_id, "loss/logit_mse")]
    acc = [m.value for m in client.get_metric_history(res.run_id, "dev/accuracy")]
    assert loss and all(v > 0 for v in loss)
    assert acc and all(0.0 <= v <= 1.0 for v in acc)
    # 32 dev examples: an accuracy is a whole number of them
    assert all(abs(v * 32 - round(v * 32)) < 1e-9 for v in acc)


def test_kdplatform_losses_prints_every_entry_with_its_roles(monkeypatch):
    from typer.testing import CliRunner

    from kdplatform.cli import app

    monkeypatch.setenv("COLUMNS", "250")  # one line per loss
    result = CliRunner().invoke(app, ["losses"])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 3}
    assert set(LOSS_MENU) <= set(rows)
    assert "trains head" in rows["logit_kd"] and "labels" in rows["ce"] and "teacher" not in rows["ce"]
    assert "projects if widths differ" in rows["hidden_mse"] and "consistency" in rows["relation_kl"]
    assert "consistency" not in rows["pkd"] and "temperature" in rows["logit_kd"]
