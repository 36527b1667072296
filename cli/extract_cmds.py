"""Commands over the pipeline's extraction: ``extract``, ``spectrum``, ``project``.

The pipeline (and with it dask) is imported inside the commands, so that the other commands start
without it.
"""
from __future__ import annotations

import shlex
import signal
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from trajstore import inspect
from trajstore.errors import InvalidArgumentError, TrajstoreError
from trajstore.holders import describe_holder

from ._choices import BasisPrecision, Method
from ._console import err, errors_to_exit, fail, note, out, print_json, progress_bar

_NAME_HELP = "subspace to read; default: the store's only subspace (several: name one)"


@contextmanager
def stop_on_signals():
    """Ctrl-C / SIGTERM ask the running pass to stop after its in-flight blocks (cache kept)."""
    from pipeline.compute import StopFlag

    stop = StopFlag()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt
        err.print("[yellow]stopping after the blocks in flight; rerun the same command to resume[/]")
        stop.set()

    for s in previous:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def extract(run: str = typer.Argument(..., metavar="RUN", help="store path or URL"),
            dim: Optional[int] = typer.Option(None, "--dim", help="subspace dimension d"),
            variance: Optional[float] = typer.Option(
                None, "--variance", help="instead of --dim: the smallest d reaching this explained variance (0 to 1]"),
            snapshots: Optional[str] = typer.Option(
                None, "--snapshots", help="snapshot indices START:STOP[:STEP] (0:10, 5:, 0:40:2) or i,j,k; "
                "default: all"),
            smooth: Optional[float] = typer.Option(
                None, "--smooth", metavar="BETA", help="EMA of the selected snapshots, w <- BETA w + (1 - BETA) "
                "w_i, BETA in [0, 1) (the paper's smooth mode: 0.8); with --window, restarted in each window"),
            window: Optional[int] = typer.Option(
                None, "--window", metavar="K", help="one row per K consecutive selected snapshots: their mean (the "
                "paper's mean mode), or with --smooth their EMA; a last, incomplete window is left out"),
            name: str = typer.Option("default", "--name", help="subspace to write: RUN/subspaces/NAME"),
            method: Method = typer.Option(Method.gram, "--method", help="gram: exact eigendecomposition of the "
                                          "Gram matrix; randomized: randomized SVD, for thousands of snapshots"),
            scheduler: Optional[str] = typer.Option(
                None, "--scheduler", help="dask.distributed scheduler address [tcp://]HOST:PORT; default: threads"),
            block_size: Optional[int] = typer.Option(
                None, "--block-size", help="columns per task, rounded to whole inner chunks of the store; default: "
                "one chunk (262,144 columns unless the store was created with another chunk_size)"),
            basis_precision: BasisPrecision = typer.Option(
                BasisPrecision.float64, "--basis-precision", help="float64: the basis product in float64 (exact); "
                "float32: faster (~25% of the basis pass), principal angles ~1e-5 rad; the Gram stays float64"),
            overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing subspace NAME (with --follow: "
                                           "one extracted with other settings)"),
            break_lock: bool = typer.Option(False, "--break-lock", help="take over the lock of a dead extraction"),
            follow: bool = typer.Option(False, "--follow", help="keep extracting while RUN is being recorded"),
            every: Optional[int] = typer.Option(None, "--every", help="with --follow: refresh the subspace once K "
                                                "new snapshots are in (default 10)"),
            poll: float = typer.Option(1.0, "--poll", help="with --follow: seconds between checks"),
            until_done: bool = typer.Option(
                False, "--until-done", help="with --follow: stop once the recording has ended (no writer and no new "
                "snapshot for --idle seconds), after a last refresh over every snapshot; without it, follow until "
                "Ctrl-C / SIGTERM"),
            idle: Optional[float] = typer.Option(None, "--idle", help="with --until-done: seconds without a writer "
                                                 "or a new snapshot that end the recording (longer than any pause of "
                                                 "the writer; default 30)"),
            wait: Optional[float] = typer.Option(
                None, "--wait", help="with --follow: seconds to wait for a writer to create RUN (default: with "
                "--until-done the longer of --idle and 60 s; without it, until Ctrl-C)"),
            json: bool = typer.Option(False, "--json", help="machine-readable summary on stdout")) -> None:
    """Extract the DLDR subspace of RUN out of core (exact Gram or randomized), into RUN/subspaces/NAME."""
    from pipeline import extract_subspace
    from pipeline.checks import check_scheduler
    from pipeline.compute import Interrupted
    from pipeline.follow import check_follow_args, check_follow_settings
    from pipeline.settings import ExtractionSettings, parse_snapshots

    with errors_to_exit():  # every argument, before any work or progress display
        settings = ExtractionSettings(dim=dim, variance=variance, snapshots=parse_snapshots(snapshots), name=name,
                                      method=method.value, block_size=block_size, smooth=smooth,
                                      window=window, basis_precision=basis_precision.value).validate()
        loose = [flag for flag, given in (("--until-done", until_done), ("--wait", wait is not None),
                                          ("--every", every is not None)) if given and not follow]
        if loose or (idle is not None and not until_done):
            raise InvalidArgumentError(f"{loose[0]} goes with --follow" if loose else
                                       "--idle goes with --until-done (it says when the recording has ended)")
        every, idle = 10 if every is None else every, 30.0 if idle is None else idle
        if follow:
            check_follow_args(every=every, poll=poll)
            check_follow_settings(settings)
        if idle <= 0 or (wait is not None and wait <= 0):
            which, value = ("idle", idle) if idle <= 0 else ("wait", wait)
            raise InvalidArgumentError(f"{which} (--{which}) must be a positive number of seconds, got {value}")
        target = check_scheduler(scheduler) if scheduler is not None else None
    client = _connect(scheduler, target)  # before the store is touched
    try:
        if follow:
            _follow(run, every, settings, client, poll, json, until_done, idle, overwrite, wait)
            return
        with errors_to_exit(), stop_on_signals() as stop, progress_bar("extracting", quiet=json) as update:
            try:
                sub = extract_subspace(run, settings, scheduler=client, overwrite=overwrite, progress=update,
                                       stop=stop, break_lock=break_lock, log=note)
            except Interrupted:
                raise fail("interrupted; the finished blocks are kept: rerun the same command to resume", 130)
            except OSError as exc:
                if client is None or isinstance(exc, (TrajstoreError, FileNotFoundError, FileExistsError)):
                    raise
                raise fail(f"extracting on --scheduler {scheduler!r} failed: {exc}; the finished blocks are kept: "
                           "rerun the same command to resume", 1) from None
    finally:
        if client is not None:
            client.close()
    summary = sub.summary()
    if json:
        print_json(summary)
        return
    err.print(f"subspace [bold]{escape(name)}[/]: d = {sub.dim} from {_rows_text(sub)}, "
              f"explained variance {summary['explained_variance']:.2%}, "
              f"‖PᵀP − I‖ = {sub.orthonormality_error:.2e}, {summary['seconds']:.1f} s", highlight=False)


