"""The closing "Open the report" hint carries the environment settings `kdplatform report` reads (the GLUE
folder that draws the majority-class level), quoted so the hint works pasted into another shell."""

from __future__ import annotations

import shlex

from kdplatform.sweep.session import report_env


def test_the_hint_names_the_glue_folder_quoted(monkeypatch):
    monkeypatch.setenv("KDP_GLUE_DIR", "/data/my glue")
    words = shlex.split(report_env() + "kdplatform report --experiment quickstart")
    assert words[0] == "KDP_GLUE_DIR=/data/my glue" and words[1] == "kdplatform"


def test_without_the_setting_the_hint_starts_with_the_command(monkeypatch):
    monkeypatch.delenv("KDP_GLUE_DIR", raising=False)
    assert report_env() == ""
