"""extract --follow --until-done: following ends with the recording (no writer and no new snapshot for --idle
seconds), after a last refresh over every snapshot (the new-user trial: --follow never stopped on its own, and
left the subspace behind the store)."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from pipeline import open_subspace
from pipeline.compute import StopFlag
from pipeline.follow import follow
from trajstore.holders import describe_holder
from trajstore.lock import writer_active

from .synthetic import trajectory, write_store

ROOT = Path(__file__).resolve().parents[1]
WRITER = """
import sys, time
from trajstore import TrajectoryStore
from tests.synthetic import trajectory, write_store
path, t, reopen = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
x = trajectory(t, 3000, rank=3)
store = write_store(path, x[:3], close=False)
print("started", flush=True)
for i in range(3, t):
    time.sleep(0.15)
    if reopen and i % 4 == 0:  # a writer that closes the store between epochs and opens it again
        store.close()
        time.sleep(reopen)
        store = TrajectoryStore.open(path, "a")
    store.append(x[i], step=10 * i)
store.close()
print("done", flush=True)
"""


def start_writer(path: Path, t: int, reopen: float = 0.0) -> subprocess.Popen:
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(t), str(reopen)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "started"
    return writer


def watched_follow(path: Path, seconds: float = 120, **options) -> int:
    """follow(), stopped by a watchdog after ``seconds`` (then the test fails instead of hanging)."""
    stop = StopFlag()
    watchdog = threading.Timer(seconds, stop.set)
    watchdog.start()
    try:
        updates = follow(path, stop=stop, **options)
    finally:
        watchdog.cancel()
    assert not stop, f"follow did not end by itself within {seconds} s"
    return updates


def test_follow_until_done_ends_with_the_recording_over_every_snapshot(tmp_path):
    path = tmp_path / "run.zarr"
    writer = start_writer(path, 17)
    try:
        assert writer_active(str(path))
        updates = watched_follow(path, every=5, dim=2, poll=0.2, until_done=True, idle=1.5)
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
    assert not writer_active(str(path)) and updates >= 1
    assert len(open_subspace(path).snapshots) == 17  # the last refresh took the snapshots after the last "every"


def test_a_writer_that_reopens_the_store_between_epochs_is_followed_to_the_end(tmp_path):
    """Pauses shorter than --idle (the store closed and reopened, nothing committed) do not end the recording."""
    path = tmp_path / "run.zarr"
    writer = start_writer(path, 14, reopen=1.2)
    try:
        watched_follow(path, every=3, dim=2, poll=0.1, until_done=True, idle=4.0)
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
    assert len(open_subspace(path).snapshots) == 14


def test_a_recording_that_ended_before_following_started_is_refreshed_once(tmp_path):
    path = tmp_path / "run.zarr"
    write_store(path, trajectory(6, 500, rank=2))
    began = time.monotonic()
    assert watched_follow(path, every=2, dim=2, poll=0.1, until_done=True, idle=1.0) == 1
    assert 1.0 <= time.monotonic() - began < 60 and len(open_subspace(path).snapshots) == 6


def test_the_cli_flags(tmp_path):
    path = tmp_path / "run.zarr"
    write_store(path, trajectory(4, 300, rank=2))
    r = CliRunner().invoke(app, ["extract", str(path), "--dim", "2", "--until-done"])
    assert r.exit_code == 2 and "--until-done goes with --follow" in " ".join(r.output.split())
    for loose, said in ((["--every", "5"], "--every goes with --follow"),  # (the trial: silently unused)
                        (["--follow", "--idle", "5"], "--idle goes with --until-done")):  # (followed forever)
        r = CliRunner().invoke(app, ["extract", str(path), "--dim", "2", *loose])
        assert r.exit_code == 2 and said in " ".join(r.output.split()), r.output
    r = CliRunner().invoke(app, ["extract", str(path), "--dim", "5", "--follow", "--until-done", "--idle", "0.5"])
    assert r.exit_code == 1 and "none was extracted" in " ".join(r.output.split())  # 4 snapshots, d = 5: too few
    writer = start_writer(tmp_path / "cli.zarr", 12)
    try:
        r = CliRunner().invoke(app, ["extract", str(tmp_path / "cli.zarr"), "--dim", "2", "--follow", "--every", "4",
                                     "--poll", "0.2", "--until-done", "--idle", "1.5"])
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
    assert r.exit_code == 0 and "the recording has ended" in " ".join(r.output.split()), r.output
    assert len(open_subspace(tmp_path / "cli.zarr").snapshots) == 12


def test_a_lock_left_on_s3_by_a_writer_killed_on_this_host_does_not_keep_following(s3):
    """A killed writer's lock object stays on the object store until broken, but its pid is dead here: the
    recording has ended (before: --until-done followed it for ever)."""
    from trajstore.format import LOCK_NAME

    from .test_s3 import take_lock_and_die

    url = s3.url("stale-follow.zarr")
    write_store(url, trajectory(6, 400, rank=2))
    take_lock_and_die(url, LOCK_NAME)
    assert s3.fs().exists(f"{s3.bucket}/stale-follow.zarr/{LOCK_NAME}") and not writer_active(url)
    assert watched_follow(url, seconds=90, every=2, dim=2, poll=0.1, until_done=True, idle=1.0) == 1
    assert len(open_subspace(url).snapshots) == 6


def write_holder_elsewhere(path: Path) -> dict:
    """The writer lock's record as a writer on another host leaves it (one this host cannot check)."""
    from trajstore.format import LOCK_NAME

    holder = {"pid": 4242, "host": "gpu-node-7.elsewhere", "since": "2026-11-28T01:02:03", "start": "99",
              "token": "0" * 32, "purpose": "a writer (recording, import, repair or gc)"}
    (path / LOCK_NAME).write_text(json.dumps(holder))
    return holder


