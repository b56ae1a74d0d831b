"""The orchestrator: `kdplatform sweep` on Ray Tune (knows nothing of losses; the worker knows nothing of Ray).

- `expand.py`   plan: validated trials, dedupe against MLflow, spec hash, search bases (no Ray, no torch)
- `teachers.py` the teacher stage: each distinct teacher fine-tuned once, as Ray tasks, before any student
- `tune.py`     the Ray trainable around `distill.worker.run_trial`, the Tuner config, the driver callback
- `progress.py` --dry-run tables, the live progress view, the summary
- `live_steps.py` the step counts Ray workers (trials, teachers) write for that view, through side files
- `session.py`  what `run` and `sweep` share: the spec claim, the parent run, orphans, the summary
- `driver.py`   `run_sweep`: the whole command, top to bottom
- `reaper.py`   a watcher that ends the local Ray cluster once the driver has exited, SIGKILL included
- `local.py`    `run_local`: `kdplatform run`, the sweep without Ray (in this process)
"""
