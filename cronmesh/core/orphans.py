"""Finding and stopping a job's processes that outlived their agent.

A shell job runs as the leader of its own session and process group (see
the shell executor), so a ``kill -9`` of the agent leaves the whole group
running, re-parented to init. When the agent starts again, its outbox still
holds the execution as running; before it reports the run interrupted, the
runner stops what is left of the group, so a ``forbid`` job never has an
old run going on beside a new one.

Stopping the wrong processes is worse than leaving an orphan, so a group is
only signalled when it is proven to be that run's:

- A run that lasts gets a mark in the outbox: its pid (= process group
  id), the process's start time (field 22 of ``/proc/PID/stat``, clock
  ticks since boot) and the boot id (``ProcessMark``, taken by
  ``ProcessMarker`` half a second after the start). A pid that was recycled
  belongs to a process started later, so its start time differs; a reboot
  changes the boot id.
- If the leader is alive, its start time (and boot id) must match the
  mark; if its environment is readable, ``CRONMESH_EXECUTION_ID`` there
  must not name another execution.
- If the leader is gone but other members of the group live (``(sleep
  100 &)``), their start times cannot tell our group from a new one that
  reuses the id, so at least one member's environment must name this
  execution.
- A run without a mark (the agent died within half a second of the
  start) is found by its environment alone: the processes whose
  ``CRONMESH_EXECUTION_ID`` names it.

Stopping: SIGTERM to each group, then SIGKILL to whatever still runs after
a short grace. All groups share one grace, so a hundred orphans cost one.
"""

# Limitation: nothing stops a run's processes while its agent is dead: the
# leader records the run failed after --execution-timeout at the latest, and
# a forbid job may start elsewhere beside the orphan until the agent returns.
# PR_SET_PDEATHSIG needs a preexec_fn, whose fork path cut the spawn rate by
# 87-95 % (scripts/bench/spawn.py), and reaches only the first process.
# Limitation: processes that left the run's process group (setsid, a daemon)
# are not stopped, and a group whose first process exited is proven only by
# an environment the agent can read.

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MARK_DELAY",
    "ORPHAN_GRACE",
    "Orphan",
    "ProcessMark",
    "ProcessMarker",
    "find_orphan",
    "find_orphans",
    "mark_process",
    "process_start_ticks",
    "stop_orphans",
]

log = logging.getLogger("cronmesh.orphans")

# Seconds an orphaned group gets between SIGTERM and SIGKILL.
ORPHAN_GRACE = 2.0
# Seconds after a run's start before its mark is taken (see ProcessMarker).
MARK_DELAY = 0.5
# Seconds between checks whether the signalled groups are gone.
_POLL = 0.05
_ENV_KEY = b"CRONMESH_EXECUTION_ID="
_PROC = "/proc"


@dataclass(frozen=True)
class ProcessMark:
    """Who a run's first process is, recorded when it starts."""

    # The leader's pid, which is also its process group's id.
    pid: int
    # Field 22 of /proc/PID/stat: clock ticks after boot when it started.
    start_ticks: int
    # /proc/sys/kernel/random/boot_id at the time ("" if unreadable).
    boot_id: str

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start": self.start_ticks, "boot": self.boot_id}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ProcessMark:
        """Raises KeyError, TypeError or ValueError for a malformed record."""
        return cls(int(doc["pid"]), int(doc["start"]), str(doc["boot"]))


@dataclass
class Orphan:
    """A process group proven to belong to an interrupted execution."""

    execution_id: str
    pgid: int
    # The group's live members when it was found, for the log.
    pids: list[int]


@dataclass(frozen=True)
class _Stat:
    state: str
    pgrp: int
    start_ticks: int


_boot_id: str | None = None


def boot_id() -> str:
    """This boot's id; "" where /proc does not have it. Read once."""
    global _boot_id
    if _boot_id is None:
        try:
            with open(f"{_PROC}/sys/kernel/random/boot_id") as f:
                _boot_id = f.read().strip()
        except OSError:
            _boot_id = ""
    return _boot_id


