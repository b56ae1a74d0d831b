"""The local Ray cluster ends with the sweep driver that started it, however the driver ends (SIGKILL too).

`ray.shutdown()` stops the cluster when the driver exits on its own, but a driver killed with SIGKILL (or
the OOM killer) runs no code, and Ray's dashboard agent, runtime-env agent, GCS and raylet outlived it. So
once the local cluster is up, `start(session_dir)` launches this module as a small watcher in a session of
its own (a signal to the driver's process group does not reach it): it waits for the driver to exit
(`pidfd`), then ends every process of that Ray session, SIGTERM first and SIGKILL after GRACE_S.

A process belongs to the session when its command line names the session folder (Ray passes
`--session-dir`, `--log_dir`, socket paths under it to every process it starts); the folder name holds the
date and the driver's pid, so no other cluster, nor another user's, matches.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE_S = 5.0


def start(session_dir: str) -> subprocess.Popen:
    """Watch this process; when it exits, end the Ray processes of `session_dir`."""
    return subprocess.Popen([sys.executable, "-m", "kdplatform.sweep.reaper", str(os.getpid()), session_dir],
                            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, close_fds=True)


def session_processes(session_dir: str) -> list[int]:
    """Live processes (not zombies) whose command line names `session_dir`, this one excepted."""
    needle, found = session_dir.encode(), []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes() and \
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(pid)
        except (OSError, IndexError):
            continue
    return found


def end_session(session_dir: str, grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM every process of the session, SIGKILL those left after `grace_s`; returns the pids signalled."""
    pids = session_processes(session_dir)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and session_processes(session_dir):
        time.sleep(0.2)
    for pid in session_processes(session_dir):
        _signal(pid, signal.SIGKILL)
    return pids


def wait_for_exit(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone
    try:
        select.select([fd], [], [])  # readable once the process has exited
    finally:
        os.close(fd)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str]) -> None:
    driver, session_dir = int(argv[0]), argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the sweep is the driver's to handle
    wait_for_exit(driver)
    end_session(session_dir)


if __name__ == "__main__":  # pragma: no cover - the watcher's own process
    main(sys.argv[1:])
