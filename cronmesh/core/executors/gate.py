"""Start gates: processes started ahead of their instant, released at once.

A staged run (core/scheduler.py) reaches its agent up to a second before
its instant. Starting a process costs a fork and an exec (about 0.5 ms of
CPU each here, ~2,000 a second on two cores), so 200 runs due at one
instant would start over ~100 ms if they were all started at the instant.
A gate moves that cost ahead: the shell executor starts each gated job as

    /bin/sh -c 'read -r _ <&3 || exit 125; exec "$@"' cronmesh-gate ARGV...

with the read end of the gate's pipe as descriptor 3. The shell blocks in
`read` until the gate opens; `open` writes one line per process that may
hold the pipe, in one write, and each shell takes its line and execs the
job's own argv, with descriptor 3 closed, in the same process (same pid,
same process group, same environment). So the instant costs one write for
all of them; what is left is each program's own exec, done by the kernel in
parallel.

If the agent dies before the gate opens, the write end closes with it: the
shells see end of file and exit 125 without running anything (the restart
reports those runs interrupted, as any run cut by a crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os

__all__ = ["GATE_SCRIPT", "StartGate"]

log = logging.getLogger("cronmesh.executors")

# What a gated process runs first (see the docstring); $0 names it in errors.
GATE_SCRIPT = 'read -r _ <&3 || exit 125; exec "$@" 3<&-'
GATE_NAME = "cronmesh-gate"
GATE_FD = 3
# A pipe holds 64 KiB: one byte a process, with room to spare.
MAX_HOLDERS = 16_384


class StartGate:
    """One pipe that holds back every process gated on it until `open`.

    `hold` before starting a process on the gate and `unhold` once that
    start returned (started or failed): the read end stays open while a
    start may still pass it to a child. `released` is done once the gate
    opened (or was closed without opening).
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, at: float | None = None
    ) -> None:
        # When it is meant to open (the loop's time), if known: a held job's
        # timeout counts from then, with nothing to wake at the opening.
        self.at = at
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        # posix_spawn's dup2 onto descriptor 3 must copy, never be a no-op
        # that keeps close-on-exec: keep both ends well above it.
        self.read_fd = _high(read_fd)
        self._write_fd = _high(write_fd)
        self.holds = 0  # processes that may hold the pipe (started or not)
        self._starting = 0  # starts in progress that use read_fd
        self.released: asyncio.Future[bool] = loop.create_future()

    @property
    def is_open(self) -> bool:
        return self.released.done()

    @property
    def full(self) -> bool:
        return self.holds >= MAX_HOLDERS

    def hold(self) -> int:
        """A process is about to start on this gate: its read descriptor."""
        assert not self.released.done(), "a gate that opened holds nothing"
        self.holds += 1
        self._starting += 1
        return self.read_fd

    def unhold(self) -> None:
        """A start that `hold` announced has returned."""
        self._starting -= 1
        self._maybe_close_read()

    def open(self) -> None:
        """Let every process on the gate go (idempotent)."""
        if self.released.done():
            return
        try:
            os.write(self._write_fd, b"\n" * self.holds)
        except OSError as exc:
            # EPIPE: every holder is gone already (killed before its start).
            log.debug("start gate: write failed error=%s", exc)
        self._close(True)

    def close(self) -> None:
        """Give up: processes on the gate exit 125 without running."""
        if not self.released.done():
            self._close(False)

    def _close(self, opened: bool) -> None:
        with contextlib.suppress(OSError):
            os.close(self._write_fd)
        self.released.set_result(opened)
        self._maybe_close_read()

    def _maybe_close_read(self) -> None:
        if self.released.done() and self._starting == 0 and self.read_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.read_fd)
            self.read_fd = -1


def _high(fd: int) -> int:
    """`fd` moved to a number above 9 (close-on-exec kept)."""
    if fd > 9:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved
