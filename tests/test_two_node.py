"""More than one machine, for real: a token-auth Ray cluster of two nodes started with `ray start`.

The head offers no CPUs (as in docker/compose.yaml), a second node joins it with the cluster's token, and
`kdplatform sweep --address` runs a small grid against that cluster. Every process listens on 127.0.0.1.
The test then checks, with the plain MLflow client and Ray's own node list, that each trial ran on the
joined node (the `kdp.node` tag of its run), the teacher was fine-tuned once, and every trial has its run.

Both nodes run in sessions of their own and are stopped by killing exactly those sessions: `ray stop
--force` would stop every Ray process on the machine, other users' clusters included.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import cli_env, kill_session, write_yaml

pytestmark = pytest.mark.slow

SPEC = """
name: twonode
task: sst2
data: {{glue_dir: {glue}, source: glue_dir, max_train_examples: 64, max_dev_examples: 32,
        train_eval_examples: 32, max_seq_length: 32}}
teacher: {{model: {teacher}, finetune: {{epochs: 1, max_steps: 4, batch_size: 16}}}}
student: {{init: truncate, layers: 2}}
train:
  - {{name: pred, epochs: 1, batch_size: 16, eval_every: 2}}
grid:
  method: [kd]
seeds: [1, 2]
resources: {{cpu: 1}}
max_concurrent_trials: 2
max_failures: 0
"""

NODES = """
import json, ray
ray.init(address="{address}", log_to_driver=False)
print(json.dumps([{{"id": n["NodeID"], "alive": n["Alive"], "cpu": n["Resources"].get("CPU", 0)}}
                  for n in ray.nodes()]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(args: list[str], env: dict, sessions: list[int]) -> None:
    """`ray start ...` (it returns once the node is up), in a session of its own that the test ends later."""
    proc = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    sessions.append(proc.pid)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]


def _nodes(address: str, env: dict) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", NODES.format(address=address)], env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _runs(uri: str, role: str) -> list:
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("twonode")
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`kdp.role` = '{role}'")


def test_a_sweep_runs_its_trials_on_a_node_that_joined_a_token_auth_cluster(
        tmp_path, glue_dir, tiny_bert_dir, mlflow_uri):
    spec = write_yaml(tmp_path / "sweep.yaml", SPEC.format(glue=glue_dir, teacher=tiny_bert_dir))
    env = cli_env(tmp_path, KDP_CACHE_DIR=str(tmp_path / "cache"), RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    address = f"127.0.0.1:{_free_port()}"
    temp_dir = tempfile.mkdtemp(prefix="kdpray", dir="/tmp")  # short: Ray's socket paths live under it
    sessions: list[int] = []
    try:
        _ray_start(["--head", "--num-cpus", "0", "--num-gpus", "0", "--node-ip-address", "127.0.0.1",
                    "--port", address.split(":")[1], "--include-dashboard", "false", "--temp-dir", temp_dir,
                    "--disable-usage-stats"], env, sessions)
        _ray_start(["--address", address, "--num-cpus", "2", "--num-gpus", "0", "--node-ip-address",
                    "127.0.0.1", "--disable-usage-stats"], env, sessions)
        nodes = [n for n in _nodes(address, env) if n["alive"]]
        assert len(nodes) == 2, nodes
        worker = [n["id"] for n in nodes if n["cpu"] > 0]
        assert len(worker) == 1, nodes

        sweep = subprocess.run([sys.executable, "-m", "kdplatform.cli", "sweep", str(spec), "--address", address,
                                "--tracking-uri", mlflow_uri, "--storage", str(tmp_path / "ray_results")],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
        out = " ".join((sweep.stdout + sweep.stderr).split())
        assert sweep.returncode == 0, out[-4000:]
        assert "2 finished, 0 failed" in out, out[-4000:]
    finally:
        for sid in reversed(sessions):
            kill_session(sid)
        shutil.rmtree(temp_dir, ignore_errors=True)

    assert len(_runs(mlflow_uri, "teacher")) == 1, "the teacher is fine-tuned once, for both students"
    students = _runs(mlflow_uri, "student")
    assert sorted(r.info.run_name for r in students) == ["sst2/kd/b32/s1", "sst2/kd/b32/s2"]
    assert {r.info.status for r in students} == {"FINISHED"}
    assert {r.data.tags["kdp.node"] for r in students} == set(worker), "trials ran on the joined node"
    assert [r.info.status for r in _runs(mlflow_uri, "sweep")] == ["FINISHED"]
