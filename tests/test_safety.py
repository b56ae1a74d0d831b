"""Safety: config text is never code, checkpoints are never pickles, credentials never reach the store.

- The package source (AST, not grep, so `model.eval()` is not a false alarm): no `eval`/`exec`/`compile`
  builtins, YAML only through `yaml.safe_load`/`safe_dump` or a `yaml.SafeLoader` subclass, every
  `torch.load` with `weights_only=True`, no pickle loading, no `numpy.load(allow_pickle=True)`.
- `kdplatform ui` binds 127.0.0.1 unless told otherwise; nothing in the package turns Ray's token auth off.
- A real trial run with credentials in the environment (MLflow, Hugging Face, AWS) and a password in the
  file's tracking URI: the secrets appear in no param, tag, metric, artifact, cache file or console output.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
from conftest import tiny_sst2
import yaml
from typer.testing import CliRunner

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "kdplatform"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    elif parts:  # a method of a call's or subscript's result, `f(x).eval()`: not the builtin
        parts.append("<expr>")
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_sources_were_found():
    assert len(SOURCES) > 15 and any(p.name == "yaml_io.py" for p in SOURCES)  # the YAML reader


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_code_from_data(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    problems = []
    for call in _calls(tree):
        name = _dotted(call.func)
        where = f"{path.relative_to(PACKAGE)}:{call.lineno}"
        if name in ("eval", "exec", "compile", "builtins.eval", "builtins.exec", "__import__"):
            problems.append(f"{where}: {name}() of text")
        if name in ("pickle.load", "pickle.loads", "cPickle.load", "dill.load", "joblib.load", "yaml.unsafe_load",
                    "yaml.full_load", "yaml.load_all", "yaml.full_load_all", "yaml.unsafe_load_all"):
            problems.append(f"{where}: {name}()")
        if name in ("np.load", "numpy.load") and isinstance(_kw(call, "allow_pickle"), ast.Constant) \
                and _kw(call, "allow_pickle").value is True:
            problems.append(f"{where}: {name}(allow_pickle=True)")
        if name == "torch.load":
            wo = _kw(call, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                problems.append(f"{where}: torch.load without weights_only=True")
        if name == "yaml.load":
            loader = _kw(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
            cls = None
            if isinstance(loader, ast.Name):
                cls = getattr(importlib.import_module(_module_name(path)), loader.id, None)
            elif isinstance(loader, ast.Attribute) and _dotted(loader).startswith("yaml."):
                cls = getattr(yaml, loader.attr, None)
            if not (isinstance(cls, type) and issubclass(cls, yaml.SafeLoader)):
                problems.append(f"{where}: yaml.load with a loader that is not a yaml.SafeLoader subclass")
    assert not problems, "\n".join(problems)


def test_the_scan_would_catch_the_unsafe_forms():
    bad = ("eval(x)\nexec(y)\nyaml.load(t, Loader=yaml.Loader)\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
           "pickle.loads(b)\nnp.load(f, allow_pickle=True)\n")
    names = [_dotted(c.func) for c in _calls(ast.parse(bad))]
    assert names == ["eval", "exec", "yaml.load", "torch.load", "torch.load", "pickle.loads", "np.load"]
    assert not [c for c in _calls(ast.parse("model.eval()\nstudent.eval()\ncopy(m).eval()\n"))
                if _dotted(c.func) == "eval"]


def test_yaml_reader_refuses_python_tags(tmp_path):
    """A YAML file cannot construct Python objects (the classic `!!python/object/apply` attack)."""
    from kdplatform.config import ConfigError, load_trials

    p = tmp_path / "evil.yaml"
    p.write_text("task: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load_trials(p)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_ray_token_auth_is_never_turned_off():
    text = "\n".join(p.read_text() for p in SOURCES)
    assert not re.search(r"RAY_AUTH_MODE['\"]?\s*[:=,]\s*['\"]?(disabled|none|off)", text, re.I)
    assert "auth_mode" not in text.lower().replace("ray_auth_mode", "")  # no ray.init(_system_config=...auth)


def test_ui_binds_localhost_unless_told_otherwise(monkeypatch, tmp_path):
    """The default host; the real server listening on 127.0.0.1 only is in test_ui_process.py."""
    from kdplatform import cli, ui_server

    help_text = CliRunner().invoke(cli.app, ["ui", "--help"], terminal_width=200).output
    assert "127.0.0.1" in help_text
    calls = []
    monkeypatch.setattr(ui_server, "serve", lambda uri, host, port, access, log=None: calls.append(host) or 0)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracking_client = __import__("mlflow.tracking", fromlist=["MlflowClient"]).MlflowClient(uri)
    tracking_client.search_experiments()  # the store exists: `ui` refuses a missing one
    assert CliRunner().invoke(cli.app, ["ui", "--tracking-uri", uri, "--port", "0"]).exit_code == 0
    wide = ["ui", "--tracking-uri", uri, "--port", "0", "--host", "0.0.0.0"]
    assert CliRunner().invoke(cli.app, wide).exit_code == 2  # other machines reach it: an access setting first
    assert CliRunner().invoke(cli.app, [*wide, "--read-only"]).exit_code == 0
    assert calls == ["127.0.0.1", "0.0.0.0"]


def test_redact_hides_passwords_in_uris():
    from kdplatform.tracking import redact

    assert redact("http://alice:s3cret@mlflow:5000/x") == "http://alice:***@mlflow:5000/x"
    assert redact("postgresql://u:p%40ss@db/mlflow") == "postgresql://u:***@db/mlflow"
    assert redact("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"


SECRETS = {"MLFLOW_TRACKING_PASSWORD": "s3cret-mlflow-pw-71", "MLFLOW_TRACKING_TOKEN": "s3cret-mlflow-tok-72",
           "HF_TOKEN": "hf_s3cretHfToken73", "AWS_SECRET_ACCESS_KEY": "s3cret-aws-74"}
URI_PASSWORD = "s3cret-uri-pw-75"
TRIAL = """
name: safety
tracking_uri: http://alice:{pw}@127.0.0.1:9/
task: sst2
method: tinybert
{tiny}
train:
  - {{name: ild, max_steps: 2, eval_every: 2, batch_size: 16}}
  - {{name: pred, max_steps: 2, eval_every: 2, batch_size: 16}}
