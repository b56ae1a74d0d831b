"""Fault injection for tests and chaos runs (documented in README, 'Reliability').

Set `KDP_FAULTS` to `;`-separated rules `<run-name glob>:<kind>@<step>[:<arg>]`, where kind is
- `raise`: raise `InjectedFault` once at that step (a marker file in `KDP_FAULTS_DIR` makes it once per
  trial, so a retried trial then succeeds),
- `nan`: make the loss NaN from that step on (the trial diverges and is marked FAILED),
- `kill`: SIGKILL the trial's own process once at that step,
- `slow`: sleep `arg` seconds at every step from that step on.

Example: `KDP_FAULTS='sst2/kd/*:raise@3;sst2/tinybert/*:nan@2'`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import signal
import time

from kdplatform import paths


class InjectedFault(RuntimeError):
    """Raised by a `raise` fault rule."""


_RULE = re.compile(r"^(?P<glob>.*?):?(?P<kind>raise|nan|kill|slow)@(?P<step>\d+)(?::(?P<arg>[\d.]+))?$")


def _rules(run_name: str) -> list[tuple[str, int, str]]:
    out = []
    for rule in filter(None, (r.strip() for r in paths.fault_rules().split(";"))):
        m = _RULE.match(rule)
        if m is None:
            raise ValueError(f"KDP_FAULTS: cannot parse rule {rule!r}; expected <glob>:<kind>@<step>[:<arg>]")
        if fnmatch.fnmatch(run_name, m["glob"] or "*"):
            out.append((m["kind"], int(m["step"]), m["arg"] or ""))
    return out


def _once(run_name: str, kind: str, step: int) -> bool:
    """True the first time this (trial, fault) fires; marker files survive process restarts."""
    root = paths.fault_markers_root()
    root.mkdir(parents=True, exist_ok=True)
    marker = root / hashlib.sha256(f"{run_name}|{kind}|{step}".encode()).hexdigest()[:16]
    try:
        marker.touch(exist_ok=False)
        return True
    except FileExistsError:
        return False


class FaultPlan:
    """The rules that apply to one run, parsed once; call it at every step (the engine's on_step hook)."""

    def __init__(self, run_name: str):
        self.run_name = run_name
        self.rules = _rules(run_name)

    def __call__(self, step: int) -> float:
        """Apply the faults for this step; returns the factor to multiply the loss by (NaN for `nan`)."""
        factor = 1.0
        for kind, at, arg in self.rules:
            if kind == "slow" and step >= at:
                time.sleep(float(arg or 1.0))
            elif kind == "nan" and step >= at:
                factor = float("nan")
            elif step == at and kind == "raise" and _once(self.run_name, kind, at):
                raise InjectedFault(f"injected fault at step {step} ({self.run_name})")
            elif step == at and kind == "kill" and _once(self.run_name, kind, at):
                os.kill(os.getpid(), signal.SIGKILL)
        return factor


def loss_factor(run_name: str, step: int) -> float:
    """One step's faults for a run (parses the rules each call: for tests and one-off use)."""
    return FaultPlan(run_name)(step)
