"""``trajstore`` CLI entry point: a Typer app whose commands live in one small module each."""
from __future__ import annotations

import typer

from . import extract_cmds, maint_cmds, run_cmds, store_cmds

app = typer.Typer(help="Record training trajectories, extract their tiny subspace, train there.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
store_cmds.register(app)
extract_cmds.register(app)
run_cmds.register(app)
maint_cmds.register(app)

if __name__ == "__main__":
    app()
