"""Optuna over a sweep's trials, through Ray Tune, for methods of more than one stage.

A method's first stages (ILD, a QAT student's attention stages) train no head, so their evals report no dev
score. Ray's OptunaSearch reads its metric from every intermediate result and fails the whole sweep on the
first that lacks it (`KeyError: 'dev/best_score'`). This one passes those results over: Optuna is told each
dev score as it comes, and the trial's final result (which has it) completes the trial as before.

Its own module, imported only when a sweep has `search:`: the searcher is pickled with the experiment state
(`--resume`), so the class must be importable by name.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch


class StageAwareOptunaSearch(OptunaSearch):
    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)