def _nulls(values) -> list:
    """A list for JSON, NaN (not computed) as null."""
    return [None if v != v else float(v) for v in values]


def _rows_text(sub) -> str:
    """``"18 snapshots"``, or with sampling ``"6 rows (means of 3 consecutive snapshots) of 18 snapshots"``."""
    from pipeline.sampling import Sampling

    sampling = Sampling.from_json(sub.attrs.get("sampling"))
    if sampling.to_json() is None:
        return f"{len(sub.snapshots)} snapshots"
    return f"{sub.attrs.get('sampled_rows')} rows ({sampling.describe()}) of {len(sub.snapshots)} snapshots"


def _row_snapshots(sub) -> list[list[int]]:
    """For each coordinate row, the snapshots it is made of: ``[i]`` per snapshot (with --smooth alone, the
    EMA up to snapshot i), the window's snapshots with --window. ``snapshots`` stays the whole selection."""
    from pipeline.sampling import Sampling

    sampling, selected = Sampling.from_json(sub.attrs.get("sampling")), sub.snapshots
    if sampling.window is None:
        return [[i] for i in selected]
    return [selected[lo:hi] for lo, hi in sampling.groups(len(selected))]


def _connect(address: str | None, target: "tuple[str, str, int] | None"):
    """A ``distributed.Client`` of the scheduler at ``address`` (None: threads); one line and exit 2 at
    once when its host is unknown or nothing listens on its port, or when it does not answer in time."""
    if address is None:
        return None
    if target is not None and target[0] != "ucx":
        _, host, port = target
        try:
            socket.create_connection((host, port), timeout=10).close()
        except OSError as exc:
            raise fail(f"cannot reach the dask scheduler --scheduler {address!r}: {exc.strerror or exc}", 2) \
                from None
    from distributed import Client

    try:
        return Client(address)
    except OSError as exc:  # TimeoutError too
        raise fail(f"cannot connect to the dask scheduler --scheduler {address!r}: {exc}", 2) from None