def test_a_writer_on_another_host_keeps_it_following_and_is_reported_when_stalled(tmp_path):
    """Such a holder counts as recording; --idle without a new snapshot ``on_stalled`` names it (the CLI
    prints how to take the lock over), then after twice as long again. Released, the recording ends."""
    from trajstore.format import LOCK_NAME

    path = tmp_path / "run.zarr"
    write_store(path, trajectory(6, 400, rank=2))
    holder = write_holder_elsewhere(path)
    assert writer_active(str(path))
    reports = []

    def on_stalled(record: dict, seconds: float) -> None:
        reports.append((record, seconds))
        if len(reports) == 2:  # the writer releases its lock (the file stays, emptied)
            (path / LOCK_NAME).write_text("")

    began = time.monotonic()
    assert watched_follow(path, every=2, dim=2, poll=0.1, until_done=True, idle=1.0, on_stalled=on_stalled) == 1
    assert [r for r, _ in reports] == [holder, holder] and reports[0][1] >= 1.0
    assert reports[1][1] - reports[0][1] >= 2.0  # the second report waits twice --idle: it backs off
    assert time.monotonic() - began >= 4.0  # two reports, then --idle with no writer


def holder_record(pid: int, **fields) -> dict:
    """The writer lock's record as process ``pid`` on this host would write it (fields override)."""
    from trajstore.holders import new_holder, proc_start

    return {**new_holder("a writer (recording, import, repair or gc)"), "pid": pid, "start": proc_start(pid), **fields}


def test_a_live_writer_on_this_host_keeps_it_following_and_is_never_reported(tmp_path):
    """A writer between snapshots (a long epoch) is no stalled writer: no advice to take its lock over.
    Once it is gone its lock holds nothing and the recording ends."""
    from trajstore.format import LOCK_NAME

    path = tmp_path / "run.zarr"
    write_store(path, trajectory(6, 400, rank=2))
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (path / LOCK_NAME).write_text(json.dumps(holder_record(writer.pid)))
        assert writer_active(str(path))
        reports, killed = [], []
        threading.Timer(3.5, lambda: (writer.kill(), killed.append(time.monotonic()))).start()
        assert watched_follow(path, every=2, dim=2, poll=0.1, until_done=True, idle=1.0,
                              on_stalled=lambda r, s: reports.append(r)) == 1
        assert killed and time.monotonic() - killed[0] >= 0.8  # it followed while the writer ran, then --idle
        assert reports == []  # (left unreaped, a zombie: its flock is gone, so it holds nothing)
    finally:
        writer.kill()
        writer.wait()


