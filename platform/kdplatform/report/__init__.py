"""Reporting layer: MLflow runs -> pandas -> paper tables and plotly figures (never imports torch).

`collect` reads runs (public MLflow API, or a version-checked SQL fast path), `stages` places each evaluation
in its training stage, `reference` computes the majority-class level from the GLUE dev labels, `stats` the
seed differences to a baseline, `tables` and `figures` build the content, `dashboards` says what a page holds,
`render` writes the output folder; `render.report_command` is the `kdplatform report` entry point.
"""

from kdplatform.report.collect import ReportData, ReportError, collect_runs, default_tracking_uri

__all__ = ["ReportData", "ReportError", "collect_runs", "default_tracking_uri"]
