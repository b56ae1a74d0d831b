"""`kdplatform export` takes a student run id; `kdplatform ls` lists parent runs and says how to list the
students of one (`ls --sweep RUN_ID`), which prints their run ids: the ids a user exports, found from the CLI."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from conftest import small_kd_yaml, write_yaml
from kdplatform import runs
from kdplatform.cli import app
from kdplatform.config import load_trials

SPEC = small_kd_yaml("lsx", "seeds: [1, 2]\n")


def _store_with_one_run(tmp_path: Path) -> tuple[str, str, list[str]]:
    """A store holding one `kdplatform run` parent and its two student runs, written through the functions
    `run` itself uses (runs.create_parent / open_run / student_tags). Returns (uri, parent id, student ids)."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    spec = write_yaml(tmp_path / "lsx.yaml", SPEC)
    _, trials, _ = load_trials(spec)
    parent = runs.create_parent(uri, "lsx", "lsx", spec_hash="h", spec_file=spec, runner="run")
    students = []
    for score, t in zip((0.81, 0.79), trials):
        s = runs.open_run(uri, "lsx", t.run_name, runs.student_tags(t, parent.run_id), parent_run_id=parent.run_id)
        s.add_metrics({"dev/best_score": score}, 1)
        s.finish()
        students.append(s.run_id)
    parent.finish()
    return uri, parent.run_id, students


def test_ls_leads_to_the_student_run_ids_that_export_takes(tmp_path):
    uri, parent, students = _store_with_one_run(tmp_path)
    export = CliRunner().invoke(app, ["export", "no-such-run", str(tmp_path / "out"), "--tracking-uri", uri])
    assert export.exit_code == 2 and "kdplatform ls --sweep PARENT_RUN_ID" in export.stderr, export.output
    listing = CliRunner().invoke(app, ["ls", "--tracking-uri", uri])
    assert listing.exit_code == 0 and parent in listing.output, listing.output
    assert "kdplatform ls --sweep RUN_ID" in listing.output, "plain ls says how to list a run's student ids"
    assert not any(s in listing.output for s in students)
    per_run = CliRunner().invoke(app, ["ls", "--sweep", parent, "--tracking-uri", uri])
    assert per_run.exit_code == 0, per_run.output
    lines = per_run.output.splitlines()
    for run_id, name, score in zip(students, ("sst2/kd/b32/s1", "sst2/kd/b32/s2"), ("0.8100", "0.7900")):
        row = next(line for line in lines if run_id in line)
        assert "FINISHED" in row and name in row and score in row, row
    # the id found this way is one export knows (it stops at the missing model, not at an unknown run)
    found = CliRunner().invoke(app, ["export", students[0], str(tmp_path / "out"), "--tracking-uri", uri])
    assert found.exit_code == 2 and "has no model/best artifact" in found.stderr, found.output


def test_ls_sweep_with_an_unknown_parent_id_says_where_ids_come_from(tmp_path):
    uri, _, _ = _store_with_one_run(tmp_path)
    res = CliRunner().invoke(app, ["ls", "--sweep", "nope", "--tracking-uri", uri])
    assert res.exit_code == 2 and res.stderr.startswith("error: no student runs under parent run nope"), res.output
    assert "kdplatform ls" in res.stderr and "Traceback" not in res.output
