"""Hints are commands: what kdplatform prints after "Continue with:" or "Open the report:" is pasted into a
shell as printed, and does what it says.

- `session.command` quotes each argument for a POSIX shell: hostile names (spaces, `;`, `$(...)`, quotes,
  globs) come back from a real `sh` as the same single arguments.
- End to end (slow): a sweep whose name holds `; touch PWNED`, with an override, a store and a Ray folder in
  folders whose names have spaces, is stopped with Ctrl-C (SIGINT to its process group, as a terminal sends
  it). The printed resume hint, run verbatim by `sh` from ANOTHER folder, resumes the same sweep (the same
  parent and trial runs, now FINISHED) in the same store, and creates nothing where it was pasted; the
  report hint it then prints writes the report of that sweep. No PWNED file appears anywhere.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdplatform.sweep.session import command

HOSTILE = ["a; touch PWNED", "two words", "$(touch PWNED)", "`touch PWNED`", "it's", 'say "hi"', "seeds=[1]",
           "*", "a\\b", "--flag-looking", "ünï", "x|y&z>w"]


def _sh_args(line: str) -> list[str]:
    """The arguments `sh` gives a command line (a script that prints each argument on its own NUL)."""
    out = subprocess.run(["sh", "-c", 'kdplatform() { printf "%s\\0" "$@"; }; ' + line], capture_output=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode().split("\0")[:-1]


def test_each_argument_comes_back_from_a_shell_as_it_was(tmp_path):
    os.chdir(tmp_path)  # a glob would expand against this (empty) folder
    for name in HOSTILE:
        line = command("report", "--experiment", name, "--tracking-uri", f"sqlite:////tmp/{name}/mlflow.db")
        assert _sh_args(line) == ["report", "--experiment", name, "--tracking-uri", f"sqlite:////tmp/{name}/mlflow.db"]
    assert not list(tmp_path.iterdir()), "pasting a hint ran something"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20),
                min_size=1, max_size=4))
def test_any_printable_argument_round_trips_through_sh(args):
    assert _sh_args(command(*args)) == args


def _kdplatform_on_path(folder: Path) -> str:
    """A `kdplatform` command on PATH that runs this checkout (as the console script would)."""
    folder.mkdir()
    script = folder / "kdplatform"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kdplatform.cli "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def _hint(text: str, label: str) -> str:
    # a hint may start with the environment settings the command reads (`KDP_GLUE_DIR=... kdplatform report`)
    found = re.findall(rf"{label}: ((?:[A-Z_]+=\S+ )*kdplatform .+)$", text, re.M)
    assert found, f"no {label!r} hint in:\n{text[-3000:]}"
    return found[-1].strip()


@pytest.mark.slow
@pytest.mark.e2e
def test_the_printed_resume_hint_pasted_after_ctrl_c_resumes_the_same_sweep_in_the_same_store(
        tmp_path, glue_dir, tiny_bert_dir):
    from mlflow.tracking import MlflowClient

    from ray_sweeps import TINY_SWEEP_SPEC, kill_session_leftovers, sweep_env, teacher_checkpoint
    import tempfile
    import shutil

    ray_tmp = Path(tempfile.mkdtemp(prefix="kdpray", dir="/tmp"))
    env = sweep_env(tmp_path, ray_tmp, PATH=_kdplatform_on_path(tmp_path / "bin"))
    try:
        ckpt = teacher_checkpoint(tiny_bert_dir, tmp_path / "teacher_ckpt")
        first_cwd, paste_cwd = tmp_path / "first", tmp_path / "somewhere else"
        first_cwd.mkdir()
        paste_cwd.mkdir()
        store_dir = tmp_path / "my store"
        store_dir.mkdir()
        spec = first_cwd / "sweep.yaml"
        spec.write_text(TINY_SWEEP_SPEC.format(name='"hint test; touch PWNED"', glue=glue_dir, teacher=tiny_bert_dir,
                                               ckpt=ckpt))
        uri = f"sqlite:///{store_dir / 'mlflow.db'}"
        storage = tmp_path / "ray results"
        log = tmp_path / "driver.log"
        args = ["sweep", "sweep.yaml", "train.pred.lr=3e-5", "--tracking-uri", uri, "--storage", str(storage),
                "--num-cpus", "1"]
        with open(log, "w") as out:
            driver = subprocess.Popen([sys.executable, "-m", "kdplatform.cli", *args], cwd=first_cwd,
                                      env={**env, "KDP_FAULTS": "sst2/*:slow@0:0.8"}, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        # the checkpoint folders are under --storage, not ./ray_results
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None and not list(storage.glob("*/*/checkpoint_*")):
            time.sleep(0.2)
        time.sleep(2)  # Tune saves its experiment state after the checkpoint
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        code = driver.wait(timeout=180)
        printed = log.read_text()
        assert code == 130, printed[-4000:]
        hint = _hint(printed, "Continue with")
        print(f"printed hint: {hint}")
        c = MlflowClient(uri)
        exp = c.get_experiment_by_name("hint test; touch PWNED").experiment_id
        before = {r.info.run_id: r.info.status for r in c.search_runs([exp])}
        assert set(before.values()) == {"KILLED"}, before
        reasons = {r.data.tags.get("kdp.role"): r.data.tags.get("kdp.failure_reason", "") for r in c.search_runs([exp])}
        assert reasons["student"].startswith("interrupted by the user"), reasons  # not "SystemExit: 0"

        pasted = subprocess.run(["sh", "-c", hint], cwd=paste_cwd, env=env, capture_output=True, text=True,
                                timeout=600)
        assert pasted.returncode == 0, (pasted.stdout + pasted.stderr)[-4000:]
        after = {r.info.run_id: r.info.status for r in c.search_runs([exp])}
        assert after == {run_id: "FINISHED" for run_id in before}, "the same runs, reopened and finished"
        assert not list(paste_cwd.iterdir()), f"pasting created {list(paste_cwd.iterdir())}"

        report = _hint(pasted.stdout, "Open the report")
        shown = subprocess.run(["sh", "-c", report + " --format html,csv"], cwd=paste_cwd, env=env,
                               capture_output=True, text=True, timeout=300)
        assert shown.returncode == 0 and "report written" in shown.stdout, shown.stdout + shown.stderr
        assert (paste_cwd / "report" / "index.html").is_file()
        assert not [p for p in tmp_path.rglob("PWNED")], "a name in a hint ran as a command"
    finally:
        kill_session_leftovers(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
