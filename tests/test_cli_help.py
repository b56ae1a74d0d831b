"""The command line reads well: help without Typer's `<bool>` / `{file}`, a description for every option, the
short options people expect, `--version`, and tables that stay one line per row when piped (`ls | cat`)."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from conftest import cli_env, small_kd_yaml, write_yaml
from kdplatform import runs
from kdplatform.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)


def kdp_cli(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """The real console script's code path, stdout a pipe (as in `kdplatform ... | cat`)."""
    return subprocess.run([sys.executable, "-c", "from kdplatform.cli import main; main()", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def test_version_prints_the_installed_version(tmp_path):
    out = kdp_cli("--version", cwd=tmp_path, env=cli_env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"kdplatform {metadata.version('kdplatform')}"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_metavars_not_types_and_describes_every_option(command):
    cmd = typer.main.get_command(app).commands[command]
    undescribed = [p.name for p in cmd.params if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not undescribed, f"{command}: options without a description: {undescribed}"
    text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "120"}).output
    assert "<bool>" not in text and "<str>" not in text and "<path>" not in text, text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage, usage


def test_usage_names_the_arguments_in_capitals():
    text = CliRunner().invoke(app, ["sweep", "--help"], env={"COLUMNS": "120"}).output
    assert "sweep [OPTIONS] FILE [KEY=VALUE]..." in text, text
    text = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "120"}).output
    assert "export [OPTIONS] RUN_ID DEST" in text, text


@pytest.mark.parametrize("command, short, long", [("run", "-n", "--dry-run"), ("sweep", "-n", "--dry-run"),
                                                  ("report", "-o", "--out"), ("report", "-e", "--experiment"),
                                                  ("ui", "-p", "--port")])
def test_short_options_are_aliases_of_the_long_ones(command, short, long):
    cmd = typer.main.get_command(app).commands[command]
    option = next(p for p in cmd.params if long in p.opts)
    assert short in option.opts


def test_dry_run_short_option_plans_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = write_yaml(tmp_path / "short.yaml", small_kd_yaml("short"))
    out = CliRunner().invoke(app, ["run", str(spec), "-n", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert out.exit_code == 0, out.output
    assert "sst2/kd/b32/s42" in out.output and "to run" in out.output
    assert not (tmp_path / "m.db").exists(), "a dry run wrote the store"


@pytest.mark.slow  # two CLI processes on a fresh store (about 7 s)
def test_ls_piped_keeps_each_run_on_one_line(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    spec = write_yaml(tmp_path / "lsx.yaml", small_kd_yaml("lsx"))
    long_name = "a-rather-long-experiment-name-for-the-glue-study-with-two-bit-students"
    ids = []
    for name in (long_name, "second"):
        parent = runs.create_parent(uri, name, name, spec_hash="h", spec_file=spec, runner="sweep")
        parent.finish()
        ids.append((name, parent.run_id))
    out = kdp_cli("ls", "--tracking-uri", uri, cwd=tmp_path, env=cli_env(tmp_path))
    assert out.returncode == 0, out.stderr
    for name, run_id in ids:
        row = next(line for line in out.stdout.splitlines() if run_id in line)
        assert name in row and "FINISHED" in row and "sweep" in row, out.stdout
    assert max(len(line) for line in out.stdout.splitlines()) > 80, "piped output is not cut at 80 columns"
