"""Hostile round 3, the cases that need no training: `ls` on a store written by plain MLflow, the resume
counters, and the failure reason of an interrupted trial (issue 30, cases 8, 9 and 11).
"""

from __future__ import annotations

import io

from mlflow.tracking import MlflowClient
from rich.console import Console
from typer.testing import CliRunner


def test_ls_on_a_plain_mlflow_store_says_what_it_holds(tmp_path, monkeypatch):
    from kdplatform.cli import app

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    for name, n in (("a", 2), ("b", 1)):
        exp = client.create_experiment(name)
        for _ in range(n):
            client.set_terminated(client.create_run(exp).info.run_id)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["ls", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "no kdplatform sweeps or runs in this store; it holds 3 other run(s) in 2 experiment(s)" in text, text
    assert "kdplatform ui" in text


def test_ls_on_an_empty_store_still_says_it_is_empty(tmp_path, monkeypatch):
    from kdplatform.cli import app

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    result = CliRunner().invoke(app, ["ls", "--tracking-uri", uri])
    assert result.exit_code == 0 and "no sweeps or runs in this store yet" in result.stdout, result.output


def test_resumed_progress_never_counts_past_the_total():
    """A trial Ray saved as ended that reports again after the restore replaces its entry: [3/3], not [4/3]."""
    from kdplatform.sweep.progress import SweepMonitor

    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    monitor = SweepMonitor(console, 3, 1)
    with monitor:
        monitor.already_ended(["t1"])
        for trial_id, status in (("t1", "SKIPPED"), ("t2", "FINISHED"), ("t3", "FINISHED")):
            monitor.trial_started(trial_id, trial_id)
            monitor.trial_done(trial_id, status, {"kdp_run_name": trial_id})
    text = out.getvalue()
    assert "[3/3]" in text and "[4/3]" not in text, text


def test_a_skipped_trial_counts_as_already_done_not_as_run_now():
    from kdplatform.sweep.session import counts_of

    class Plan:  # counts_of reads only the trial list
        trials = [object(), object(), object()]

    rows = [{"status": "SKIPPED"}, {"status": "FINISHED"}, {"status": "FAILED"}]
    counts = counts_of(rows, Plan(), already_done=0)
    assert counts == {"trials": 3, "already_done": 1, "ran": 2, "finished": 1, "failed": 1, "stopped_early": 0}


def test_interrupted_trials_say_interrupted_by_the_user(tmp_path):
    from kdplatform import runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e")
    parent = client.create_run(exp).info.run_id
    stopped, diverged = (client.create_run(exp, tags={runs.PARENT: parent}).info.run_id for _ in range(2))
    client.set_tag(stopped, runs.FAILURE_REASON, "SystemExit: 0")  # what Ray's stop leaves in a worker
    client.set_tag(diverged, runs.FAILURE_REASON, "the loss is non-finite at step 3")
    for r in (stopped, diverged):
        client.set_terminated(r, status="KILLED")
    runs.mark_interrupted(uri, "e", parent)
    assert client.get_run(stopped).data.tags[runs.FAILURE_REASON].startswith("interrupted by the user")
    assert client.get_run(diverged).data.tags[runs.FAILURE_REASON] == "the loss is non-finite at step 3"


def test_a_claim_folder_that_cannot_be_written_is_a_clean_store_error(tmp_path, monkeypatch):
    """Claims of a server store live in the cache; one that cannot be made is exit 2, not an OSError."""
    import pytest

    from kdplatform import runs
    from kdplatform.store_check import StoreUnusable

    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("KDP_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    with pytest.raises(StoreUnusable, match="cannot write the claim file") as e:
        runs.try_claim("http://127.0.0.1:5999", "e", "sweep-1")
    assert "KDP_CACHE_DIR" in str(e.value)
