"""The core's view of its log: persisted entries in a LogStore plus an unstable tail.

Layout (thesis §5.1 for the snapshot prefix)::

    ... compacted (snapshot) ... | stable: in LogStore  | unstable: in memory
                        snap_index  first ..... offset-1 | offset ..... last

Entries appended since the last ``advance`` live in ``unstable``; the driver
persists them from the Ready, then ``stable_to`` moves the boundary.  When
an append conflicts with stable entries, ``truncate_from`` remembers where the
store must cut, and reads below ``offset`` still go to the store, which holds
the right entries there.  Nothing below ``offset`` changes until ``advance``.
"""

from __future__ import annotations

from cronmesh.errors import InvariantViolation
from cronmesh.raft.storage import LogStore
from cronmesh.raft.types import Entry, SnapshotMeta

__all__ = ["RaftLog"]


class RaftLog:
    """Entries, terms and bounds as the core sees them right now."""

    def __init__(self, store: LogStore, snap: SnapshotMeta | None) -> None:
        self._store = store
        self.snap_index = snap.index if snap else 0
        self.snap_term = snap.term if snap else 0
        first, last = store.first_index(), store.last_index()
        if first > self.snap_index + 1 or last < self.snap_index:
            raise InvariantViolation(
                f"raft: log [{first}, {last}] does not continue snapshot "
                f"index={self.snap_index}"
            )
        self.offset = last + 1  # index of unstable[0]
        self.unstable: list[Entry] = []
        self.truncate_from: int | None = None  # store suffix to drop, if any

    def first_index(self) -> int:
        return self.snap_index + 1

    def last_index(self) -> int:
        return self.offset + len(self.unstable) - 1

    def last_term(self) -> int:
        term = self.term(self.last_index())
        assert term is not None
        return term

    def stable_last_index(self) -> int:
        """Last index that is on disk (as of the last ``advance``)."""
        return self.offset - 1

    def term(self, index: int) -> int | None:
        """Term at ``index``; None when compacted away or past the end."""
        if index == self.snap_index:
            return self.snap_term
        if index < self.snap_index or index > self.last_index():
            return None
        if index >= self.offset:
            return self.unstable[index - self.offset].term
        return self._store.term(index)

    def matches(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def entries(self, lo: int, hi: int, max_bytes: int) -> list[Entry]:
        """Entries [lo, hi) within ``max_bytes`` (at least one when lo < hi)."""
        if lo <= self.snap_index or hi > self.last_index() + 1:
            raise InvariantViolation(
                f"raft: entries [{lo}, {hi}) outside ({self.snap_index}, "
                f"{self.last_index()}]"
            )
        out: list[Entry] = []
        if lo < self.offset:
            out = self._store.entries(lo, min(hi, self.offset), max_bytes)
            if len(out) < min(hi, self.offset) - lo:
                return out
        if hi <= self.offset:
            return out
        size = sum(e.size() for e in out)
        for entry in self.unstable[max(lo - self.offset, 0) : hi - self.offset]:
            size += entry.size()
            if out and size > max_bytes:
                break
            out.append(entry)
        return out

    def append(self, entries: list[Entry]) -> None:
        """Append ``entries`` in memory, dropping any suffix from entries[0]."""
        if not entries:
            return
        first = entries[0].index
        if first <= self.snap_index or first > self.last_index() + 1:
            raise InvariantViolation(
                f"raft: append at {first} outside ({self.snap_index}, "
                f"{self.last_index() + 1}]"
            )
        if first >= self.offset:
            del self.unstable[first - self.offset :]
        else:
            self.unstable = []
            self.offset = first
            if self.truncate_from is None or first < self.truncate_from:
                self.truncate_from = first
        self.unstable.extend(entries)

    def stable_to(self, count: int) -> None:
        """The first ``count`` unstable entries (and the truncation) are on disk."""
        self.offset += count
        del self.unstable[:count]
        self.truncate_from = None

    def compact_to(self, meta: SnapshotMeta) -> None:
        """Forget entries <= meta.index; they are covered by a local snapshot."""
        if meta.index > self.stable_last_index():
            raise InvariantViolation(
                f"raft: compact to {meta.index} beyond stable "
                f"{self.stable_last_index()}"
            )
        self.snap_index, self.snap_term = meta.index, meta.term

    def restore(self, meta: SnapshotMeta) -> None:
        """Replace the whole log by a snapshot received from the leader."""
        # Only called when the log lacks the snapshot's last entry, so no
        # entry after it can be the leader's (log matching): drop them all.
        self.snap_index, self.snap_term = meta.index, meta.term
        self.unstable = []
        self.offset = meta.index + 1
        self.truncate_from = None
