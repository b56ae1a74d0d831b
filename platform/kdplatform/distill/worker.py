"""The worker layer's entry points, for the orchestrator and the CLI: run one trial, and what it may raise.

`run_trial` (distill/student.py) runs one resolved trial to a finished MLflow run; the training loop is
distill/engine.py, the teacher fine-tune distill/teacher.py.
"""

from kdplatform.distill.engine import DivergedError
from kdplatform.distill.objective import TrialSetupError
from kdplatform.distill.student import Callbacks, TrialResult, run_trial

__all__ = ["Callbacks", "DivergedError", "TrialResult", "TrialSetupError", "run_trial"]
