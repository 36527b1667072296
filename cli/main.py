"""``trajstore`` CLI entry point: a Typer app whose commands live in one small module each.

The command modules import the heavy libraries (torch, dask, the pipeline) inside the commands that
need them: ``trajstore info`` and ``trajstore verify`` start without loading torch or dask.
Help texts are printed as written (``rich_markup_mode=None``): no rich markup, no emoji codes
(``A:B:S`` in rich markup is an emoji).
"""
from __future__ import annotations

import typer

from . import export_cmds, extract_cmds, landscape_cmds, maint_cmds, plan_cmds, run_cmds, store_cmds
from ._group import OneLineErrors

app = typer.Typer(help="Record training trajectories, extract their tiny subspace, train there.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, cls=OneLineErrors)
store_cmds.register(app)
export_cmds.register(app)
extract_cmds.register(app)
run_cmds.register(app)
maint_cmds.register(app)
plan_cmds.register(app)
landscape_cmds.register(app)

if __name__ == "__main__":
    app()
