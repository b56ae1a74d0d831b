# Types of the lazily imported Python API (see __init__.py).
from kdplatform.api import build_report as build_report
from kdplatform.api import expand as expand
from kdplatform.api import load_spec as load_spec
from kdplatform.api import run_sweep as run_sweep
from kdplatform.api import run_trial as run_trial

__all__ = ["build_report", "expand", "load_spec", "run_sweep", "run_trial"]
