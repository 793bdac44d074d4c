"""The in-memory stores follow the LogStore/StableStore contracts."""

from __future__ import annotations

import pytest

from cronmesh.errors import InvariantViolation
from cronmesh.raft.storage import MemoryLogStore, MemoryStableStore, bootstrap
from cronmesh.raft.types import Entry, EntryKind, HardState


def filled(n: int) -> MemoryLogStore:
    log = MemoryLogStore()
    log.append([Entry(i, 1, data=b"x" * 10) for i in range(1, n + 1)])
    return log


def test_empty_log_bounds() -> None:
    log = MemoryLogStore()
    assert (log.first_index(), log.last_index()) == (1, 0)


def test_append_truncates_suffix_atomically() -> None:
    log = filled(5)
    log.append([Entry(3, 2), Entry(4, 2)], truncate_from=3)
    assert log.last_index() == 4
    assert [log.term(i) for i in range(1, 5)] == [1, 1, 2, 2]


def test_append_must_be_contiguous() -> None:
    log = filled(3)
    with pytest.raises(InvariantViolation):
        log.append([Entry(5, 1)])


def test_entries_respect_max_bytes_but_return_one() -> None:
    log = filled(5)
    assert len(log.entries(1, 6, 0)) == 1
    assert len(log.entries(1, 6, 2 * Entry(1, 1, data=b"x" * 10).size())) == 2
    assert len(log.entries(2, 4, 1 << 20)) == 2


def test_compact_prefix_and_past_end() -> None:
    log = filled(5)
    log.compact(2)
    assert (log.first_index(), log.last_index()) == (3, 5)
    with pytest.raises(InvariantViolation):
        log.term(2)
    log.compact(9)
    assert (log.first_index(), log.last_index()) == (10, 9)


def test_bootstrap_writes_config_entry_once() -> None:
    log, stable = MemoryLogStore(), MemoryStableStore()
    bootstrap(log, stable, {"a", "b"})
    assert log.entries(1, 2, 1 << 20)[0].kind is EntryKind.CONFIG
    assert stable.hard_state() == HardState(term=1)
    with pytest.raises(InvariantViolation):
        bootstrap(log, stable, {"a", "b"})
