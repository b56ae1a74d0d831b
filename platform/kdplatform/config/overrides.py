"""Command-line overrides: `key.path=value` set on a file's raw YAML before it is validated (as in Hydra or
torchtune), so an override is checked exactly like the file.

A key is a path of the file: a top-level key (`seeds`, `method`, `max_trials`), a section path
(`data.max_seq_length`, `teacher.finetune.epochs`), a stage by name (`train.pred.lr`: the stage entry is created
when the file has none), or a whole grid axis / search dimension (`grid.train.pred.lr`, `search.space.bits`).
A value is read as YAML: `1e-4`, `[1, 2]`, `true`, `null`, `{type: choice, values: [2, 4]}`.

>>> raw = {"train": [{"name": "pred", "epochs": 2}]}
>>> _ = apply_overrides(raw, ["train.pred.lr=1e-4", "seeds=[1]"])
>>> raw
{'train': [{'name': 'pred', 'epochs': 2, 'lr': 0.0001}], 'seeds': [1]}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from kdplatform.config.errors import ConfigError
from kdplatform.config.yaml_io import load_yaml_text

MAX_OVERRIDE_CHARS = 10_000
# sections whose keys are themselves dotted paths: an override sets one of their entries whole
_WHOLE_ENTRY = ("grid.", "search.space.")
_KEY = re.compile(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*")


@dataclass(frozen=True)
class Override:
    """One `key=value` of the command line; `target` is where it landed, as error paths name it."""

    text: str
    key: str
    value: Any
    target: str = ""


def parse_override(text: str, file: Any = None) -> Override:
    """`key.path=value` -> Override (value read as YAML); ConfigError naming the override otherwise."""
    def refuse(message: str, fix: str) -> ConfigError:
        return ConfigError(file, f"override '{text[:200]}'", message, fix)

    if len(text) > MAX_OVERRIDE_CHARS:
        raise refuse(f"longer than {MAX_OVERRIDE_CHARS} characters", "put long values in the file")
    key, eq, value_text = text.partition("=")
    key = key.strip()
    if not eq or not _KEY.fullmatch(key):
        raise refuse("not a key.path=value override", "write e.g. train.pred.lr=1e-4 or seeds=[1,2]")
    if not value_text.strip():
        raise refuse("no value after '='", f"write {key}=null to clear a setting")
    try:
        value, _ = load_yaml_text(value_text, file, what="the override")
    except ConfigError as e:
        raise refuse(f"the value is not YAML ({e.message})", _yaml_fix(key, value_text)) from None
    return Override(text, key, value)


def _yaml_fix(key: str, value_text: str) -> str:
    """A fix for a value YAML cannot read: close an open list/mapping, else quote the text."""
    v = value_text.strip()
    for opening, closing in (("[", "]"), ("{", "}")):
        if v.startswith(opening) and v.count(opening) > v.count(closing):
            return f"close the {'list' if opening == '[' else 'mapping'} and quote the whole override for the " \
                   f"shell: '{key}={v}{closing * (v.count(opening) - v.count(closing))}'"
    return f"quote text inside the value, e.g. {key}='\"{v}\"'"


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], file: Any = None) -> list[Override]:
    """Set each `key=value` on `raw` in order (a later one wins); the applied overrides, with their targets."""
    return [_apply(raw, parse_override(text, file), file) for text in overrides]


def _apply(raw: dict[str, Any], ov: Override, file: Any) -> Override:
    parts = ov.key.split(".")
    head = next((p for p in _WHOLE_ENTRY if ov.key.startswith(p) and len(ov.key) > len(p)), None)
    if head:  # grid.train.pred.lr: the axis name keeps its dots
        parts = head.rstrip(".").split(".") + [ov.key[len(head):]]
    node, target = raw, ov.key
    if parts[0] == "train" and len(parts) >= 3 and not head:  # a stage, by name
        stages = raw.setdefault("train", [])
        if not isinstance(stages, list):
            raise ConfigError(file, f"override '{ov.text}'", "train is not a list of stages in the file",
                              "fix the file's train: section")
        index = next((i for i, st in enumerate(stages) if isinstance(st, dict) and st.get("name") == parts[1]), None)
        created = index is None
        if created:  # a stage the file does not mention: the whole entry is the override's
            stages.append({"name": parts[1]})
            index = len(stages) - 1
        node, parts = stages[index], parts[2:]
        target = f"train[{index}]" if created else f"train[{index}]." + ".".join(parts)
    _set(node, parts, ov, file)
    return Override(ov.text, ov.key, ov.value, target)


def _set(node: dict[str, Any], parts: list[str], ov: Override, file: Any) -> None:
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if nxt is None:  # `consistency:` left empty in the file
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(file, f"override '{ov.text}'", f"{'.'.join(parts[:i + 1])} is a value in the file, "
                              "not a section", "override the value itself")
        node = nxt
    node[parts[-1]] = ov.value


def blame_override(e: ConfigError, applied: Sequence[Override]) -> ConfigError:
    """An error in a value an override set names that override (the file's line would mislead)."""
    for ov in reversed(applied):  # the last override of a key is the one that took effect
        if e.path == ov.target or e.path.startswith((ov.target + ".", ov.target + "[")):
            return ConfigError(e.file, f"override '{ov.text}'", e.message, e.fix)
    if applied and not e.path.startswith("override '"):
        fix = (e.fix + "; " if e.fix else "") + "the command line also set " + \
            ", ".join(f"'{ov.text}'" for ov in applied)
        return ConfigError(e.file, e.path, e.message, fix, line=e.line)
    return e


def refuse_shadowed(applied: Sequence[Override], grid: dict[str, Any], file: Any) -> None:
    """An override of a setting the file's grid sets for every trial would change nothing: refused."""
    for ov in applied:
        if ov.key in grid:
            raise ConfigError(file, f"override '{ov.text}'", "this key is a grid axis of the file, whose values "
                              "replace it in every trial", f"override the axis: grid.{ov.key}=[...]")
