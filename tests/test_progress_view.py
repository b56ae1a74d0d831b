"""What `run` and `sweep` show while training: the per-step view and the live step column."""

from __future__ import annotations

import io

from rich.console import Console

from kdplatform.sweep import progress
from kdplatform.sweep.progress import SweepMonitor
from kdplatform.sweep.step_view import StepProgress


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=120, color_system=None), buf


def test_plain_lines_every_tenth_of_a_stage_without_a_terminal() -> None:
    console, buf = _console(False)
    with StepProgress(console, line_every_s=3600) as show:
        for step in range(1, 101):
            show("fine-tuning teacher sst2/minilm-l6", step, 100)
        for step in range(1, 4):
            show("sst2/kd/b32/s42 pred", step, 3)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "fine-tuning teacher sst2/minilm-l6 ...  (100 steps)"
    assert lines[1:11] == [f"  fine-tuning teacher sst2/minilm-l6: step {n}/100 ({n}%)" for n in range(10, 101, 10)]
    assert lines[11:] == ["sst2/kd/b32/s42 pred ...  (3 steps)"] + [
        f"  sst2/kd/b32/s42 pred: step {n}/3 ({n / 3:.0%})" for n in (1, 2, 3)]


def test_a_bar_per_stage_on_a_terminal() -> None:
    console, buf = _console(True)
    with StepProgress(console) as show:
        for step in range(1, 51):
            show("sst2/kd/b32/s42 pred", step, 50)
    out = buf.getvalue()
    assert "sst2/kd/b32/s42 pred" in out and "50/50" in out and "step 50/50" not in out


def test_sweep_view_shows_each_running_trials_stage_and_step(monkeypatch) -> None:
    console, buf = _console(True)
    monitor = SweepMonitor(console, total=2)
    monitor.trial_started("t1", "sst2/kd/b32/s1")
    monitor.trial_result("t1", {"step": 40, "kdp_task": "sst2"})
    monitor.trial_started("t2", "sst2/kd/b32/s2")
    monitor.trial_steps("t2", {"label": "sst2/kd/b32/s2 pred", "step": 120, "total": 400})
    console.print(monitor.render())
    rows = [line for line in buf.getvalue().splitlines() if "sst2/kd/b32/s" in line]
    assert "40" in rows[0] and "pred 120/400" in rows[1]

    plain, pbuf = _console(False)
    monkeypatch.setattr(progress, "STEP_LINES_S", 0.0)
    monitor = SweepMonitor(plain, total=1)
    monitor.trial_started("t1", "sst2/kd/b32/s1")
    monitor.trial_steps("t1", {"label": "sst2/kd/b32/s1 ild", "step": 7, "total": 9})
    assert pbuf.getvalue().splitlines() == ["  running sst2/kd/b32/s1: ild 7/9"]


def test_sweep_view_shows_a_training_teachers_step(monkeypatch) -> None:
    from types import SimpleNamespace

    teacher = SimpleNamespace(teacher_hash="0123456789abcdef", trial=SimpleNamespace(task="rte"), error=None)
    console, buf = _console(True)
    monitor = SweepMonitor(console, total=4)
    monitor.teacher_update(teacher, "running")
    monitor.teacher_steps(teacher, {"label": "fine-tuning teacher rte/minilm-l6", "step": 30, "total": 117})
    console.print(monitor.render())
    assert "teacher 01234567 (rte): fine-tuning, step 30/117" in buf.getvalue()

    plain, pbuf = _console(False)
    monkeypatch.setattr(progress, "STEP_LINES_S", 0.0)
    monitor = SweepMonitor(plain, total=4)
    monitor.teacher_steps(teacher, {"label": "fine-tuning teacher rte/minilm-l6", "step": 117, "total": 117})
    assert pbuf.getvalue().splitlines() == ["  teacher 01234567 (rte): fine-tuning, step 117/117"]
