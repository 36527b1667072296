"""The app's command group: a wrong command line is one line on stderr and exit 2, like every other
refused argument (typer would draw a multi-line usage panel)."""
from __future__ import annotations

import click
import typer
from typer.core import TyperGroup

from ._console import fail

# typer >= 0.2x vendors its own copy of click (typer._click): catch its UsageError and click's
_USAGE_ERRORS = tuple({click.UsageError, *(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")})


class OneLineErrors(TyperGroup):
    """A TyperGroup whose subcommands' usage errors (an unknown choice, a missing argument, a value
    of the wrong type, an unknown option or command) print ``error: ...`` as one line naming the
    command, with exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _USAGE_ERRORS as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # a bare command: its help is what was asked for
                raise
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            raise fail(f"{exc.format_message()} (see `{where} --help`)", exc.exit_code) from None
