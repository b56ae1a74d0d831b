"""The local Ray cluster ends with the sweep driver, however the driver ends (issue 30, case 12).

- Fast: real processes stand in for the driver and Ray's helpers (their command lines name a session folder,
  as Ray's do); SIGKILL of the driver and the watcher (`python -m kdplatform.sweep.reaper`) ends the helpers,
  SIGTERM first, while a process of another session is left alone.
- Slow: a real sweep on a real local Ray cluster, its driver killed with SIGKILL mid-trial: within seconds no
  process of its Ray session (GCS, raylet, dashboard and runtime-env agents, workers) is left. Measured: 9
  processes under the driver, none left 5.6 s after SIGKILL; the same test against the code before the
  watcher left ray::DashboardAgent and ray::RuntimeEnvAgent running 60 s later.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from kdplatform.sweep.reaper import alive, descendants, session_processes

SLEEPER = "import time; time.sleep(300)"
# a stand-in for the driver: it starts two children that rename nothing but name no session either (as Ray's
# agents and workers, whose titles become ray::DashboardAgent, ray::<trial>), prints their pids and waits
DRIVER = ("import subprocess, sys, time\n"
          "kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']) for _ in range(2)]\n"
          "print(' '.join(str(k.pid) for k in kids), flush=True)\n"
          "time.sleep(300)\n")


def _sleeper(*names: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLEEPER, *names], start_new_session=True)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _gone(pids: list[int], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.2)
    return False


def test_the_watcher_ends_the_drivers_processes_once_the_driver_is_killed(tmp_path):
    session = str(tmp_path / f"session_{uuid.uuid4().hex}")
    other = str(tmp_path / f"session_{uuid.uuid4().hex}")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    children = [int(p) for p in driver.stdout.readline().split()]
    named = _sleeper(f"--session-dir={session}")  # not a descendant: found by its command line
    bystander = _sleeper(f"--session-dir={other}")
    watcher = subprocess.Popen([sys.executable, "-m", "kdplatform.sweep.reaper", str(driver.pid), session],
                               start_new_session=True)
    try:
        time.sleep(2.0)  # the watcher has looked at the driver's children
        assert all(_alive(p) for p in children) and named.poll() is None, "the watcher must wait for the driver"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=20)
        assert _gone(children + [named.pid], 20), "processes of the killed driver outlived it"
        assert watcher.wait(timeout=20) == 0
        assert bystander.poll() is None, "a process of another session was ended"
        assert named.wait(timeout=10) == -signal.SIGTERM  # asked first, not killed
    finally:
        for p in (driver, named, bystander, watcher):
            if p.poll() is None:
                p.kill()
                p.wait()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.e2e
def test_sigkill_of_a_real_sweep_driver_leaves_no_ray_process(tmp_path, glue_dir, tiny_bert_dir):
    import shutil
    import tempfile

    from conftest import write_yaml
    from ray_sweeps import TINY_SWEEP_SPEC, kill_session_leftovers, sweep_cmd, sweep_env, teacher_checkpoint

    ray_tmp = Path(tempfile.mkdtemp(prefix="kdpray", dir="/tmp"))
    env = sweep_env(tmp_path, ray_tmp, KDP_FAULTS="sst2/*:slow@0:0.8")
    tree: dict[int, str] = {}
    try:
        ckpt = teacher_checkpoint(tiny_bert_dir, tmp_path / "teacher_ckpt")
        text = TINY_SWEEP_SPEC.format(name="reaped", glue=glue_dir, teacher=tiny_bert_dir, ckpt=ckpt)
        spec = write_yaml(tmp_path / "sweep.yaml", text)
        log = tmp_path / "driver.log"
        with open(log, "w") as out:
            driver = subprocess.Popen(sweep_cmd(spec, f"sqlite:///{tmp_path / 'mlflow.db'}"), cwd=tmp_path, env=env,
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None and \
                not glob.glob(str(tmp_path / "ray_results" / "*" / "*" / "checkpoint_*")):
            time.sleep(0.3)
        assert driver.poll() is None, log.read_text()[-3000:]
        tree = descendants(driver.pid)  # GCS, raylet, agents (ray::DashboardAgent, ...), the trial's worker
        titles = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:60] for p in tree if Path(f"/proc/{p}").exists()}
        assert len(tree) >= 5 and any(b"ray::" in t for t in titles.values()), titles
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        start = time.monotonic()
        while time.monotonic() - start < 60 and (alive(tree) or session_processes(str(ray_tmp))):
            time.sleep(0.5)
        left = {p: titles.get(p) for p in alive(tree)} | {p: b"(names the session)" for p in
                                                            session_processes(str(ray_tmp))}
        print(f"{len(tree)} processes under the driver; {len(left)} left {time.monotonic() - start:.1f}s after "
              f"SIGKILL: {left}")
        assert not left, left
    finally:
        kill_session_leftovers(ray_tmp)
        for pid in alive(tree):  # renamed agents (ray::...) the command-line sweep above cannot see
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