def test_a_holder_in_another_container_on_this_host_is_not_taken_for_dead(tmp_path):
    """Two containers may share a host name (docker --network host) but not a pid namespace: a pid that does
    not run here may run there, so its lock holds (before: the host name alone let a live writer's lock on
    an object store be taken for a killed one's)."""
    from trajstore.format import LOCK_NAME
    from trajstore.holders import holder_unverifiable, new_holder
    from trajstore.lock import writer_holder

    path = tmp_path / "run.zarr"
    write_store(path, trajectory(3, 400, rank=2))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a pid that no longer runs in this namespace
    this = new_holder("a writer")
    if "pidns" not in this or "boot" not in this:
        pytest.skip("this kernel shows no boot id or pid namespace: no container to tell apart")
    for fields, held in [({}, False), ({"pidns": this["pidns"] + 1}, True), ({"boot": "another-boot"}, True),
                         ({"host": "other"}, True)]:
        record = {**this, "pid": pid, "start": "1", **fields}
        (path / LOCK_NAME).write_text(json.dumps(record))
        assert (writer_holder(str(path)) == record) is held, fields
        assert holder_unverifiable(str(path), record) is held
    old = {k: v for k, v in this.items() if k not in ("boot", "pidns")}  # written before those fields existed
    assert not holder_unverifiable(str(path), old) and holder_unverifiable("s3://bucket/run.zarr", old)
    other = {**this, "pid": pid, "pidns": this["pidns"] + 1}
    assert "in another container or boot" in describe_holder(other)  # so `ps` not showing it misleads no one
    assert "another container" not in describe_holder(this)
    assert "another container" not in describe_holder(old)  # no ids recorded: nothing says it is elsewhere
    from trajstore.holders import pid_state
    assert pid_state(2 ** 70) == "unknown"  # a garbled record's pid: neither alive nor dead to this process


