"""File names made from data go through one function (`paths.safe_file_name`), and a dashboard item name that
is a path is refused when the dashboard loads (it named files under the report's tables/ folder, so `../x`
wrote beside --out and `a/b` crashed the report).

Fuzzed with hypothesis: any text, hostile names included, becomes one plain file inside the folder it is
written to, and different names stay different files.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdplatform.paths import FILE_NAME_MAX, safe_file_name

HOSTILE = ["../../etc/passwd", "a/b", "..", ".", "", "-rf", ".hidden", "a\\b", "nul\0byte", "x" * 400,
           "ünïcödé", "名前", "CON", "a b;c|d", "$(touch PWNED)", "\n", "/", "~/x", "a" + "/" * 50]
SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def _check(name: str, folder: Path) -> str:
    safe = safe_file_name(name)
    assert SAFE.fullmatch(safe) and safe not in (".", "..") and len(safe) <= FILE_NAME_MAX, (name, safe)
    target = folder / f"{safe}.png"
    target.write_bytes(b"x")
    assert target.resolve().parent == folder.resolve(), (name, safe)
    return safe


def test_hostile_names_become_plain_files_in_their_folder(tmp_path):
    made = {name: _check(name, tmp_path) for name in HOSTILE}
    assert len(set(made.values())) == len(HOSTILE), made  # no two names share a file
    assert safe_file_name("paper_table-accuracy") == "paper_table-accuracy"  # a safe name is kept as it is
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{s}.png" for s in made.values())


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=300), st.text(min_size=0, max_size=300))
def test_any_text_is_a_safe_file_name_and_different_texts_stay_apart(a, b):
    for name in (a, b):
        safe = safe_file_name(name)
        assert SAFE.fullmatch(safe) and safe not in (".", "..") and len(safe) <= FILE_NAME_MAX
        assert safe_file_name(safe) == safe  # stable: a safe name is its own file name
    if a != b:
        assert safe_file_name(a) != safe_file_name(b) or safe_file_name(a) == a == b


DASHBOARD = "title: t\nitems:\n  - kind: accuracy_table\n    name: {name}\n"


@pytest.mark.parametrize("name", ["../escaped", "a/b", "'..'", "'.hidden'", "'a\\\\b'"])
def test_a_dashboard_item_name_with_a_path_is_refused_at_load(tmp_path, name):
    from kdplatform.report.collect import ReportError
    from kdplatform.report.dashboards import load_dashboards

    file = tmp_path / "mine.yaml"
    file.write_text(DASHBOARD.format(name=name))
    with pytest.raises(ReportError) as e:
        load_dashboards([str(file)])
    text = str(e.value)
    assert str(file) in text and "items.0.name" in text and "tables/" in text, text


def test_the_report_command_refuses_it_with_exit_2_and_writes_nothing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kdplatform.cli import app

    from test_store_check_commands import _real_store

    _real_store(tmp_path / "mlflow.db")
    (tmp_path / "mine.yaml").write_text(DASHBOARD.format(name="../escaped"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                                      "--dashboard", "mine.yaml", "--out", "rep"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.stderr.startswith("error: ") and "mine.yaml" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "rep").exists() and not (tmp_path / "escaped.csv").exists()
