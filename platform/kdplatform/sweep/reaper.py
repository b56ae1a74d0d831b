"""The local Ray cluster ends with the sweep driver that started it, however the driver ends (SIGKILL too).

`ray.shutdown()` stops the cluster when the driver exits on its own, but a driver killed with SIGKILL (or
the OOM killer) runs no code, and Ray's dashboard agent, runtime-env agent, GCS and raylet outlived it. So
once the local cluster is up, `start(session_dir)` launches this module as a small watcher in a session of
its own (a signal to the driver's process group does not reach it). While the driver lives, the watcher
notes every process descended from it, twice a second (Ray's agents and workers rename themselves
`ray::DashboardAgent`, `ray::RuntimeEnvAgent`, `ray::<trial>`, so their command lines say nothing); when the
driver exits (`pidfd`), it ends those still alive, and every process whose command line names the session
folder, SIGTERM first and SIGKILL after GRACE_S. A process is known by (pid, start time): a pid the kernel
reused for something else is never signalled.
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
            if needle in (entry / "cmdline").read_bytes() and _stat(pid)[0] != "Z":
                found.append(pid)
        except (OSError, IndexError):
            continue
    return found


def descendants(root: int) -> dict[int, str]:
    """Every live process below `root`: pid -> start time (from /proc)."""
    parent_of, started = {}, {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = _stat(int(entry.name))
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            parent_of[int(entry.name)], started[int(entry.name)] = int(fields[1]), fields[19]
    found, frontier = {}, {root}
    while frontier:
        frontier = {p for p, pp in parent_of.items() if pp in frontier and p not in found}
        found.update({p: started[p] for p in frontier})
    return found


def alive(known: dict[int, str]) -> dict[int, str]:
    """The processes of `known` still running as themselves (same pid, same start time)."""
    out = {}
    for pid, start in known.items():
        try:
            fields = _stat(pid)
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and fields[19] == start:
            out[pid] = start
    return out


def end(known: dict[int, str], session_dir: str, grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM the processes of `known` still alive (and their children) and those naming `session_dir`,
    SIGKILL those left after `grace_s`; returns the pids signalled."""
    def targets() -> dict[int, str]:
        now = alive(known)
        for pid in list(now):
            now.update(descendants(pid))  # e.g. a worker a reaped raylet started after the last look
        for pid in session_processes(session_dir):
            try:
                now.setdefault(pid, _stat(pid)[19])
            except (OSError, IndexError):
                continue
        now.pop(os.getpid(), None)
        known.update(now)
        return now

    first = targets()
    for pid in first:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and targets():
        time.sleep(0.2)
    for pid in targets():
        _signal(pid, signal.SIGKILL)
    return sorted(first)


def watch(driver: int, session_dir: str, every_s: float = 0.5) -> list[int]:
    """Note the driver's descendants until it exits, then end them; returns the pids signalled."""
    known: dict[int, str] = {}
    try:
        fd = os.pidfd_open(driver)
    except ProcessLookupError:
        return end(known, session_dir)
    try:
        while True:
            known.update(descendants(driver))
            if select.select([fd], [], [], every_s)[0]:  # readable once the driver has exited
                break
    finally:
        os.close(fd)
    return end(known, session_dir)


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat fields from the state on (state, ppid, ..., index 19: start time)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str]) -> None:
    driver, session_dir = int(argv[0]), argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the sweep is the driver's to handle
    watch(driver, session_dir)


if __name__ == "__main__":  # pragma: no cover - the watcher's own process
    main(sys.argv[1:])
