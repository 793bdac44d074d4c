"""The Raft log, hard state and snapshots on disk (LMDB plus snapshot files).

Layout, all in the data dir's one LMDB environment (``DataDir``):

    raft_log   8-byte big-endian index -> term (8 bytes BE) | kind (1 byte) | data
    raft_meta  b"first_index" -> 8-byte BE index of the first live entry
               b"hard_state"  -> term (8) | commit (8) | has_vote (1) | vote utf-8
               b"snapshot"    -> index (8) | term (8) of the current snapshot
               b"cluster_id"  -> utf-8 id of the cluster this server belongs to

and, in ``snapshot_dir``, one file per saved snapshot, named
``snapshot-<index:020>-<term:020>.snap``::

    magic b"CMSNAP01" | crc32 of body (4) | body length (8) | body
    body = index (8) | term (8) | membership length (4) | membership | data

where membership is ``encode_config_entry(membership, None)``.  Every integer
is big-endian, so the log's keys sort by index and a cursor walks it in order.

The live log is the keys [first_index, last_index].  ``last_index`` is not
stored: it is the cursor's last key (or ``first_index - 1`` when that key is
below ``first_index``).  Keys below ``first_index`` are garbage left by a
compaction: ``compact`` moves ``first_index`` and deletes at most
``gc_chunk`` of them in the same transaction; every later write transaction
deletes another chunk (and ``compact`` itself drains the rest in further
transactions), so no transaction grows with the size of the prefix and no
state ever has ``first_index`` pointing at a deleted entry.

Durability argument.  LMDB commits are atomic and, with the environment's
default flags, durable (fsync of data then meta page) when ``commit`` returns;
a crash at any moment leaves the last committed transaction.  Every mutation
here is exactly one write transaction, and ``LmdbRaftStorage.persist`` puts a
whole ``Ready`` (snapshot pointer, compaction, truncation, new entries, hard
state) into ONE transaction, so a crash shows all of a Ready or none of it,
and several proposals batched into one Ready share one fsync.  Snapshot files
cannot live in the transaction, so they are written first (temp file, fsync,
rename, fsync of the directory) and only become *current* when the
transaction that stores their (index, term) in ``raft_meta`` commits together
with the log compaction they allow.  A file newer than that pointer is an
orphan of a Ready that never committed and is removed at start; the pointer's
file is loaded, or, when its checksum fails, the previous one (with a
warning).  In-memory caches (bounds, recent terms, current snapshot) change
only after a commit succeeded, so a failed write leaves the object as before.

All access happens on one thread (the ``DataDir`` rule).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import lmdb

from cronmesh.errors import InvariantViolation, StorageError
from cronmesh.raft.ready import Ready
from cronmesh.raft.types import (
    Entry,
    EntryKind,
    HardState,
    Membership,
    Snapshot,
    SnapshotMeta,
    decode_config_entry,
    encode_config_entry,
)
from cronmesh.storage.env import DataDir

__all__ = ["LmdbLogStore", "LmdbRaftStorage", "LmdbStableStore"]

log = logging.getLogger("cronmesh.storage")

LOG_TABLE = "raft_log"
META_TABLE = "raft_meta"
FIRST_KEY = b"first_index"
HARD_KEY = b"hard_state"
SNAP_KEY = b"snapshot"
CLUSTER_KEY = b"cluster_id"

_U64 = struct.Struct(">Q")
_ENTRY_HEAD = struct.Struct(">QB")  # term, kind; data follows
_HARD = struct.Struct(">QQB")  # term, commit, has_vote; vote follows
_SNAP_PTR = struct.Struct(">QQ")  # index, term
_SNAP_MAGIC = b"CMSNAP01"
_SNAP_HEAD = struct.Struct(">8sIQ")  # magic, crc32(body), len(body)
_SNAP_BODY = struct.Struct(">QQI")  # index, term, len(membership)
_SNAP_NAME = re.compile(r"^snapshot-(\d{20})-(\d{20})\.snap$")

DEFAULT_TERM_CACHE = 4096  # terms of the newest entries kept in memory
DEFAULT_GC_CHUNK = 4096  # compacted keys deleted per write transaction
SNAPSHOTS_KEPT = 2
# A failed commit with less free space than this is reported as "disk full":
# LMDB turns a short write (what ENOSPC usually looks like) into EIO.
# Limitation: a heuristic; a real EIO on a nearly full disk is called "full".
_FULL_MARGIN = 4 << 20

T = TypeVar("T")
Stage = Callable[[lmdb.Transaction, "_LogState"], None]
# Runs a transaction body in one write transaction and commits it: DataDir.write
# or a caller's committer that puts more work into the same transaction.
Committer = Callable[[Callable[[lmdb.Transaction], "_LogState"]], "_LogState"]


def _key(index: int) -> bytes:
    return _U64.pack(index)


def _encode_entry(entry: Entry) -> bytes:
    return _ENTRY_HEAD.pack(entry.term, int(entry.kind)) + entry.data


def _decode_entry(index: int, raw: bytes) -> Entry:
    term, kind = _ENTRY_HEAD.unpack_from(raw)
    return Entry(index, term, EntryKind(kind), bytes(raw[_ENTRY_HEAD.size :]))


def _encode_hard_state(state: HardState) -> bytes:
    vote = b"" if state.vote is None else state.vote.encode()
    return _HARD.pack(state.term, state.commit, state.vote is not None) + vote


def _decode_hard_state(raw: bytes) -> HardState:
    term, commit, has_vote = _HARD.unpack_from(raw)
    vote = bytes(raw[_HARD.size :]).decode() if has_vote else None
    return HardState(term=term, vote=vote, commit=commit)


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _disk_full(exc: BaseException, path: Path, need: int) -> bool:
    """Whether a failed write looks like a full disk (see ``_FULL_MARGIN``)."""
    chain: BaseException | None = exc
    while chain is not None:
        text = str(chain)
        if getattr(chain, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in text or "disk full" in text:
            return True
        if "Input/output error" in text:
            free = _free_bytes(path)
            return free is not None and free < max(_FULL_MARGIN, 2 * need)
        chain = chain.__cause__
    return False


def _write(
    data: DataDir,
    fn: Callable[[lmdb.Transaction], T],
    what: str,
    need: int,
    write: Callable[[Callable[[lmdb.Transaction], T]], T] | None = None,
) -> T:
    """``data.write(fn)`` (or ``write(fn)``), with a full disk reported as such.

    Raises:
        StorageError: LMDB failed or the disk is full; nothing was written.
    """
    try:
        return (write or data.write)(fn)
    except StorageError as exc:
        if _disk_full(exc, data.path, need):
            raise StorageError(
                f"disk full: {what} in {data.path} failed "
                f"(free {_free_bytes(data.path)} bytes); nothing was written"
            ) from exc
        raise


@dataclass(slots=True)
class _LogState:
    """What the log store caches in memory; copied, changed and swapped per txn.

    ``terms`` holds the terms of the entries [last + 1 - len(terms), last].
    """

    first: int
    last: int
    terms: list[int] = field(default_factory=list)
    garbage: bool = False  # keys below ``first`` may remain in the table

    def copy(self) -> _LogState:
        # Limitation: O(term_cache) per write txn (~10 us at 4096); cheap enough.
        return _LogState(self.first, self.last, list(self.terms), self.garbage)


class LmdbLogStore:
    """A ``LogStore`` in the ``raft_log`` table of a ``DataDir``."""

    def __init__(
        self,
        data: DataDir,
        *,
        term_cache: int = DEFAULT_TERM_CACHE,
        gc_chunk: int = DEFAULT_GC_CHUNK,
    ) -> None:
        self._data = data
        self._log_db = data.db(LOG_TABLE)
        self._meta_db = data.db(META_TABLE)
        self._term_cache = max(1, term_cache)
        self._gc_chunk = max(1, gc_chunk)
        self._state = self._load()
        log.debug(
            "raft log opened first=%d last=%d path=%s",
            self._state.first,
            self._state.last,
            data.path,
        )
        if self._state.garbage:
            self.collect_garbage()

    def _load(self) -> _LogState:
        with self._data.read() as txn:
            raw = txn.get(FIRST_KEY, db=self._meta_db)
            first = _U64.unpack(raw)[0] if raw else 1
            with txn.cursor(db=self._log_db) as cur:
                garbage = cur.first() and _U64.unpack(cur.key())[0] < first
                last = first - 1
                terms: list[int] = []
                if cur.last():
                    last = max(last, _U64.unpack(cur.key())[0])
                    for key, value in cur.iterprev(keys=True, values=True):
                        index = _U64.unpack(key)[0]
                        if index < first or len(terms) >= self._term_cache:
                            break
                        terms.append(_ENTRY_HEAD.unpack_from(value)[0])
                terms.reverse()
        return _LogState(first, last, terms, bool(garbage))

    # -- reads
    def first_index(self) -> int:
        return self._state.first

    def last_index(self) -> int:
        return self._state.last

    def _check(self, index: int) -> None:
        st = self._state
        if not st.first <= index <= st.last:
            raise InvariantViolation(
                f"raft: log index {index} outside [{st.first}, {st.last}]"
            )

    def term(self, index: int) -> int:
        self._check(index)
        st = self._state
        offset = index - (st.last + 1 - len(st.terms))
        if offset >= 0:
            return st.terms[offset]
        with self._data.read() as txn:
            raw = txn.get(_key(index), db=self._log_db)
        if raw is None:
            raise InvariantViolation(f"raft: log entry {index} missing from LMDB")
        return int(_ENTRY_HEAD.unpack_from(raw)[0])

    def entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        if lo >= hi:
            return []
        self._check(lo)
        self._check(hi - 1)
        out: list[Entry] = []
        size = 0
        with self._data.read() as txn, txn.cursor(db=self._log_db) as cur:
            if not cur.set_key(_key(lo)):
                raise InvariantViolation(f"raft: log entry {lo} missing from LMDB")
            for key, value in cur.iternext(keys=True, values=True):
                index = _U64.unpack(key)[0]
                if index >= hi:
                    break
                if index != lo + len(out):
                    raise InvariantViolation(
                        f"raft: log entry {lo + len(out)} missing from LMDB"
                    )
                entry = _decode_entry(index, value)
                size += entry.size()
                if out and size > max_bytes:
                    break
                out.append(entry)
        return out

    # -- writes
    def append(self, entries: list[Entry], truncate_from: int | None = None) -> None:
        def stage(txn: lmdb.Transaction, st: _LogState) -> None:
            self._stage_append(txn, st, entries, truncate_from)

        self._commit(stage, f"append of {len(entries)} raft entries", _size(entries))

    def compact(self, prefix: int) -> None:
        if prefix < self._state.first:
            return

        def stage(txn: lmdb.Transaction, st: _LogState) -> None:
            self._stage_compact(txn, st, prefix)

        self._commit(stage, f"raft log compaction to {prefix}", 0)
        log.info("raft log compacted to index=%d", prefix)
        self.collect_garbage()

    def collect_garbage(self) -> None:
        """Delete every compacted key left in the table, a chunk per transaction."""
        while self._state.garbage:
            self._commit(lambda _txn, _st: None, "raft log garbage collection", 0)

    # -- the transaction machinery (also used by LmdbRaftStorage)
    def _commit(
        self, stage: Stage, what: str, need: int, committer: Committer | None = None
    ) -> None:
        """Run ``stage`` in one write transaction; swap the cached state on success.

        ``committer`` (default ``DataDir.write``) runs the body in a write
        transaction of this store's ``DataDir`` and commits it; the cached
        state is swapped only when it returned.

        Raises:
            StorageError: LMDB failed or the disk is full; nothing was written.
        """

        def run(txn: lmdb.Transaction) -> _LogState:
            st = self._state.copy()  # fresh per try: DataDir.write may retry
            stage(txn, st)
            if st.garbage:
                self._stage_gc(txn, st)
            return st

        self._state = _write(self._data, run, what, need, committer)

    def _stage_append(
        self,
        txn: lmdb.Transaction,
        st: _LogState,
        entries: list[Entry],
        truncate_from: int | None,
    ) -> None:
        if truncate_from is not None and truncate_from <= st.last:
            if truncate_from < st.first:
                raise InvariantViolation(
                    f"raft: truncate at {truncate_from} below first {st.first}"
                )
            # Limitation: the dropped suffix is deleted in this one txn, unbounded
            # (it must be atomic with the append); uncommitted suffixes are short.
            with txn.cursor(db=self._log_db) as cur:
                if cur.set_range(_key(truncate_from)):
                    while cur.delete():
                        pass
            dropped = st.last - truncate_from + 1
            del st.terms[max(0, len(st.terms) - dropped) :]
            st.last = truncate_from - 1
        for entry in entries:
            if entry.index != st.last + 1:
                raise InvariantViolation(
                    f"raft: append of index {entry.index} after {st.last}"
                )
            # Every key in the table is <= st.last here, so MDB_APPEND holds.
            value = _encode_entry(entry)
            if not txn.put(_key(entry.index), value, db=self._log_db, append=True):
                raise InvariantViolation(f"raft: LMDB refused entry {entry.index}")
            st.last = entry.index
            st.terms.append(entry.term)
        if len(st.terms) > 2 * self._term_cache:
            del st.terms[: len(st.terms) - self._term_cache]

    def _stage_compact(self, txn: lmdb.Transaction, st: _LogState, prefix: int) -> None:
        if prefix < st.first:
            return
        st.first = prefix + 1
        st.last = max(st.last, prefix)
        live = st.last - st.first + 1
        if len(st.terms) > live:
            del st.terms[: len(st.terms) - live]
        txn.put(FIRST_KEY, _U64.pack(st.first), db=self._meta_db)
        st.garbage = True

    def _stage_gc(self, txn: lmdb.Transaction, st: _LogState) -> None:
        # Limitation: after a compaction in a Ready, leftovers wait for later
        # writes (or the next open); they cost disk space, never correctness.
        limit = _key(st.first)
        deleted = 0
        with txn.cursor(db=self._log_db) as cur:
            cur.first()
            while deleted < self._gc_chunk:
                key = cur.key()  # b"" once the cursor ran off the end
                if not key or key >= limit:
                    break
                cur.delete()  # moves to the next key
                deleted += 1
            key = cur.key()
            st.garbage = bool(key) and key < limit
        log.debug("raft log garbage deleted=%d more=%s", deleted, st.garbage)


def _size(entries: list[Entry]) -> int:
    return sum(entry.size() for entry in entries)


class LmdbStableStore:
    """A ``StableStore``: hard state in ``raft_meta``, snapshots as files."""

    def __init__(self, data: DataDir, snapshot_dir: Path) -> None:
        self._data = data
        self._meta_db = data.db(META_TABLE)
        self.snapshot_dir = Path(snapshot_dir)
        try:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.snapshot_dir}: {exc}") from exc
        with data.read() as txn:
            raw_hs = txn.get(HARD_KEY, db=self._meta_db)
            raw_ptr = txn.get(SNAP_KEY, db=self._meta_db)
            raw_id = txn.get(CLUSTER_KEY, db=self._meta_db)
        self._cluster_id = bytes(raw_id).decode() if raw_id else ""
        self._hard_state = _decode_hard_state(raw_hs) if raw_hs else HardState()
        pointer = _SNAP_PTR.unpack(raw_ptr) if raw_ptr else None
        self._snapshot = self._load_snapshot(pointer)

    # -- hard state
    def hard_state(self) -> HardState:
        return self._hard_state

    def save_hard_state(self, state: HardState) -> None:
        _write(
            self._data, lambda txn: self._stage_hard_state(txn, state), "hard state", 64
        )
        self._hard_state = state

    def _stage_hard_state(self, txn: lmdb.Transaction, state: HardState) -> None:
        txn.put(HARD_KEY, _encode_hard_state(state), db=self._meta_db)

    # -- cluster identity
    def cluster_id(self) -> str:
        """The id of the cluster this server belongs to; "" when none yet."""
        return self._cluster_id

    def save_cluster_id(self, cluster_id: str) -> None:
        _write(
            self._data,
            lambda txn: self._stage_cluster_id(txn, cluster_id),
            "cluster id",
            64,
        )
        self._cluster_id = cluster_id

    def _stage_cluster_id(self, txn: lmdb.Transaction, cluster_id: str) -> None:
        txn.put(CLUSTER_KEY, cluster_id.encode(), db=self._meta_db)

    # -- snapshots
    def snapshot(self) -> Snapshot | None:
        # Limitation: held in memory whole, and files are read and written whole.
        return self._snapshot

    def save_snapshot(self, snapshot: Snapshot) -> None:
        path = self._write_file(snapshot)
        meta = snapshot.meta
        try:
            _write(
                self._data, lambda txn: self._stage_pointer(txn, meta), "snapshot", 64
            )
        except StorageError:
            self._discard_unreferenced([path])
            raise
        self._saved(snapshot)

    def _stage_pointer(self, txn: lmdb.Transaction, meta: SnapshotMeta) -> None:
        txn.put(SNAP_KEY, _SNAP_PTR.pack(meta.index, meta.term), db=self._meta_db)

    def _path(self, index: int, term: int) -> Path:
        return self.snapshot_dir / f"snapshot-{index:020d}-{term:020d}.snap"

    def _files(self) -> list[tuple[int, int, Path]]:
        """Snapshot files as (index, term, path), oldest first."""
        found: list[tuple[int, int, Path]] = []
        for path in self.snapshot_dir.iterdir():
            match = _SNAP_NAME.match(path.name)
            if match:
                found.append((int(match[1]), int(match[2]), path))
        return sorted(found)

    def _write_file(self, snapshot: Snapshot) -> Path:
        """Write ``snapshot`` to its file durably (temp, fsync, rename, fsync dir).

        Raises:
            StorageError: the disk is full or the write failed; no file is left.
        """
        meta = snapshot.meta
        members = encode_config_entry(meta.membership, None)
        body = (
            _SNAP_BODY.pack(meta.index, meta.term, len(members))
            + members
            + snapshot.data
        )
        head = _SNAP_HEAD.pack(_SNAP_MAGIC, zlib.crc32(body), len(body))
        path = self._path(meta.index, meta.term)
        tmp = path.with_name(path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(head + body)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            _fsync_dir(self.snapshot_dir)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageError(
                    f"disk full: snapshot index={meta.index} ({len(body)} bytes) "
                    f"in {self.snapshot_dir}; nothing was written"
                ) from exc
            raise StorageError(f"cannot write snapshot {path}: {exc}") from exc
        log.debug("snapshot file written path=%s bytes=%d", path, len(body))
        return path

    def _saved(self, snapshot: Snapshot) -> None:
        """After the pointer to ``snapshot`` committed: cache it, prune old files."""
        self._snapshot = snapshot
        meta = snapshot.meta
        log.info(
            "raft snapshot saved index=%d term=%d bytes=%d",
            meta.index,
            meta.term,
            len(snapshot.data),
        )
        current = (meta.index, meta.term)
        older = [f for f in self._files() if (f[0], f[1]) <= current]
        for _index, _term, path in older[:-SNAPSHOTS_KEPT]:
            with contextlib.suppress(OSError):
                path.unlink()
                log.debug("old snapshot removed path=%s", path)

    def _discard_unreferenced(self, paths: list[Path]) -> None:
        """Remove files written for a transaction that did not commit."""
        current = self._snapshot
        keep = (
            None
            if current is None
            else self._path(current.meta.index, current.meta.term)
        )
        for path in paths:
            if path != keep:
                with contextlib.suppress(OSError):
                    path.unlink()

    def _load_snapshot(self, pointer: tuple[int, int] | None) -> Snapshot | None:
        for tmp in self.snapshot_dir.glob("snapshot-*.snap.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        candidates: list[tuple[int, int, Path]] = []
        # Limitation: this owns snapshot_dir; unknown snapshot-*.snap files
        # newer than the pointer are deleted, so never share the directory.
        for index, term, path in self._files():
            if pointer is None or (index, term) > pointer:
                # Written for a Ready whose transaction never committed.
                log.debug("removing uncommitted snapshot file %s", path)
                with contextlib.suppress(OSError):
                    path.unlink()
            else:
                candidates.append((index, term, path))
        loaded: Snapshot | None = None
        for index, term, path in reversed(candidates):
            loaded = _read_snapshot_file(path, index, term)
            if loaded is not None:
                break
        # A crash between a commit and its pruning can leave an extra old file.
        keep = {path for _i, _t, path in candidates[-SNAPSHOTS_KEPT:]}
        if loaded is not None:
            keep.add(self._path(loaded.meta.index, loaded.meta.term))
        for _index, _term, path in candidates:
            if path not in keep:
                log.debug("old snapshot removed path=%s", path)
                with contextlib.suppress(OSError):
                    path.unlink()
        if loaded is not None:
            index, term = loaded.meta.index, loaded.meta.term
            if (index, term) != pointer:
                # Limitation: the log was compacted past this older snapshot,
                # so RaftLog will refuse the gap; an operator must intervene.
                log.warning(
                    "falling back to older snapshot index=%d term=%d "
                    "(the current one, index=%s term=%s, is unreadable)",
                    index,
                    term,
                    *(pointer or ("?", "?")),
                )
            log.debug("snapshot loaded index=%d term=%d", index, term)
            return loaded
        if pointer is not None:
            log.warning(
                "no readable snapshot in %s (expected index=%d term=%d)",
                self.snapshot_dir,
                *pointer,
            )
        return None


def _read_snapshot_file(path: Path, index: int, term: int) -> Snapshot | None:
    """The snapshot in ``path``, or None (with a warning) if it is damaged."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        log.warning("cannot read snapshot %s: %s; ignoring it", path, exc)
        return None
    problem = ""
    if len(raw) < _SNAP_HEAD.size:
        problem = "truncated header"
    else:
        magic, crc, length = _SNAP_HEAD.unpack_from(raw)
        body = raw[_SNAP_HEAD.size :]
        if magic != _SNAP_MAGIC:
            problem = "bad magic"
        elif len(body) != length:
            problem = f"length {len(body)} != {length}"
        elif zlib.crc32(body) != crc:
            problem = "checksum mismatch"
    if not problem:
        b_index, b_term, m_len = _SNAP_BODY.unpack_from(body)
        start = _SNAP_BODY.size
        if (b_index, b_term) != (index, term) or start + m_len > len(body):
            problem = "header does not match file name"
        else:
            try:
                membership = decode_config_entry(body[start : start + m_len])
            except InvariantViolation:
                problem = "malformed membership"
    if problem:
        log.warning("snapshot %s is damaged (%s); ignoring it", path, problem)
        return None
    meta = SnapshotMeta(index, term, membership)
    return Snapshot(meta, body[start + m_len :])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LmdbRaftStorage:
    """The log and stable store of one server, persisted a Ready at a time."""

    def __init__(
        self,
        data: DataDir,
        snapshot_dir: Path | None = None,
        *,
        term_cache: int = DEFAULT_TERM_CACHE,
        gc_chunk: int = DEFAULT_GC_CHUNK,
    ) -> None:
        self.data = data
        self.log = LmdbLogStore(data, term_cache=term_cache, gc_chunk=gc_chunk)
        self.stable = LmdbStableStore(
            data, snapshot_dir if snapshot_dir is not None else data.path / "snapshots"
        )

    def persist(self, ready: Ready, committer: Committer | None = None) -> None:
        """Write the durable parts of ``ready`` with one LMDB commit (one fsync).

        Same order and result as ``persist_ready``; snapshot files are written
        (and fsynced) before the transaction that makes them current.
        ``committer``, when given, must run the body it is handed exactly in
        one write transaction of ``self.data`` and commit it (with fsync),
        with whatever else the caller writes in that transaction (the driver
        applies committed entries in it).

        Raises:
            StorageError: LMDB failed or the disk is full; nothing changed.
            InvariantViolation: the Ready breaks the LogStore rules; nothing changed.
        """
        if not ready.must_sync():
            return
        log_store, stable = self.log, self.stable
        snaps = [s for s in (ready.snapshot, ready.compacted) if s is not None]
        written: list[Path] = []
        try:
            for snap in snaps:
                written.append(stable._write_file(snap))
        except StorageError:
            stable._discard_unreferenced(written)
            raise

        def stage(txn: lmdb.Transaction, st: _LogState) -> None:
            if ready.snapshot is not None:
                index = ready.snapshot.meta.index
                stable._stage_pointer(txn, ready.snapshot.meta)
                log_store._stage_append(txn, st, [], max(index + 1, st.first))
                log_store._stage_compact(txn, st, index)
            if ready.compacted is not None:
                stable._stage_pointer(txn, ready.compacted.meta)
                log_store._stage_compact(txn, st, ready.compacted.meta.index)
            if ready.entries or ready.truncate_from is not None:
                log_store._stage_append(
                    txn, st, list(ready.entries), ready.truncate_from
                )
            if ready.hard_state is not None:
                stable._stage_hard_state(txn, ready.hard_state)

        # Limitation: a Ready with a snapshot costs 2 more fsyncs (file, dir).
        need = _size(list(ready.entries)) + sum(len(s.data) for s in snaps)
        try:
            log_store._commit(
                stage, f"persist of {len(ready.entries)} entries", need, committer
            )
        except BaseException:
            stable._discard_unreferenced(written)
            raise
        if ready.hard_state is not None:
            stable._hard_state = ready.hard_state
        for snap in snaps:
            stable._saved(snap)
            log.info("raft log compacted to index=%d", snap.meta.index)
        log.debug(
            "raft ready persisted entries=%d truncate_from=%s last=%d",
            len(ready.entries),
            ready.truncate_from,
            log_store.last_index(),
        )

    def bootstrap(self, voters: set[str], cluster_id: str) -> None:
        """``raft.storage.bootstrap`` plus the cluster id, in one commit, so a
        crash leaves either a founder with both or a fresh server.

        Raises:
            InvariantViolation: this server has Raft state already.
            StorageError: LMDB failed; nothing was written.
        """
        log_store, stable = self.log, self.stable
        if log_store.last_index() != 0 or stable.hard_state() != HardState():
            raise InvariantViolation("raft: bootstrap on a server that has state")
        data = encode_config_entry(Membership(frozenset(voters)), None)
        entry = Entry(1, 1, EntryKind.CONFIG, data)
        hard = HardState(term=1)

        def stage(txn: lmdb.Transaction, st: _LogState) -> None:
            log_store._stage_append(txn, st, [entry], None)
            stable._stage_hard_state(txn, hard)
            stable._stage_cluster_id(txn, cluster_id)

        log_store._commit(stage, "bootstrap", len(data) + 64)
        stable._hard_state = hard
        stable._cluster_id = cluster_id

    def close(self) -> None:
        """Close the data dir (the stores are unusable afterwards)."""
        self.data.close()
