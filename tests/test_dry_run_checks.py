"""`--dry-run` refuses what the real command refuses before it writes anything: `run`'s `search:`/`scheduler:`
(they need Ray), a teacher checkpoint that is not there, a missing GLUE folder. Same message, exit 2, and
nothing written (no store, no claim folder, no Ray folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import GLUE_OK, small_kd_yaml, write_yaml

SPEC = small_kd_yaml("dry")
SEARCH = "search: {num_samples: 2, space: {train.pred.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}}}\n"
CASES = {  # what the file or its overrides get wrong -> (extra YAML, overrides, a fragment of the message)
    "checkpoint": ("", ["teacher.checkpoint=/nonexistent-kdp-ckpt"], "/nonexistent-kdp-ckpt: not a model folder"),
    "glue folder": ("", ["data.glue_dir=/nonexistent-kdp-glue"], "the folder /nonexistent-kdp-glue does not exist"),
    "search": (SEARCH, [], "`search:` and `scheduler:` need Ray"),
}


@pytest.fixture()
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setenv("KDP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def kdp(*args: str):
    from kdplatform.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def assert_nothing_written(work: Path) -> None:
    assert sorted(p.name for p in work.iterdir()) == ["dry.yaml"], "a refused command wrote something"


@pytest.mark.parametrize("case", CASES)
def test_run_dry_run_refuses_what_the_run_refuses(case, work):
    extra, overrides, fragment = CASES[case]
    write_yaml(work / "dry.yaml", SPEC + extra)
    dry = kdp("run", "dry.yaml", *overrides, "--dry-run")
    assert dry.exit_code == 2, dry.output
    assert dry.stderr.startswith("error: dry.yaml") and fragment in " ".join(dry.stderr.split()), dry.stderr
    assert "Traceback" not in dry.output
    assert_nothing_written(work)
    real = kdp("run", "dry.yaml", *overrides)
    assert (real.exit_code, real.stderr) == (2, dry.stderr), "the dry run says what the run says"
    assert_nothing_written(work)


def test_sweep_dry_run_refuses_a_missing_checkpoint_before_ray(work):
    _, overrides, fragment = CASES["checkpoint"]
    write_yaml(work / "dry.yaml", SPEC)
    dry = kdp("sweep", "dry.yaml", *overrides, "--dry-run")
    assert dry.exit_code == 2, dry.output
    assert dry.stderr.startswith("error: dry.yaml") and fragment in " ".join(dry.stderr.split()), dry.stderr
    assert "dry run: nothing was started" not in dry.output and "Traceback" not in dry.output
    assert_nothing_written(work)  # no store, no ray_results
    assert dry.stderr == kdp("run", "dry.yaml", *overrides, "--dry-run").stderr
    # the checks are not trigger-happy: the same file with its checkpoint left alone passes both dry runs
    assert kdp("run", "dry.yaml", "--dry-run").exit_code == 0
    sweep = kdp("sweep", "dry.yaml", "--dry-run")
    assert sweep.exit_code == 0 and "dry run: nothing was started" in sweep.output, sweep.output
    assert_nothing_written(work)


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_a_dry_run_downloads_nothing_from_the_hub(command, work, monkeypatch):
    # offline, a hub-sourced file cannot be checked without fetching GLUE: the dry run leaves that data to
    # the real run (which fetches and checks it) instead of downloading it or failing
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(work / "hf"))
    write_yaml(work / "dry.yaml", SPEC.replace(f"{{glue_dir: {GLUE_OK}, source: glue_dir}}", "{source: hub}"))
    dry = kdp(command, "dry.yaml", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "1 trial" in dry.output or "sst2/kd" in dry.output, dry.output
    assert not (work / "hf").exists(), "the dry run touched the hub cache"
