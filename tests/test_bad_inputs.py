"""The bad-input corpus (tests/bad_inputs/): every file a user could get wrong is refused in seconds.

Each `tests/bad_inputs/*.yaml` names, in `# expect:` header lines, the fragments its error message must hold
(the YAML path or the TSV file and line, and what is wrong), in `# file:`, the file the message must point
at when that is not the YAML itself (a GLUE TSV file, a teacher checkpoint), and in `# args:`, command-line
overrides given after the file (`kdplatform run FILE key=value ...`). For every case `kdplatform run`
must exit 2 with those fragments and the file names on stderr, print no Python traceback, and leave the
MLflow store uncreated: nothing started, nothing written.

All cases go through the CLI in-process (typer's runner, the same `app` the console script calls: fast), and
a representative handful through a real `kdplatform` subprocess (the process-level exit status and stderr).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from typer.testing import CliRunner

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
CASES = sorted(p.name for p in CORPUS.glob("*.yaml"))


def header(name: str) -> tuple[list[str], list[str]]:
    """(expected fragments, files the message must name) from a case's `# expect:` / `# file:` lines."""
    text = (CORPUS / name).read_bytes().decode("latin-1")  # not_utf8.yaml is Latin-1 on purpose
    expect = re.findall(r"^# expect: (.+?)\s*$", text, re.M)
    files = re.findall(r"^# file: (.+?)\s*$", text, re.M)
    return expect, files


def test_corpus_is_large_and_every_case_says_what_it_expects():
    assert len(CASES) >= 30
    for name in CASES:
        expect, _ = header(name)
        assert expect, f"{name}: no '# expect:' line"
    data_files = [p for p in CORPUS.rglob("*.tsv")] + [p for p in CORPUS.rglob("config.json")]
    assert len(data_files) >= 10, "TSV and checkpoint cases are part of the corpus"


