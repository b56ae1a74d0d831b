"""The YAML reference's schema example (docs/config.md, linked from the README) is a valid file: saved as is,
it loads, validates and expands."""

from __future__ import annotations

import re
from pathlib import Path

from kdplatform.config import load_trials

CONFIG_DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_the_readme_schema_example_loads_and_its_override_applies(tmp_path):
    section = CONFIG_DOC.read_text(encoding="utf-8").split("\n## The YAML schema\n", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    path = tmp_path / "schema.yaml"
    path.write_text(block, encoding="utf-8")
    spec, trials, _ = load_trials(path)  # an override whose `when` matches no trial is an error
    assert trials and spec.overrides
    when = spec.overrides[0].when
    matched = [t for t in trials if all(str(getattr(t, k)) == str(v) for k, v in when.items())]
    assert matched and len(matched) < len(trials)
