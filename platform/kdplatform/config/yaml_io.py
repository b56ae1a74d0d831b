"""Reading YAML files: safe loading, a line index for messages, and pydantic errors turned into ConfigError."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kdplatform.config.errors import ConfigError
from kdplatform.config.schema import SweepSpec

# Keys that once parsed but were never read: refused with the reason, so nobody believes they act.
REMOVED_KEYS = {
    ("search", "algorithm"): "the search is always Optuna's sampler (the only one kdplatform runs)",
    ("scheduler", "type"): "the scheduler is always ASHA (the only one kdplatform runs)",
}


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe loading that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_index(text: str) -> dict[tuple, int]:
    """Map each YAML path (tuple of keys/indices) to its 1-based line, for error messages."""
    index: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        index[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                kp = path + (k.value,)
                index[kp] = k.start_mark.line + 1
                walk(v, kp)
                index[kp] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return index
    if root is not None:
        walk(root, ())
    return index


def format_path(loc: tuple | list) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def read_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], dict[tuple, int]]:
    """Read a YAML mapping safely; syntax errors and duplicate keys become ConfigError with a line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(p, "", "file not found", "check the path")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(p, "", f"not UTF-8 text ({e.reason} at byte {e.start})", "save the file as UTF-8")
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(e, "problem", None) or str(e)
        context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and cmark is not None and mark is not None and cmark.line != mark.line:
            problem += f" ({context} that starts on line {cmark.line + 1})"  # e.g. an unclosed '{'
        raise ConfigError(p, "", f"YAML syntax error: {problem}", "fix the YAML at that line", line=line)
    if raw is None:
        raise ConfigError(p, "", "the file is empty", "start from sweeps/quickstart.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(p, "", f"the top level must be a mapping of sections, got {type(raw).__name__}",
                          "start from sweeps/quickstart.yaml")
    return raw, _line_index(text)


def _data_loc(loc: tuple, raw: Any) -> tuple:
    """Drop pydantic's union-member tags ('str', 'list[int]', ...) from a loc: keep the keys found in the data."""
    out, node = [], raw
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif isinstance(node, dict) and i == len(loc) - 1:
            pass  # a missing required key or an unknown one: part of the path
        else:
            continue  # a tag, not a key of the file
        out.append(part)
    return tuple(out)


def errors_to_config_error(e: ValidationError, file: Any, lines: dict[tuple, int],
                            relabel: dict[str, tuple[str, int | None]] | None = None, raw: Any = None) -> ConfigError:
    first = e.errors()[0]
    loc = tuple(first["loc"]) if raw is None else _data_loc(tuple(first["loc"]), raw)
    path = format_path(loc)
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = f"unknown key '{loc[-1]}'"
        fix = "remove it or check its spelling (see README, 'The YAML schema')"
    elif first["type"] == "literal_error":
        fix = f"use one of the allowed values (got {first.get('input')!r})"
    else:
        fix = f"got {first.get('input')!r}"
    more = len(e.errors()) - 1
    if more:
        fix += f" ({more} more problem{'s' if more > 1 else ''} after this one)"
    line = lines.get(loc) or lines.get(loc[:-1]) if loc else None
    return relabel_error(ConfigError(file, path, msg, fix, line=line), relabel or {})


def relabel_error(e: ConfigError, relabel: dict[str, tuple[str, int | None]]) -> ConfigError:
    """Point an error in a value that came from the grid at that grid entry (path and line)."""
    for src, (label, line) in relabel.items():
        if e.path == src or e.path.startswith(src + ".") or e.path.startswith(src + "["):
            return ConfigError(e.file, label, e.message, e.fix, line=line)
    return e


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a YAML file (nothing resolved yet: see `expand`)."""
    raw, lines = read_yaml(path)
    return parse_spec(raw, source=str(path), lines=lines)


def parse_spec(raw: dict[str, Any], source: str | None = None, lines: dict | None = None) -> SweepSpec:
    """Validate a raw mapping as a SweepSpec; the first problem becomes a ConfigError with its line."""
    _refuse_removed_keys(raw, source, lines or {})
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise errors_to_config_error(e, source, lines or {}, raw=raw) from None
    spec.source_file = source
    return spec




def _refuse_removed_keys(raw: dict[str, Any], source: str | None, lines: dict) -> None:
    for (section, key), why in REMOVED_KEYS.items():
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise ConfigError(source, f"{section}.{key}", f"this key does nothing: {why}", "remove the key",
                              line=lines.get((section, key)))