@pytest.fixture()
def corpus_copy(tmp_path, monkeypatch) -> Path:
    """A private copy of the corpus as the working directory (relative paths in the cases resolve there),
    a tracking store that must never appear, and no GLUE folder from the environment."""
    work = tmp_path / "in"
    shutil.copytree(CORPUS, work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setenv("KDP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("KDP_GLUE_DIR", raising=False)
    return work


def assert_untouched(tmp_path: Path, work: Path) -> None:
    assert not (tmp_path / "m.db").exists(), "the MLflow store was created"
    assert not (tmp_path / "m.db.kdp-claims").exists(), "a claim folder was created beside the store"
    assert not (work / "mlflow.db").exists() and not (work / "mlruns").exists()
    assert not (tmp_path / "cache" / "teachers").exists(), "a teacher was started"


def args(name: str) -> list[str]:
    """Command-line overrides of a case (`# args: key=value ...`)."""
    text = (CORPUS / name).read_bytes().decode("latin-1")
    return [a for line in re.findall(r"^# args: (.+?)\s*$", text, re.M) for a in line.split()]


def check_message(name: str, stderr: str) -> None:
    expect, files = header(name)
    for fragment in expect:
        assert fragment in stderr, f"{name}: expected {fragment!r} in:\n{stderr}"
    assert name in stderr, f"{name}: the message does not name the file"
    for f in files:
        assert f in stderr, f"{name}: the message does not name {f}"
    assert "Traceback" not in stderr
    assert stderr.startswith("error: "), stderr


def names_its_store(name: str) -> bool:
    """A case whose file sets `tracking_uri:` (a bad store is what it is about)."""
    return re.search(r"^tracking_uri:", (CORPUS / name).read_bytes().decode("latin-1"), re.M) is not None


@pytest.mark.parametrize("name", CASES)
def test_bad_input_exits_2_with_a_clear_message(name, corpus_copy, tmp_path, monkeypatch):
    from kdplatform.cli import app

    if names_its_store(name):  # MLFLOW_TRACKING_URI would beat the file's tracking_uri: (README's order)
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
    result = CliRunner().invoke(app, ["run", name, *args(name)], catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(result.exception))
        pytest.fail(f"{name}: crashed instead of a user error:\n{tb}")
    assert result.exit_code == 2, f"{name}: exit {result.exit_code}\n{result.output}"
    check_message(name, result.stderr)
    assert "Traceback" not in result.stdout
    assert_untouched(tmp_path, corpus_copy)


# A few through the real console entry point: exit status and stderr of a separate process.
SUBPROCESS_CASES = ["syntax_unclosed_flow.yaml", "grid_unknown_key.yaml", "layer_map_beyond_teacher.yaml",
                    "tsv_bad_label.yaml", "ckpt_masked_lm.yaml", "alias_bomb.yaml", "name_rich_markup.yaml",
                    "override_bad_value.yaml"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_through_the_console_script(name, tmp_path):
    work = tmp_path / "in"
    shutil.copytree(CORPUS, work)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}", "HF_HUB_OFFLINE": "1",
           "KDP_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("KDP_GLUE_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "kdplatform.cli", "run", name, *args(name)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    check_message(name, proc.stderr)
    assert "Traceback" not in proc.stdout
    assert_untouched(tmp_path, work)


def test_the_valid_twin_of_a_data_case_passes_preflight(corpus_copy):
    """The checks are not trigger-happy: the good GLUE folder the checkpoint cases use is accepted."""
    from kdplatform.config import load_trials
    from kdplatform.distill.preflight import preflight

    (corpus_copy / "ok.yaml").write_text("task: sst2\nmethod: kd\ndata: {source: glue_dir, glue_dir: glue_ok}\n"
                                         "teacher: {model: bert-base-uncased}\n")
    _, trials, _ = load_trials(corpus_copy / "ok.yaml")
    preflight(trials)


# `kdplatform sweep` must refuse the same files before it writes its parent run or starts Ray.
def _sweep(name: str, monkeypatch):
    import ray

    from kdplatform.cli import app

    def no_ray(*args, **kwargs):
        raise RuntimeError("ray.init called: the sweep started before its inputs were checked")

    monkeypatch.setattr(ray, "init", no_ray)
    return CliRunner().invoke(app, ["sweep", name, *args(name)], catch_exceptions=True)


@pytest.mark.parametrize("name", ["grid_unknown_key.yaml", "layer_map_beyond_student.yaml", "ckpt_masked_lm.yaml",
                                  "ckpt_wrong_num_labels.yaml", "override_bad_value.yaml", "alias_bomb.yaml"])
def test_sweep_refuses_bad_files_before_writing(name, corpus_copy, tmp_path, monkeypatch):
    result = _sweep(name, monkeypatch)
    assert result.exit_code == 2, f"{result.output}\n{result.exception!r}"
    expect, files = header(name)
    assert name in result.stderr and expect[-1] in result.stderr and all(f in result.stderr for f in files), \
        result.stderr
    assert "Traceback" not in result.output
    assert_untouched(tmp_path, corpus_copy)


@pytest.mark.parametrize("name", ["tsv_bad_label.yaml", "tsv_missing_column.yaml"])
def test_sweep_refuses_bad_data_files_before_writing(name, corpus_copy, tmp_path, monkeypatch):
    result = _sweep(name, monkeypatch)
    assert result.exit_code == 2, f"{result.output}\n{result.exception!r}"
    check_message(name, result.stderr)
    assert_untouched(tmp_path, corpus_copy)


# A teacher checkpoint whose weights file is cut short (an interrupted copy) or is not a weights file: built
# from the real MiniLM checkpoint in a temporary folder (no weights in the repository).
def _broken_teacher(work: Path, minilm: Path, kind: str) -> Path:
    import json

    folder = work / f"ckpt_{kind}"
    folder.mkdir()
    for f in ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm / f, folder / f)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(architectures=["BertForSequenceClassification"], num_labels=2)
    (folder / "config.json").write_text(json.dumps(cfg))
    with open(minilm / "model.safetensors", "rb") as src, open(folder / "model.safetensors", "wb") as dst:
        dst.write(src.read(4096) if kind == "truncated" else os.urandom(4096))
    (work / f"ckpt_{kind}.yaml").write_text(
        "task: sst2\nmethod: kd\ndata: {source: glue_dir, glue_dir: glue_ok}\n"
        f"teacher: {{checkpoint: ckpt_{kind}}}\nstudent: {{init: truncate, layers: 1}}\n")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_a_broken_teacher_weights_file_is_refused_before_any_run(kind, corpus_copy, tmp_path, minilm):
    _broken_teacher(corpus_copy, Path(minilm), kind)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}", "HF_HUB_OFFLINE": "1",
           "KDP_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "kdplatform.cli", "run", f"ckpt_{kind}.yaml"], cwd=corpus_copy,
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and f"ckpt_{kind}/model.safetensors" in lines[0], proc.stderr
    assert "not a readable safetensors file" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert_untouched(tmp_path, corpus_copy)


def test_sweep_refuses_a_truncated_teacher_before_writing(corpus_copy, tmp_path, monkeypatch, minilm):
    import ray

    from kdplatform.cli import app

    _broken_teacher(corpus_copy, Path(minilm), "truncated")
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("the sweep started Ray before its checks"))
    result = CliRunner().invoke(app, ["sweep", "ckpt_truncated.yaml"], catch_exceptions=True)
    assert result.exit_code == 2, f"{result.output}\n{result.exception!r}"
    assert "ckpt_truncated/model.safetensors" in result.stderr and "truncated" in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert_untouched(tmp_path, corpus_copy)