def _follow(run, every, settings, scheduler, poll, json, until_done=False, idle=30.0, overwrite=False, wait=None):
    from pipeline.follow import follow as follow_run
    from trajstore.format import local_dir

    name = settings.name

    def on_gram(t: int) -> None:
        if not json:
            err.print(f"gram cache: {t} snapshots")

    def on_subspace(sub) -> None:
        if json:
            print_json({"snapshots": len(sub.snapshots), "dim": sub.dim,
                        "orthonormality_error": sub.orthonormality_error})
        else:
            err.print(f"subspace {escape(name)}: d = {sub.dim} from {_rows_text(sub)}", highlight=False)

    # a local lock is an flock: repair takes it when its holder is gone; an object store's must be broken
    take_over = f"trajstore repair {shlex.quote(run)}" + ("" if local_dir(run) is not None else " --break-lock")

    def on_stalled(holder: dict, seconds: float) -> None:
        who = describe_holder(holder) if holder else "a process whose lock record cannot be read"
        err.print(f"[yellow]note:[/] no new snapshot for {seconds:.0f} s, but the writer lock is held by "
                  f"{escape(who)}, which cannot be checked from here: still following. Only if you know that "
                  f"writer is gone, take its lock over (`{escape(take_over)}`; taking a live writer's lock "
                  "lets two writers mix one store); or stop here with Ctrl-C (the Gram cache stays intact)",
                  highlight=False, soft_wrap=True)

    with errors_to_exit(), stop_on_signals() as stop:
        updates = follow_run(run, every=every, settings=settings, scheduler=scheduler, poll=poll, stop=stop,
                             on_gram=on_gram, on_subspace=on_subspace, until_done=until_done, idle=idle,
                             on_stalled=on_stalled, overwrite=overwrite, wait=wait,
                             on_waiting=lambda message: err.print(f"[yellow]note:[/] {escape(message)}",
                                                                  highlight=False, soft_wrap=True))
    if until_done and not stop and not updates:
        raise fail("the recording ended before it held enough snapshots for the subspace (d + 1 sampled rows): "
                   "none was extracted", 1)
    if not json:
        refreshes = f"{updates} refresh{'es' * (updates != 1)}"
        err.print(f"the recording has ended: {refreshes}, the last over every snapshot" if until_done and not stop
                  else f"stopped after {refreshes}; the Gram cache is intact")


