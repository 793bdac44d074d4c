"""The data directory: one LMDB environment guarded by a lock file.

Every table of a node (the applied state now, the Raft log and hard state
later) lives in this one environment, so a single write transaction can
update several of them atomically. LMDB's map size is a ceiling, not an
allocation; when a write hits it we double it and run the write again,
so a growing state never fails with "map full".

All access happens on the agent's event-loop thread: LMDB needs no active
transaction in the process while the map is resized, and one thread is the
simplest way to guarantee that. A commit with fsync costs about half a
millisecond on a fast disk, but 8-12 ms on the 2-core VM of docs/benchmarks.md
under load; the loop can afford it because callers batch their writes.

Durability. LMDB is opened with ``MDB_NOMETASYNC``: a commit fsyncs the data
pages it wrote and then writes the meta page (the one that makes the
transaction current) without an fsync of its own. ``write`` follows every
commit with ``env.sync``, which fsyncs that meta page, so a write returns
durable exactly as with LMDB's default flags (data fsync, then meta fsync).
Inside ``unsynced()`` the second fsync is left out: such a transaction is
atomic and visible at once, survives the process being killed (the page
cache keeps it), and becomes durable with the next synced write (LMDB's
transactions are sequential, so a durable meta page covers every earlier
transaction) or the next ``flush``; a power loss before that undoes it,
and only it and the unsynced ones after it, never leaving a half-written
database (the data pages were fsynced before the meta page was written).
Only writes that can be redone from something durable may use it: the
Raft driver applies committed entries that way, since a lost apply is
replayed from the (durable) log on restart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import lmdb

from cronmesh.errors import StorageError

__all__ = ["DataDir"]

log = logging.getLogger("cronmesh.storage")

T = TypeVar("T")

INITIAL_MAP_SIZE = 64 << 20
MAX_DBS = 16


class DataDir:
    """An agent's data directory, locked for the life of the object."""

    def __init__(
        self, path: str | os.PathLike[str], *, map_size: int = INITIAL_MAP_SIZE
    ):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create data dir {self.path}: {exc}") from exc
        self._lock_fd = self._take_lock()
        try:
            self.env = lmdb.open(
                str(self.path / "state"),
                map_size=map_size,
                max_dbs=MAX_DBS,
                subdir=True,
                lock=True,
                # The lock file above already keeps other agents out.
                max_readers=256,
                # write() fsyncs the meta page itself (see the docstring).
                metasync=False,
            )
        except lmdb.Error as exc:
            self._release_lock()
            raise StorageError(f"cannot open LMDB in {self.path}: {exc}") from exc
        self._dbs: dict[str, lmdb._Database] = {}
        self._sync = True  # write() makes its commit durable (not in unsynced())
        # A write committed without its meta fsync since the last durable one.
        self.unsynced_writes = 0

    def _take_lock(self) -> int:
        lock_path = self.path / "LOCK"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StorageError(
                    f"data dir {self.path} is in use by another agent (pid {holder})"
                ) from exc
            raise StorageError(f"cannot lock data dir {self.path}: {exc}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _release_lock(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def db(self, name: str) -> lmdb._Database:
        """The named table, created on first use."""
        found = self._dbs.get(name)
        if found is None:
            found = self.env.open_db(name.encode(), create=True)
            self._dbs[name] = found
        return found

    @contextlib.contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        with self.env.begin(write=False, buffers=False) as txn:
            yield txn

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run `fn` in one write transaction and commit it (with fsync).

        `fn` may run more than once: when the map is full the transaction is
        aborted, the map doubled and `fn` called again, so it must not have
        side effects outside the transaction.

        Raises:
            StorageError: the disk is full or LMDB failed; nothing was written
                (or, when only the final fsync failed, the transaction is
                visible but maybe not durable).
        """
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    result = fn(txn)
                if self._sync:
                    self.env.sync(True)
                    self.unsynced_writes = 0
                else:
                    self.unsynced_writes += 1
                return result
            except lmdb.MapFullError:
                self._grow()
            except lmdb.DiskError as exc:
                raise StorageError(f"disk error writing {self.path}: {exc}") from exc
            except lmdb.Error as exc:
                if (
                    "No space left" in str(exc)
                    or getattr(exc, "errno", 0) == errno.ENOSPC
                ):
                    raise StorageError(
                        f"disk full writing {self.path}: nothing was written"
                    ) from exc
                raise StorageError(f"LMDB error in {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def unsynced(self) -> Iterator[None]:
        """Let the writes inside commit without the meta page's fsync.

        Use only for writes that are redone from durable data after a power
        loss (see the module docstring); ``flush`` makes them durable.
        """
        was, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = was

    def flush(self) -> None:
        """Make every committed write durable (one fsync; nothing when none
        is pending).

        Raises:
            StorageError: the fsync failed.
        """
        if not self.unsynced_writes:
            return
        try:
            self.env.sync(True)
        except lmdb.Error as exc:
            raise StorageError(f"fsync of {self.path} failed: {exc}") from exc
        self.unsynced_writes = 0

    def _grow(self) -> None:
        size = self.env.info()["map_size"] * 2
        log.info("growing LMDB map map_size=%d path=%s", size, self.path)
        self.env.set_mapsize(size)

    def close(self) -> None:
        with contextlib.suppress(lmdb.Error):
            self.env.close()
        self._release_lock()
