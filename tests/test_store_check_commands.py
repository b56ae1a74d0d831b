"""Every command that opens a store runs the same store check first: a damaged SQLite file, a file that is
not a database, some other program's SQLite database, and (for the commands that write) a store on a
read-only filesystem each get exit 2 with one message, no traceback, the file byte for byte unchanged and no
claim folder created beside it. A read-only store can still be listed and reported on.

The read-only filesystem is a real one: a read-only bind mount in a private mount namespace (`unshare -rm`).
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env, small_kd_yaml, write_yaml

COMMANDS = {  # what each command is given; {db} is the store's URI
    "ls": ["ls"],
    "ls --sweep": ["ls", "--sweep", "0123456789abcdef"],
    "report": ["report", "--out", "rep"],
    "export": ["export", "0123456789abcdef", "exported"],
    "ui": ["ui", "--port", "0"],
    "run": ["run", "kd.yaml"],
    "run --dry-run": ["run", "kd.yaml", "--dry-run"],
    "sweep": ["sweep", "kd.yaml"],
    "teacher": ["teacher", "kd.yaml"],
}


def _real_store(path: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{path}")
    run = client.create_run(client.create_experiment("e"))
    client.log_metric(run.info.run_id, "m", 1.0)
    client.set_terminated(run.info.run_id)


def _broken(kind: str, path: Path) -> str:
    """A store file of `kind`; returns the fragment the message must hold."""
    if kind == "not_a_database":
        path.write_bytes(b"this is a text file, not SQLite\n" * 100)
        return "not an SQLite database"
    if kind == "malformed":
        _real_store(path)
        data = path.read_bytes()
        path.write_bytes(data[:4096] + b"\xff" * (len(data) - 4096))  # header intact, pages overwritten
        return "SQLite cannot read it"
    if kind == "foreign":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE notes (id INTEGER, text TEXT)")
            db.execute("INSERT INTO notes VALUES (1, 'mine')")
        return "not an MLflow store"
    raise AssertionError(kind)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _kdp(args: list[str], cwd: Path, uri: str, prefix: list[str] | None = None):
    env = cli_env(cwd, MLFLOW_TRACKING_URI=uri)
    return subprocess.run([*(prefix or []), sys.executable, "-m", "kdplatform.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _assert_refused(proc, fragment: str, store: Path, digest: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and fragment in " ".join(proc.stderr.split()), proc.stderr
    assert str(store) in " ".join(proc.stderr.split()).replace(" ", "") or store.name in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert _digest(store) == digest, "the store file changed"
    assert not store.with_name(store.name + ".kdp-claims").exists(), "a claim folder was created"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["not_a_database", "malformed", "foreign"])
def test_every_command_refuses_a_broken_store_and_leaves_it_as_it_was(tmp_path, kind):
    store = tmp_path / "mlflow.db"
    fragment = _broken(kind, store)
    digest = _digest(store)
    write_yaml(tmp_path / "kd.yaml", small_kd_yaml("broken_store"))
    for name, args in COMMANDS.items():
        proc = _kdp(args, tmp_path, f"sqlite:///{store}")
        print(f"{kind} / {name}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[:1]}")
        _assert_refused(proc, fragment, store, digest)


@pytest.mark.parametrize("kind", ["malformed", "foreign"])
def test_ls_report_and_export_refuse_a_broken_store_in_process(tmp_path, monkeypatch, kind):
    """The same check, fast: the CLI in-process (typer's runner) for the commands that only read."""
    from typer.testing import CliRunner

    from kdplatform.cli import app

    store = tmp_path / "mlflow.db"
    fragment = _broken(kind, store)
    digest = _digest(store)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    for args in (COMMANDS["ls"], COMMANDS["report"], COMMANDS["export"]):
        result = CliRunner().invoke(app, args, catch_exceptions=True)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (args, result.output)
        assert result.stderr.startswith("error: ") and fragment in " ".join(result.stderr.split()), result.stderr
        assert _digest(store) == digest and not (tmp_path / "rep").exists()


@pytest.mark.slow
def test_a_store_on_a_read_only_filesystem_refuses_writes_and_still_lists(tmp_path):
    _read_only_case(tmp_path)


def _read_only_prefix(folder: Path) -> list[str]:
    """Run the command with `folder` a read-only bind mount (a private mount namespace: nothing else sees it)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no user/mount namespaces here (unshare -rm)")
    return ["unshare", "-rm", "sh", "-c",
            f'mount --bind "{folder}" "{folder}" && mount -o remount,bind,ro "{folder}" && exec "$@"', "sh"]


def _read_only_case(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    store = folder / "mlflow.db"
    _real_store(store)
    digest = _digest(store)
    write_yaml(tmp_path / "kd.yaml", small_kd_yaml("read_only_store"))
    prefix = _read_only_prefix(folder)
    uri = f"sqlite:///{store}"
    for name in ("run", "sweep", "teacher"):
        proc = _kdp(COMMANDS[name], tmp_path, uri, prefix)
        print(f"read-only / {name}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[:1]}")
        _assert_refused(proc, "is read-only", store, digest)
        assert "Read-only file system" not in proc.stderr  # the OSError of a claim file, as before
    listed = _kdp(["ls"], tmp_path, uri, prefix)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stdout + listed.stderr
    assert _digest(store) == digest
