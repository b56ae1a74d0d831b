"""How the command line looks: help that reads well, `--version`, and output that suits a terminal or a pipe.

Typer's help shows a type for every option (`<bool>` after each flag, `<str>`, `<path>`) and wraps required
arguments in braces in the usage line (`{file}`). Here a flag shows nothing after its name, an option shows
its metavar (URI, N, DIR, ...) and the usage line reads `FILE [KEY=VALUE]...`. Printed output without a
terminal (a pipe, a CI log) is as wide as its content up to WIDE_COLUMNS, not cut at 80 columns, so a table
row stays one line (`kdplatform ls | cat`, grep); $COLUMNS still sets the width when given.
"""

from __future__ import annotations

import os
import re
from importlib import metadata

import typer
from rich.console import Console
from typer.core import TyperArgument, TyperCommand, TyperGroup

WIDE_COLUMNS = 200  # piped output: wide enough for a run table's longest row
_BRACED = re.compile(r"^\{(.+)\}(\.\.\.)?$")


def _no_type(ctx) -> None:
    return None


def _plain_params(params: list) -> list:
    """Flags (and --help) show no type: an empty metavar replaces Typer's `<bool>`. An argument's name is
    its metavar (FILE, RUN_ID), so its type column (`<path>`, `<list[str]>`) is left empty too."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
        elif isinstance(p, TyperArgument) and p.metavar:
            p.display_type_rich = _no_type  # this parameter object only: Typer has no setting for it
    return params


class HelpCommand(TyperCommand):
    def get_params(self, ctx):
        return _plain_params(super().get_params(ctx))

    def collect_usage_pieces(self, ctx) -> list[str]:
        """`FILE` rather than Typer's `{file}` for a required argument."""
        return [_BRACED.sub(r"\1\2", piece) for piece in super().collect_usage_pieces(ctx)]


class HelpGroup(TyperGroup):
    def get_params(self, ctx):
        return _plain_params(super().get_params(ctx))


class HelpTyper(typer.Typer):
    """A Typer app whose commands use HelpCommand unless told otherwise."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or HelpCommand, **kwargs)


def version() -> str:
    try:
        return metadata.version("kdplatform")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def version_callback(value: bool) -> None:
    if value:
        print(f"kdplatform {version()}")
        raise typer.Exit()


def output_console(stderr: bool = False) -> Console:
    """A terminal's console as rich makes it; without a terminal, WIDE_COLUMNS wide (or $COLUMNS)."""
    out = Console(stderr=stderr)
    if out.is_terminal or os.environ.get("COLUMNS"):
        return out
    return Console(stderr=stderr, width=WIDE_COLUMNS)
