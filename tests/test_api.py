"""The Python API: importable from `kdplatform` without loading torch/Ray/MLflow, and its doc examples hold."""

from __future__ import annotations

import doctest
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_import_kdplatform_stays_light_and_exposes_the_api() -> None:
    code = ("import sys, kdplatform\n"
            "from kdplatform import build_report, expand, load_spec, run_sweep, run_trial\n"
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_doc_examples_load_and_expand_the_quickstart(monkeypatch) -> None:
    import kdplatform
    from kdplatform import api, expand, load_spec

    monkeypatch.chdir(REPO)  # the examples use the repository's sweeps/ folder
    result = doctest.testmod(api, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0
    trials, notes = expand(load_spec("sweeps/quickstart.yaml"))
    assert [t.method for t in trials] == ["kd", "tinybert", "ild_last", "cr_ild"]
    assert all(len(t.cfg_hash) == 16 for t in trials) and notes
    assert set(kdplatform.__all__) == {"load_spec", "expand", "run_trial", "run_sweep", "build_report"}
    with pytest.raises(AttributeError):
        kdplatform.no_such_entry_point  # noqa: B018


def test_build_report_on_an_empty_store_says_why(tmp_path) -> None:
    from kdplatform import build_report
    from kdplatform.report import ReportError

    with pytest.raises(ReportError) as e:
        build_report(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "report", experiment="none")
    assert str(e.value).startswith(f"no MLflow store at {tmp_path / 'mlflow.db'}")
    assert not (tmp_path / "report").exists()