def test_a_zombie_holds_nothing_and_a_reused_pid_is_another_process():
    """An exited writer its parent has not reaped yet still has a pid, but no flock: it is dead. So is a pid
    now used by another process (another start time). A running one is alive."""
    from trajstore.holders import pid_state, proc_start

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = proc_start(child.pid)
        assert pid_state(child.pid, start) == "alive" and pid_state(child.pid, "1") == "dead"
        child.kill()
        deadline = time.monotonic() + 30
        while pid_state(child.pid, start) != "dead" and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(f"/proc/{child.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z"  # unreaped: a zombie
        assert pid_state(child.pid, start) == "dead"
    finally:
        child.kill()
        child.wait()
    assert pid_state(child.pid, start) == "dead"


def test_the_cli_says_who_holds_the_lock_when_nothing_arrives(tmp_path, monkeypatch):
    import cli.extract_cmds as extract_cmds
    from trajstore.format import LOCK_NAME

    path = tmp_path / "run with space.zarr"
    write_store(path, trajectory(6, 400, rank=2))
    write_holder_elsewhere(path)
    reported = threading.Event()

    def describe_and_release(holder: dict) -> str:  # the note names the holder: then it releases its lock
        reported.set()
        return describe_holder(holder)

    monkeypatch.setattr(extract_cmds, "describe_holder", describe_and_release)
    monkeypatch.setenv("COLUMNS", "60")  # a narrow terminal: the note must not wrap into the path
    releaser = threading.Thread(target=lambda: (reported.wait(60), (path / LOCK_NAME).write_text("")))
    releaser.start()  # released after the note, or after 60 s so that a missing note fails, not hangs
    r = CliRunner().invoke(app, ["extract", str(path), "--dim", "2", "--follow", "--every", "2", "--poll", "0.1",
                                 "--until-done", "--idle", "1"], terminal_width=60)
    releaser.join()
    assert reported.is_set() and r.exit_code == 0 and "the recording has ended" in r.output, r.output
    note = next(line for line in r.output.splitlines() if line.startswith("note:"))  # one line, however long
    assert "but the writer lock is held by pid 4242 on host gpu-node-7.elsewhere" in note
    assert f"(`trajstore repair {shlex.quote(str(path))}`;" in note  # a local lock: repair takes it when gone


def test_following_into_a_subspace_of_other_settings_needs_overwrite(tmp_path):
    """Each refresh replaces the subspace: one extracted with other settings is refused, as a plain extract
    refuses it, unless --overwrite (the trial: --follow replaced a d = 2 subspace with d = 3 silently)."""
    from pipeline import extract_subspace
    from trajstore.errors import SubspaceExistsError

    path = tmp_path / "run.zarr"
    write_store(path, trajectory(8, 400, rank=3))
    extract_subspace(path, dim=2)
    with pytest.raises(SubspaceExistsError, match=r"dim_requested 2 \(now 3\).*--overwrite"):
        follow(path, every=2, dim=3, poll=0.1, until_done=True, idle=0.5)
    assert open_subspace(path).dim == 2
    r = CliRunner().invoke(app, ["extract", str(path), "--dim", "3", "--follow", "--until-done", "--idle", "0.5"])
    assert r.exit_code == 2 and "other settings" in r.output and open_subspace(path).dim == 2, r.output
    assert watched_follow(path, every=2, dim=2, poll=0.1, until_done=True, idle=0.5) == 1  # the same: refreshed
    assert watched_follow(path, every=2, dim=3, poll=0.1, until_done=True, idle=0.5, overwrite=True) == 1
    assert open_subspace(path).dim == 3
    # selections compare by what they select: 2: is 2::1, and 0: is all of them
    extract_subspace(path, dim=2, name="burn", snapshots=slice(2, None))
    extract_subspace(path, dim=2, name="all", snapshots=slice(0, None))
    assert watched_follow(path, every=2, dim=2, poll=0.1, until_done=True, idle=0.5, name="burn",
                          snapshots=slice(2, None, 1)) == 1
    assert watched_follow(path, every=2, dim=2, poll=0.1, until_done=True, idle=0.5, name="all") == 1
    with pytest.raises(SubspaceExistsError, match=r"snapshots_requested .*'slice': \[2, None, 1\].*\(now"):
        follow(path, every=2, dim=2, poll=0.1, until_done=True, idle=0.5, name="burn", snapshots=slice(3, None))


def test_following_a_store_not_created_yet_waits_for_its_writer(tmp_path):
    from trajstore.errors import NotAStoreError

    path = tmp_path / "run.zarr"
    waiting: list[str] = []
    writers: list[subprocess.Popen] = []
    starter = threading.Timer(1.0, lambda: writers.append(start_writer(path, 9)))
    starter.start()
    try:
        updates = watched_follow(path, every=3, dim=2, poll=0.1, until_done=True, idle=5.0,
                                 on_waiting=waiting.append)
    finally:
        starter.join()
        assert writers and writers[0].wait(timeout=60) == 0
    assert "the path does not exist; waiting for a writer" in waiting[0] and updates >= 1
    assert len(open_subspace(path).snapshots) == 9
    began = time.monotonic()
    with pytest.raises(NotAStoreError, match="does not exist"):  # --wait seconds at most
        follow(tmp_path / "never.zarr", every=3, dim=2, poll=0.1, until_done=True, idle=0.5, wait=1.0)
    assert 1.0 <= time.monotonic() - began < 30
    r = CliRunner().invoke(app, ["extract", str(tmp_path / "never.zarr"), "--dim", "2", "--follow", "--until-done",
                                 "--idle", "0.2", "--wait", "0.5"])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "no writer created it within 0.5 s (--wait)" in text, text
    r = CliRunner().invoke(app, ["extract", str(path), "--dim", "2", "--wait", "5"])
    assert r.exit_code == 2 and "--wait goes with --follow" in " ".join(r.output.split())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a store")
    with pytest.raises(NotAStoreError, match="not a trajstore store"):  # no store is coming there: at once
        follow(tmp_path / "other", every=3, dim=2, poll=0.1)


def test_a_store_in_its_creation_window_is_waited_for_and_giving_up_says_how_long_and_what_to_do(tmp_path):
    """A creator takes the lock, then writes zarr.json and the arrays, and the trajstore attributes last: a
    follower that looks in between waits (before: it gave up on a folder holding only the lock file). Giving
    up says after how long and which option waits longer; a folder of other files is refused at once."""
    import zarr

    from trajstore.errors import NotAStoreError
    from trajstore.format import LOCK_NAME

    import fcntl
    import os

    def held_lock(folder):  # a creator's writer lock, taken before anything else is written
        folder.mkdir()
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    path = tmp_path / "run.zarr"
    fd = held_lock(path)

    def create() -> None:
        zarr.open_group(str(path), mode="a")  # a bare zarr.json first, still under the creator's lock
        time.sleep(1.0)
        os.close(fd)  # (this stand-in hands the lock to the real create, which takes it at once)
        write_store(path, trajectory(7, 400, rank=2))

    notes: list[str] = []
    creator = threading.Timer(1.5, create)
    creator.start()
    try:
        assert watched_follow(path, every=3, dim=2, poll=0.1, until_done=True, idle=4.0, on_waiting=notes.append) >= 1
    finally:
        creator.join()
    assert len(notes) == 1 and "waiting for a writer to create it" in notes[0]
    assert len(open_subspace(path).snapshots) == 7
    empty = tmp_path / "empty.zarr"
    fd = held_lock(empty)
    try:
        with pytest.raises(NotAStoreError, match=r"no writer created it within 0.5 s \(--wait\).*--wait SECONDS"):
            follow(empty, every=3, dim=2, poll=0.1, until_done=True, idle=0.5, wait=0.5)
    finally:
        os.close(fd)
    killed = tmp_path / "killed.zarr"  # the review: a create killed part-way (nobody holds its lock) was waited on
    killed.mkdir()
    (killed / LOCK_NAME).write_text("")
    zarr.open_group(str(killed), mode="a")
    began = time.monotonic()
    with pytest.raises(NotAStoreError, match="no 'trajstore' attributes"):
        follow(killed, every=3, dim=2, poll=0.1, until_done=True, idle=0.5)
    assert time.monotonic() - began < 5
    other = f"memory://follow-{time.monotonic_ns()}/run.zarr"
    import fsspec

    fsspec.filesystem("memory").pipe_file(other.removeprefix("memory:/") + "/notes.txt", b"not a store")
    began = time.monotonic()
    with pytest.raises(NotAStoreError):  # an object-store prefix holding other files: no store is coming
        follow(other, every=3, dim=2, poll=0.1)
    assert time.monotonic() - began < 5


def test_a_subspace_of_other_settings_written_while_following_is_not_replaced(tmp_path):
    """Another extraction into the followed name between two refreshes (other settings) is refused at the next
    refresh, not replaced silently; with --overwrite only the subspace found at the start is replaced."""
    from pipeline import extract_subspace
    from trajstore.errors import SubspaceExistsError

    path = tmp_path / "run.zarr"
    x = trajectory(12, 400, rank=3)
    writer = write_store(path, x[:6], close=False)

    def meanwhile(sub) -> None:  # after the first refresh: someone extracts dim 3 into it, the recording goes on
        extract_subspace(path, dim=3, overwrite=True)
        for i in range(6, 12):
            writer.append(x[i], step=10 * i)
        writer.flush()

    for overwrite in (False, True):
        with pytest.raises(SubspaceExistsError, match=r"dim_requested 3 \(now 2\)"):
            watched_follow(path, every=2, dim=2, poll=0.1, on_subspace=meanwhile, overwrite=overwrite)
        assert open_subspace(path).dim == 3
        writer.close()
        writer = write_store(path, x[:6], close=False)
    writer.close()