"""


@pytest.mark.slow
def test_no_credential_reaches_params_tags_artifacts_or_output(tmp_path, glue_dir, tiny_bert_dir, monkeypatch,
                                                               capfd):
    from mlflow.tracking import MlflowClient

    from kdplatform.cli import app

    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("KDP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "trial.yaml").write_text(TRIAL.format(pw=URI_PASSWORD, tiny=tiny_sst2(glue_dir, tiny_bert_dir, layers=2)))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    result = CliRunner().invoke(app, ["run", "trial.yaml", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output + repr(result.exception)
    captured = capfd.readouterr()
    secrets = [*SECRETS.values(), URI_PASSWORD]

    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("safety").experiment_id])
    assert sorted(r.data.tags["kdp.role"] for r in runs) == ["student", "sweep", "teacher"]
    texts = {"console": result.output + captured.out + captured.err}
    for r in runs:
        texts[f"{r.info.run_name} params"] = repr(r.data.params)
        texts[f"{r.info.run_name} tags"] = repr(r.data.tags)
        texts[f"{r.info.run_name} metrics"] = repr(r.data.metrics)
        local = Path(c.download_artifacts(r.info.run_id, "", str(tmp_path / "dl" / r.info.run_id)))
        for f in local.rglob("*"):
            if f.is_file():
                texts[str(f)] = f.read_bytes().decode("utf-8", "replace")
    # and every byte written under the working directory: the store, artifacts, the teacher cache
    for f in tmp_path.rglob("*"):
        if f.is_file() and f.name != "trial.yaml":
            texts[str(f)] = f.read_bytes().decode("latin-1")
    assert any("config.yaml" in k for k in texts), "the trial's config artifact was checked"
    leaks = [(where, s) for where, text in texts.items() for s in secrets if s in text]
    assert not leaks, leaks
    assert "alice:***@" in next(v for k, v in texts.items() if k.endswith("config.yaml"))