def spectrum(run: str = typer.Argument(..., metavar="RUN", help="store path or URL"),
             name: Optional[str] = typer.Option(None, "--name", help=_NAME_HELP),
             plot: Optional[Path] = typer.Option(None, "--plot", help="write the PCA-ratio figure (PNG)"),
             top: int = typer.Option(20, "--top", help="rows of the table"),
             json: bool = typer.Option(False, "--json", help="machine-readable spectrum on stdout")) -> None:
    """The spectrum of a subspace's trajectory: per-component and cumulative explained variance (stdout)."""
    from pipeline import open_subspace
    from pipeline.checks import check_int, check_output_file

    with errors_to_exit():
        check_int("top", top, 1)
        if plot:
            check_output_file("plot", plot)
        name = inspect.subspace_name(run, name)
        sub = open_subspace(run, name)
    if plot:
        from pipeline.plots import spectrum_plot

        with _plot_errors(plot):
            spectrum_plot(sub.spanned_variance_ratio(), plot, dim=sub.dim)
    if json:
        print_json({**sub.summary(), "cumulative": _nulls(sub.cumulative_variance()), "plot": str(plot) if plot else None,
                    "sampling": sub.attrs.get("sampling"), "sampled_rows": sub.attrs.get("sampled_rows"),
                    "sampling_left_out": sub.attrs.get("sampling_left_out")})
        return
    table = Table(title=escape(f"spectrum of {name} (d = {sub.dim}, {_rows_text(sub)})"))
    for col in ("component", "explained", "cumulative"):
        table.add_column(col, justify="right")
    cumulative = sub.cumulative_variance()
    for i, ratio in enumerate(sub.explained_variance_ratio[:top]):
        if ratio != ratio:  # NaN: a component the randomized method did not compute
            break
        style = "bold" if i < sub.dim else "dim"
        table.add_row(str(i + 1), f"{ratio:.4%}", f"{cumulative[i]:.4%}", style=style)
    out.print(table)
    if sub.attrs.get("uncomputed_variance_ratio"):
        err.print(f"the other {len(sub.explained_variance_ratio) - sub.attrs['randomized_components']} components "
                  f"(not computed by --method randomized) hold {sub.attrs['uncomputed_variance_ratio']:.4%} of the "
                  "variance together", highlight=False)
    if plot:
        err.print(f"wrote {escape(str(plot))}", highlight=False)


def project(run: str = typer.Argument(..., metavar="RUN", help="store path or URL"),
            name: Optional[str] = typer.Option(None, "--name", help=_NAME_HELP),
            plot: Optional[Path] = typer.Option(None, "--plot", help="PNG file to write (needed without --json)"),
            json: bool = typer.Option(False, "--json", help="the coordinates on the plane on stdout, one per row "
                                      "(per snapshot; with --window, per window: row_snapshots lists each row's)")
            ) -> None:
    """Draw the trajectory in the plane of the first two principal directions."""
    from pipeline import open_subspace
    from pipeline.checks import check_output_file
    from pipeline.plots import trajectory_plot

    with errors_to_exit():
        if plot is None and not json:
            raise InvalidArgumentError("give --plot FILE.png (the figure), --json (the coordinates), or both")
        if plot is not None:
            check_output_file("plot", plot)
        name = inspect.subspace_name(run, name)
        sub = open_subspace(run, name)
    if sub.dim < 2:
        raise fail(f"subspace {name!r} has d = 1; extract with --dim 2 or more to draw the PC plane", 2)
    coords = sub.coordinates()
    steps = sub.attrs.get("steps")
    if plot is not None:
        with _plot_errors(plot):
            trajectory_plot(coords, sub.explained_variance_ratio, plot, steps=steps)
    if json:
        print_json({"path": sub.path, "name": name, "dim": sub.dim, "plot": None if plot is None else str(plot),
                    "snapshots": sub.snapshots,
                    "row_snapshots": _row_snapshots(sub), "steps": steps,
                    "explained_variance_ratio": sub.explained_variance_ratio[:2].tolist(),
                    "coordinates": coords[:, :2].tolist()})
        return
    err.print(f"wrote {escape(str(plot))}", highlight=False)


@contextmanager
def _plot_errors(plot: Path):
    """A figure that cannot be written (permissions, a full disk, an unknown file type): one line, exit 1."""
    try:
        yield
    except (OSError, ValueError) as exc:
        raise fail(f"cannot write --plot {str(plot)!r}: {exc}", 1) from None


def register(app: typer.Typer) -> None:
    app.command("extract", short_help="the DLDR subspace, out of core, into RUN/subspaces/NAME")(extract)
    app.command("spectrum", short_help="explained variance per component and cumulative")(spectrum)
    app.command("project", short_help="the trajectory on the plane of the first two directions")(project)