def _stat(pid: int) -> _Stat | None:
    """State, process group and start time of `pid`; None if it is gone."""
    # os.open/os.read: half the cost of open(), and this runs per spawn.
    try:
        fd = os.open(f"{_PROC}/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # The command name (field 2) may hold spaces and parentheses: fields
    # after its last ")" start at field 3 (state); 5 is pgrp, 22 starttime.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return _Stat(fields[0].decode(), int(fields[2]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def _execution_id_of(pid: int) -> str | None:
    """``CRONMESH_EXECUTION_ID`` in `pid`'s environment; None when it is
    unreadable (another user, gone) or not there."""
    try:
        with open(f"{_PROC}/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    for item in raw.split(b"\0"):
        if item.startswith(_ENV_KEY):
            return item[len(_ENV_KEY) :].decode(errors="replace")
    return None


def _processes() -> Iterator[tuple[int, _Stat]]:
    """Every process still running (zombies left out), with its stat."""
    for entry in os.scandir(_PROC):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat.state not in ("Z", "X"):
                yield int(entry.name), stat


def _members(pgid: int) -> list[int]:
    """Running (not zombie) processes of group `pgid` (one /proc scan)."""
    return [pid for pid, stat in _processes() if stat.pgrp == pgid]


class _ProcessTable:
    """One scan of /proc for all interrupted executions at once.

    Limitation: a scan reads every process's stat (about 1 ms per 100
    processes), and the environment search every process's environment;
    both run once per restart, on the event loop.
    """

    def __init__(self) -> None:
        self.groups: dict[int, list[int]] = {}
        self.pgrp: dict[int, int] = {}
        # This agent's own group is never a job's (jobs run in sessions of
        # their own), even when the agent inherited a job's environment (a
        # job restarted it): left out, it can be neither found nor stopped.
        own = os.getpgrp()
        for pid, stat in _processes():
            if stat.pgrp == own:
                continue
            self.groups.setdefault(stat.pgrp, []).append(pid)
            self.pgrp[pid] = stat.pgrp
        self._by_execution: dict[str, list[int]] | None = None

    def members(self, pgid: int) -> list[int]:
        return self.groups.get(pgid, [])

    def named(self, execution_id: str) -> list[int]:
        """Running processes whose environment names `execution_id`."""
        if self._by_execution is None:
            self._by_execution = {}
            for pid in self.pgrp:
                named = _execution_id_of(pid)
                if named is not None:
                    self._by_execution.setdefault(named, []).append(pid)
        return self._by_execution.get(execution_id, [])


def process_start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks after boot; None if /proc cannot
    say. Call it only while the pid cannot have been reaped."""
    stat = _stat(pid)
    return None if stat is None else stat.start_ticks


def mark_process(pid: int, start_ticks: int | None = None) -> ProcessMark | None:
    """The mark of a process we started (not reaped yet); `start_ticks` if
    already read, else read now. None if /proc cannot say."""
    if start_ticks is None:
        start_ticks = process_start_ticks(pid)
    return None if start_ticks is None else ProcessMark(pid, start_ticks, boot_id())


class ProcessMarker:
    """Takes the marks of runs that last, away from the spawn path.

    A run's first process is noted when it starts (a dict insert). Every
    MARK_DELAY seconds, a worker thread reads the start times of the noted
    runs that are still going, and `write` gets their marks. Most cron runs
    end sooner and cost nothing more. Reading /proc at the spawn instead
    was measured to slow spawning: each of its system calls gives up the
    GIL and waits to get it back, on the event loop or in a spawn thread.

    A start time read while the process had not been reaped is its own:
    `reaped()` is checked after the read, and reaping is for good.
    """

    def __init__(
        self, write: Callable[[str, ProcessMark], None], delay: float = MARK_DELAY
    ) -> None:
        self.write = write
        self.delay = delay
        # Runs waiting for their mark: execution id -> (pid, reaped).
        self._noted: dict[str, tuple[int, Callable[[], bool]]] = {}
        self._reading: dict[str, tuple[int, Callable[[], bool]]] = {}
        self._task: asyncio.Task[None] | None = None

    def note(self, exec_id: str, pid: int, reaped: Callable[[], bool]) -> None:
        """A run's first process started (call on the event loop)."""
        self._noted[exec_id] = (pid, reaped)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._take_marks())

    def drop(self, exec_id: str) -> None:
        """The run ended: it wants no mark (a written one goes with its
        outbox record)."""
        self._noted.pop(exec_id, None)
        self._reading.pop(exec_id, None)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _take_marks(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._noted:
                await asyncio.sleep(self.delay)
                self._reading, self._noted = self._noted, {}
                batch = list(self._reading.items())
                pids = [pid for _, (pid, _) in batch]
                ticks = await loop.run_in_executor(None, _start_ticks_of, pids)
                # Runs that ended meanwhile were dropped from _reading.
                for (exec_id, (pid, reaped)), start in zip(batch, ticks, strict=True):
                    if exec_id in self._reading and start is not None and not reaped():
                        self.write(exec_id, ProcessMark(pid, start, boot_id()))
                self._reading = {}
        finally:
            if self._task is asyncio.current_task():
                self._task = None


def _start_ticks_of(pids: list[int]) -> list[int | None]:
    return [process_start_ticks(pid) for pid in pids]


def find_orphans(
    runs: list[tuple[str, ProcessMark | None]],
) -> list[Orphan]:
    """The process groups still running for these (execution id, mark)
    pairs, each only if proven that run's (see the module docstring).
    A run without a mark is looked for by its processes' environment."""
    table = _ProcessTable()
    found = []
    for execution_id, mark in runs:
        if mark is None:
            orphan = _find_by_environment(table, execution_id)
        else:
            orphan = _find_by_mark(table, execution_id, mark)
        if orphan is not None:
            found.append(orphan)
    return found


def find_orphan(execution_id: str, mark: ProcessMark | None) -> Orphan | None:
    """`find_orphans` for one run."""
    found = find_orphans([(execution_id, mark)])
    return found[0] if found else None


def _find_by_mark(
    table: _ProcessTable, execution_id: str, mark: ProcessMark
) -> Orphan | None:
    if mark.boot_id != boot_id():
        return None  # the machine rebooted: nothing of that run survived
    members = table.members(mark.pid)
    if not members:
        return None
    # A leader waiting to be reaped (a zombie) still holds its pid and start
    # time, so it proves the group as well as a running one.
    leader = _stat(mark.pid)
    if leader is not None:
        named = _execution_id_of(mark.pid)
        if leader.start_ticks != mark.start_ticks or leader.pgrp != mark.pid:
            log.info(
                "not stopping pid=%d of execution=%s: it is another process now "
                "(started at tick %d, recorded %d)",
                mark.pid,
                execution_id,
                leader.start_ticks,
                mark.start_ticks,
            )
            return None
        if named is not None and named != execution_id:
            log.info(
                "not stopping pid=%d of execution=%s: its environment names "
                "execution=%s",
                mark.pid,
                execution_id,
                named,
            )
            return None
        return Orphan(execution_id, mark.pid, members)
    # The leader exited; members remain. Only their environment can prove
    # the group was not recycled since.
    if any(_execution_id_of(pid) == execution_id for pid in members):
        return Orphan(execution_id, mark.pid, members)
    log.info(
        "not stopping process group pgid=%d of execution=%s: its leader is "
        "gone and no member's environment names the execution",
        mark.pid,
        execution_id,
    )
    return None


def _find_by_environment(table: _ProcessTable, execution_id: str) -> Orphan | None:
    # A job's processes may sit in more than one group (a member that ran
    # setsid); this returns the group of the first one found, the usual one.
    # Limitation: processes of such a run in a second group survive.
    named = table.named(execution_id)
    if not named:
        return None
    pgid = table.pgrp[named[0]]
    return Orphan(execution_id, pgid, table.members(pgid))


def _signal_group(pgid: int, signum: signal.Signals) -> bool:
    """Signal group `pgid`; False when it is gone or not ours to signal."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("not allowed to signal process group pgid=%d", pgid)
        return False
    return True


async def stop_orphans(
    orphans: list[Orphan], grace: float = ORPHAN_GRACE
) -> dict[str, str]:
    """SIGTERM every orphan's group, SIGKILL what still runs after `grace`.

    Returns, per execution id, how its group was stopped (for the run's
    output), e.g. "SIGTERM" or "SIGKILL after 2s".
    """
    how: dict[str, str] = {}
    for orphan in orphans:
        if _signal_group(orphan.pgid, signal.SIGTERM):
            how[orphan.execution_id] = "SIGTERM"
            log.info(
                "stopping orphaned process group of an interrupted execution "
                "execution=%s pgid=%d pids=%s signal=SIGTERM",
                orphan.execution_id,
                orphan.pgid,
                orphan.pids,
            )
    waiting = [o for o in orphans if o.execution_id in how]
    deadline = time.monotonic() + grace
    while waiting and time.monotonic() < deadline:
        await asyncio.sleep(_POLL)
        alive = {stat.pgrp for _, stat in _processes()}
        waiting = [o for o in waiting if o.pgid in alive]
    for orphan in waiting:
        if _signal_group(orphan.pgid, signal.SIGKILL):
            how[orphan.execution_id] = f"SIGKILL after {grace:g}s"
            log.info(
                "orphaned process group outlived SIGTERM execution=%s pgid=%d "
                "pids=%s signal=SIGKILL",
                orphan.execution_id,
                orphan.pgid,
                _members(orphan.pgid),
            )
    return how
