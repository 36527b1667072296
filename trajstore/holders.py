"""Who holds a lock, and whether it still runs: the holder's record (pid, host, start time, boot id, pid
namespace) and the checks on it. A holder can be checked from here only if it was recorded on this host,
this boot and this pid namespace; any other (another machine, a container sharing the host name) cannot be
seen to have died and counts as running."""
from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

from .format import local_dir


def proc_stat(pid: int) -> tuple[str, str] | None:
    """Process ``pid``'s state letter and start time (clock ticks since boot); None off Linux or if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), fields[19].decode()
    except (OSError, IndexError):
        return None


def proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), telling a reused pid apart; None off Linux."""
    stat = proc_stat(pid)
    return stat[1] if stat else None


def machine_ids() -> dict:
    """What tells this machine's process table apart beyond its host name: the kernel's boot id (another
    machine or a reboot) and the pid namespace (another container sharing the host name, as with docker's
    ``--network host``). Each is left out where it cannot be read (off Linux, a restricted /proc)."""
    ids: dict = {}
    try:
        ids["boot"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        pass
    try:
        ids["pidns"] = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pass
    return ids


def new_holder(purpose: str) -> dict:
    """The record this process writes into a lock it takes for ``purpose``."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "start": proc_start(pid), "token": uuid.uuid4().hex, "purpose": purpose, **machine_ids()}


def sees(holder: dict, strict: bool) -> bool:
    """Whether ``holder`` was recorded in this process table: on this host, this boot and this pid namespace
    (each as far as this process can read its own). A record from before boot and namespace were written
    matches on its host alone unless ``strict`` (an object store's lock, which containers and machines
    sharing a host name could all reach)."""
    if holder.get("host") != socket.gethostname():
        return False
    here = machine_ids()
    for key in ("boot", "pidns"):
        if key in holder and holder[key] != here.get(key):  # another one, or this process cannot tell
            return False
        if key not in holder and strict:
            return False
    return True


def _proc_is_ours() -> bool:
    """Whether /proc shows this process's own pid namespace (not so off Linux, or under ``unshare -p``
    without a /proc of its own): only then do /proc/<pid> entries describe the pids ``os.kill`` reaches."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def _only_zombies(pid: int) -> bool:
    """Whether every thread of ``pid`` has exited (a leader shows ``Z`` while its other threads still run)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X"):
                    return False
        except (OSError, IndexError):
            continue
    return True


def pid_state(pid: int, start: str | None = None) -> str:
    """``"alive"``, ``"dead"`` or ``"unknown"`` for ``pid`` in this process table, given its recorded
    ``start`` (a different start: the pid was reused, the holder is dead). A zombie (exited, not yet reaped)
    is dead: the kernel has dropped its flocks. Unknown: it exists but /proc cannot say what it is (off
    Linux, /proc of another namespace, or hidden by ``hidepid``)."""
    if pid <= 0:
        return "dead"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        pass
    except OverflowError:  # no pid of this system: a garbled record, which this process cannot judge
        return "unknown"
    ours = _proc_is_ours()
    stat = proc_stat(pid) if ours else None
    if stat is None:
        if ours:  # it may have exited between the two looks
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return "dead"
            except PermissionError:
                pass
        return "unknown"
    state, now = stat
    if start is not None and now != start:
        return "dead"
    return "dead" if state in ("Z", "X") and _only_zombies(pid) else "alive"


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether ``pid`` may still run (:func:`pid_state` is not ``"dead"``)."""
    return pid_state(pid, start) != "dead"


def gone(holder: dict, strict: bool = False) -> bool:
    """Whether ``holder`` is in this process table (:func:`sees`) and has certainly stopped running."""
    return sees(holder, strict) and pid_state(pid_of(holder), holder.get("start")) == "dead"


def is_this_process(holder: dict) -> bool:
    """Whether ``holder`` is this very process (same pid, host, start time, boot and pid namespace: pid 1
    of two containers sharing a host name are two processes)."""
    start = holder.get("start")
    return (pid_of(holder) == os.getpid() and sees(holder, strict=False)
            and (start is None or start == proc_start(os.getpid())))


def holder_unverifiable(root: str, holder: dict) -> bool:
    """Whether this process cannot tell if ``holder`` (a :func:`writer_holder` record of ``root``'s lock)
    still runs: it was recorded on another host, boot or container, its process cannot be inspected here,
    or its record cannot be read (``{}``)."""
    return (not holder or not sees(holder, strict=local_dir(root) is None)
            or pid_state(pid_of(holder), holder.get("start")) == "unknown")


def pid_of(holder: dict) -> int:
    """The record's pid, or -1 if it holds none that could be one."""
    pid = holder.get("pid")
    return pid if isinstance(pid, int) and not isinstance(pid, bool) else -1


def describe_holder(holder: dict) -> str:
    """``"pid N on host H (since T)"`` for a lock holder's record, saying when H is this host's name but the
    pid is not in this process table (another container or boot: ``ps`` here will not show it)."""
    where, here = "", machine_ids()
    if holder.get("host") == socket.gethostname() and any(
            key in holder and key in here and holder[key] != here[key] for key in ("boot", "pidns")):
        where = ", in another container or boot of this host name"
    return f"pid {holder.get('pid')} on host {holder.get('host')}{where} (since {holder.get('since')})"
