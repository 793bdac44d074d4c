"""Unit tests of RaftNode's API contract on one or two servers."""

from __future__ import annotations

import logging
import random

import pytest

from cronmesh.errors import InvariantViolation
from cronmesh.raft.errors import (
    ConfigChangeInProgress,
    InvalidRequest,
    NotLeader,
    ReadyPending,
)
from cronmesh.raft.log import RaftLog
from cronmesh.raft.messages import AppendEntries, AppendEntriesResp
from cronmesh.raft.node import RaftConfig, RaftNode
from cronmesh.raft.ready import Ready, Role
from cronmesh.raft.storage import (
    MemoryLogStore,
    MemoryStableStore,
    bootstrap,
    persist_ready,
)
from cronmesh.raft.types import ConfChange, ConfChangeOp, Entry, EntryKind


class Solo:
    """A single-voter cluster driven by hand."""

    def __init__(self, voters: set[str] | None = None) -> None:
        self.log, self.stable = MemoryLogStore(), MemoryStableStore()
        bootstrap(self.log, self.stable, voters or {"a"})
        self.core = RaftNode(
            RaftConfig(node_id="a"), self.log, self.stable, random.Random(0)
        )
        self.applied: list[Entry] = []

    def drive(self) -> list[Ready]:
        out = []
        while self.core.has_ready():
            ready = self.core.ready()
            persist_ready(ready, self.log, self.stable)
            self.applied.extend(ready.committed_entries)
            self.core.advance(ready)
            out.append(ready)
        return out

    def elect(self) -> None:
        for _ in range(40):
            self.core.tick()
            self.drive()
            if self.core.role is Role.LEADER:
                return
        raise AssertionError("no election")


def test_single_voter_elects_itself_and_commits() -> None:
    solo = Solo()
    solo.elect()
    index, term = solo.core.propose(b"hello")
    solo.drive()
    assert solo.applied[-1] == Entry(index, term, EntryKind.NORMAL, b"hello")
    assert [e.kind for e in solo.applied] == [
        EntryKind.CONFIG,
        EntryKind.NOOP,
        EntryKind.NORMAL,
    ]


def test_leader_reports_soft_state_once() -> None:
    solo = Solo()
    seen = []
    for _ in range(40):
        solo.core.tick()
        seen += [r.soft_state for r in solo.drive() if r.soft_state]
    assert [s.role for s in seen][-1] is Role.LEADER
    assert sum(1 for s in seen if s.role is Role.LEADER) == 1


def test_input_between_ready_and_advance_is_refused() -> None:
    solo = Solo()
    solo.elect()
    solo.core.propose(b"x")
    ready = solo.core.ready()
    with pytest.raises(ReadyPending):
        solo.core.tick()
    with pytest.raises(ReadyPending):
        solo.core.advance(Ready())
    persist_ready(ready, solo.log, solo.stable)
    solo.core.advance(ready)


def test_follower_refuses_proposals_with_hint() -> None:
    log, stable = MemoryLogStore(), MemoryStableStore()
    bootstrap(log, stable, {"a", "b"})
    core = RaftNode(RaftConfig(node_id="a"), log, stable, random.Random(0))
    with pytest.raises(NotLeader) as info:
        core.propose(b"x")
    assert info.value.leader_hint is None
    core.step(AppendEntries(to="a", frm="b", term=2, prev_index=1, prev_term=1))
    with pytest.raises(NotLeader) as info:
        core.propose(b"x")
    assert info.value.leader_hint == "b"
    assert isinstance(core.ready().messages[0], AppendEntriesResp)


def test_config_change_rules() -> None:
    solo = Solo()
    solo.elect()
    with pytest.raises(InvalidRequest):
        solo.core.propose_conf_change(ConfChange(ConfChangeOp.REMOVE, "a"))
    solo.core.propose_conf_change(ConfChange(ConfChangeOp.ADD_LEARNER, "b"))
    assert solo.core.membership.learners == {"b"}  # in force once appended
    with pytest.raises(ConfigChangeInProgress):
        solo.core.propose_conf_change(ConfChange(ConfChangeOp.PROMOTE, "b"))
    solo.drive()
    solo.core.propose_conf_change(ConfChange(ConfChangeOp.PROMOTE, "b"))
    assert solo.core.membership.voters == {"a", "b"}


def test_compact_beyond_applied_is_refused_and_restart_uses_snapshot() -> None:
    solo = Solo()
    solo.elect()
    for i in range(5):
        solo.core.propose(f"p{i}".encode())
    solo.drive()
    with pytest.raises(InvalidRequest):
        solo.core.compact(solo.core.applied + 1, b"state")
    applied = solo.core.applied
    solo.core.compact(applied - 1, b"state")
    solo.drive()
    assert solo.log.first_index() == applied
    again = RaftNode(RaftConfig(node_id="a"), solo.log, solo.stable, random.Random(1))
    assert again.applied == applied - 1
    assert again.membership.voters == {"a"}
    ready = again.ready()
    assert [e.index for e in ready.committed_entries] == [applied]


def test_config_validation() -> None:
    with pytest.raises(InvalidRequest):
        RaftConfig(node_id="a", election_ticks=2, heartbeat_ticks=2).validate()
    with pytest.raises(InvalidRequest):
        RaftConfig(node_id="").validate()


def test_role_changes_are_logged_with_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cronmesh.raft")
    solo = Solo()
    solo.elect()
    record = next(
        r for r in caplog.records if r.getMessage().startswith("became leader")
    )
    assert record.node_id == "a" and record.term == solo.core.term  # type: ignore[attr-defined]
    assert "node_id=a" in record.getMessage()


def test_raft_log_reads_across_stable_and_unstable() -> None:
    store = MemoryLogStore()
    store.append([Entry(i, 1) for i in range(1, 6)])
    log = RaftLog(store, None)
    log.append([Entry(4, 2), Entry(5, 2), Entry(6, 2)])
    assert log.truncate_from == 4
    assert [e.index for e in log.entries(2, 4, 1 << 20)] == [2, 3]
    assert [(e.index, e.term) for e in log.entries(3, 7, 1 << 20)] == [
        (3, 1),
        (4, 2),
        (5, 2),
        (6, 2),
    ]
    with pytest.raises(InvariantViolation):
        log.entries(3, 8, 1 << 20)


def test_status_summarizes_the_leader() -> None:
    solo = Solo()
    solo.elect()
    solo.core.propose(b"x")
    solo.drive()
    status = solo.core.status()
    assert status.role is Role.LEADER and status.leader == "a"
    assert status.commit == status.applied == status.last_index == 3
    assert status.match == {"a": 3}
    assert status.membership.voters == {"a"}
