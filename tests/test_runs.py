"""kdplatform.runs: claims are exclusive across processes and freed when their holder dies; filters."""

from __future__ import annotations

import subprocess
import sys

from kdplatform import runs

HOLD = """
import sys, time
from kdplatform import runs
claim = runs.try_claim(sys.argv[1], "exp", "cfg1")
print("got" if claim else "busy", flush=True)
time.sleep(120)
"""


def test_a_claim_is_exclusive_across_processes_and_freed_by_sigkill(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, uri], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "got"
        assert runs.try_claim(uri, "exp", "cfg1") is None, "held by a live process"
        assert runs.is_claimed(uri, "exp", "cfg1")
        other = runs.try_claim(uri, "exp", "cfg2")
        assert other is not None and "pid" in other.holder(), "other configs are free"
        other.release()
        assert runs.try_claim(uri, "other-exp", "cfg1") is not None, "claims are per experiment"
    finally:
        holder.kill()
        holder.wait(timeout=30)
    again = runs.try_claim(uri, "exp", "cfg1")
    assert again is not None, "SIGKILL of the holder frees its claim"
    again.release()
    assert (tmp_path / "mlflow.db.kdp-claims").is_dir(), "claim files live beside the SQLite store"
    assert not (tmp_path / "mlflow.db").exists(), "claiming never creates the store"


def test_filters_are_built_in_one_place():
    assert runs.student_filter("abc", "FINISHED") == ("tags.`kdp.role` = 'student' and tags.`kdp.cfg_hash` = 'abc' "
                                                      "and attributes.status = 'FINISHED'")
    assert runs.sweep_filter("h1", "RUNNING") == ("tags.`kdp.role` = 'sweep' and tags.`kdp.spec_hash` = 'h1' and "
                                                  "attributes.status = 'RUNNING'")
    assert runs.student_filter(sweep="p1") == "tags.`kdp.role` = 'student' and tags.`kdp.sweep` = 'p1'"
