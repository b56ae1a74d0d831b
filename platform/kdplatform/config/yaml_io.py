"""Reading YAML files: safe loading within limits, a line index for messages, pydantic errors as ConfigError.

The limits make a hostile or mistaken file fail in well under a second with little memory, before anything
is expanded: the file's size is checked before it is read, and the number of values it holds with every
YAML alias expanded (an "alias bomb" of 9 nested aliases x 9 is 9^9 values) is counted on the parsed node
graph, where each aliased node is counted once per use without being copied.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kdplatform.config.errors import ConfigError
import kdplatform.config.schema as schema_module
from kdplatform.config.schema import SweepSpec

# A config file names a grid and seeds in a few kB; these bounds are far above any real one.
MAX_FILE_BYTES = 256_000  # pure-Python PyYAML reads about 100 kB a second on one slow core, libyaml ~10x that
MAX_YAML_VALUES = 100_000  # scalars, lists and mappings, every alias expanded

# Keys that once parsed but were never read: refused with the reason, so nobody believes they act.
REMOVED_KEYS = {
    ("search", "algorithm"): "the search is always Optuna's sampler (the only one kdplatform runs)",
    ("scheduler", "type"): "the scheduler is always ASHA (the only one kdplatform runs)",
}


# libyaml's parser when PyYAML was built with it: about 10x faster, so a 250 kB file is refused in well under a
# second of CPU; the constructor and resolvers stay PyYAML's Python ones either way.
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_BaseLoader):
    """Safe loading that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *base`: the node's own keys override the merged ones
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (list, dict)):
            raise yaml.constructor.ConstructorError(None, None, "a key must be a name, not a list or mapping",
                                                    key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return _BaseLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

# Numbers as YAML 1.2 reads them: PyYAML (YAML 1.1) reads `1:9` as the base-60 integer 69 and `1e-4` as text.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver(_INT, re.compile(
    r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
_UniqueKeyLoader.add_implicit_resolver(_FLOAT, re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def _line_index(root: yaml.Node | None) -> dict[tuple, int]:
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
    if root is not None:
        walk(root, ())
    return index


def format_path(loc: tuple | list) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def read_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], dict[tuple, int]]:
    """Read a YAML mapping safely; syntax errors, duplicate keys and files over the limits become ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(p, "", "file not found", "check the path")
    size = p.stat().st_size
    with p.open("rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)  # never more, even if the file grows meanwhile
    if max(size, len(data)) > MAX_FILE_BYTES:
        raise ConfigError(p, "", f"the file is {max(size, len(data)):,} bytes, over the limit of "
                          f"{MAX_FILE_BYTES:,} bytes for a config file", "a sweep names its grid axes and "
                          "seeds in a few kB: list values, not every expanded combination")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(p, "", f"not UTF-8 text ({e.reason} at byte {e.start})", "save the file as UTF-8")
    raw, root = load_yaml_text(text, p)
    if raw is None:
        raise ConfigError(p, "", "the file is empty", "start from sweeps/quickstart.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(p, "", f"the top level must be a mapping of sections, got {type(raw).__name__}",
                          "start from sweeps/quickstart.yaml")
    return raw, _line_index(root)


def load_yaml_text(text: str, file: Any = None, what: str = "the file") -> tuple[Any, yaml.Node | None]:
    """Safe-load YAML `text` within MAX_YAML_VALUES (aliases counted expanded): (data, root node)."""
    loader = _UniqueKeyLoader(text)
    try:
        root = loader.get_single_node()
        if root is not None:
            _check_expanded_size(root, file, what)
        return (loader.construct_document(root) if root is not None else None), root
    except yaml.YAMLError as e:
        raise _syntax_error(e, file) from None
    except RecursionError:
        raise ConfigError(file, "", f"{what} is nested too deeply to read", "a config needs a few levels of "
                          "sections and lists") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ConfigError(file, "", f"a value YAML cannot read: {e}", "write ordinary numbers") from None
    finally:
        loader.dispose()


def _syntax_error(e: yaml.YAMLError, file: Any) -> ConfigError:
    mark = getattr(e, "problem_mark", None)
    line = mark.line + 1 if mark else None
    problem = getattr(e, "problem", None) or str(e)
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and cmark is not None and mark is not None and cmark.line != mark.line:
        problem += f" ({context} that starts on line {cmark.line + 1})"  # e.g. an unclosed '{'
    return ConfigError(file, "", f"YAML syntax error: {problem}", "fix the YAML at that line", line=line)


def _check_expanded_size(root: yaml.Node, file: Any, what: str) -> None:
    """Count the values of the node graph as if every alias were expanded, without expanding anything.

    An aliased node is one object in the graph: its count is computed once and reused for every use, so
    even 9^9 expanded values cost a few dozen steps. A node that contains itself is refused."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(file, "", f"{what} has a YAML alias that contains itself",
                              "remove the recursive alias (*name inside &name)",
                              line=node.start_mark.line + 1)
        open_nodes.add(key)
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_YAML_VALUES:
                break
        open_nodes.discard(key)
        sizes[key] = total
        return total

    if size(root) > MAX_YAML_VALUES:
        raise ConfigError(file, "", f"{what} holds more than {MAX_YAML_VALUES} values once its YAML aliases "
                          "(*name) are expanded", "a sweep names its axes and seeds in a few hundred values: "
                          "write them out, without nested aliases")


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
    first = _first_error(e.errors(), raw)
    loc = tuple(first["loc"]) if raw is None else _data_loc(tuple(first["loc"]), raw)
    path = format_path(loc)
    msg = first["msg"].removeprefix("Value error, ")
    got = repr(first.get("input"))
    got = got if len(got) <= 80 else got[:60] + f"... ({len(got)} characters)"
    if first["type"] == "extra_forbidden":
        msg = f"unknown key '{loc[-1]}'"
        near = nearest_key(str(loc[-1]), _keys_at(e.title, loc[:-1]))
        fix = (f"did you mean '{near}'?" if near
               else "remove it or check its spelling (see docs/config.md, 'The YAML schema')")
    elif first["type"] == "literal_error":
        fix = f"use one of the allowed values (got {got})"
    else:
        fix = _value_fix(first, got)
    more = len(e.errors()) - 1
    if more:
        fix += f" ({more} more problem{'s' if more > 1 else ''} after this one)"
    line = lines.get(loc) or lines.get(loc[:-1]) if loc else None
    return relabel_error(ConfigError(file, path, msg, fix, line=line), relabel or {})


# pydantic error type -> what a valid value looks like (the numeric bounds come from the error's context)
_WANTED = {"int_type": "a whole number, without quotes", "int_parsing": "a whole number, without quotes",
           "int_from_float": "a whole number (no decimal point)", "float_type": "a number, without quotes",
           "float_parsing": "a number, without quotes", "bool_type": "true or false, without quotes",
           "bool_parsing": "true or false, without quotes", "string_type": "text (quote it)",
           "list_type": "a list, e.g. [1, 2]", "dict_type": "a mapping of key: value lines",
           "model_type": "a mapping of key: value lines", "finite_number": "a finite number (not inf or nan)"}
_BOUND = {"greater_than": "above {gt}", "greater_than_equal": "{ge} or more", "less_than": "below {lt}",
          "less_than_equal": "{le} or less", "multiple_of": "a multiple of {multiple_of}"}


def _value_fix(error: dict, got: str) -> str:
    """The fix line: the valid value or range this setting takes, and what the file gave."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in _BOUND:
        return f"use a value {_BOUND[kind].format(**ctx)} (got {got})"
    if kind == "too_short":
        return f"give at least {ctx.get('min_length', 1)} item(s) (got {got})"
    if kind == "too_long":
        return f"give at most {ctx.get('max_length')} item(s) (got {got})"
    if kind in _WANTED:
        value = error.get("input")
        if kind.startswith("int") and isinstance(value, (str, float)):
            try:
                whole = float(value)
                if whole.is_integer():
                    wanted = "a whole number, no decimal point" if isinstance(value, float) else _WANTED[kind]
                    return f"write {int(whole)} ({wanted}; got {got})"
            except ValueError:
                pass
        return f"write {_WANTED[kind]} (got {got})"
    if "boolean" in error.get("msg", ""):  # our own refusal of yes/no/true/false where a number belongs
        return f"write a number (got {got})"
    return f"got {got}"


def nearest_key(key: str, known: Iterable[str]) -> str | None:
    """The known key closest to a misspelt one (difflib), if any is close."""
    import difflib

    found = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return found[0] if found else None


def _keys_at(model_name: str, loc: tuple) -> list[str]:
    """The keys a mapping at `loc` of the file may hold (the fields of the schema's model there)."""
    from pydantic import BaseModel

    model = getattr(schema_module, model_name, None)
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        if isinstance(part, int):
            continue
        field_info = model.model_fields.get(part)
        model = _model_in(field_info.annotation) if field_info is not None else None
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _model_in(annotation: Any):
    """The pydantic model a field's type holds (StageConfig in `list[StageConfig] | None`), if any."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _first_error(errors: list[dict], raw: Any) -> dict:
    """The error to show: for a union (`str | list[int]`), the member the input's shape chose, not the first."""
    first, loc = errors[0], tuple(errors[0]["loc"])
    if raw is None or len(_data_loc(loc, raw)) == len(loc):
        return first  # not a union member's error
    return next((x for x in errors[1:] if len(x["loc"]) > len(loc) and tuple(x["loc"][:len(loc) - 1]) == loc[:-1]),
                first)


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
    _refuse_ignored_keys(raw, source, lines or {})
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise errors_to_config_error(e, source, lines or {}, raw=raw) from None
    spec.source_file = source
    return spec


def _refuse_ignored_keys(raw: dict[str, Any], source: str | None, lines: dict) -> None:
    if "seed" in raw and "seeds" in raw:  # every trial takes its seed from `seeds`: `seed` would be ignored
        raise ConfigError(source, "seed", "both seed and seeds are set, and every trial takes its seed from seeds",
                          "keep one: seeds: [...] for several seeds, or seed: N", line=lines.get(("seed",)))
    for (section, key), why in REMOVED_KEYS.items():
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise ConfigError(source, f"{section}.{key}", f"this key does nothing: {why}", "remove the key",
                              line=lines.get((section, key)))
