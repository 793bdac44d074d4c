"""Raft consensus for cronmesh servers: a pure core plus its storage contracts.

``RaftNode`` (``node``) is the state machine; ``Ready`` (``ready``) is what
it asks the driver to do; ``LogStore``/``StableStore`` (``storage``) are what
the driver must provide; ``encode``/``decode`` (``messages``) carry messages
over any transport.  ``sim`` is the deterministic simulator used by tests.
"""

from __future__ import annotations

from cronmesh.raft.errors import (
    ConfigChangeInProgress,
    DecodeError,
    InvalidRequest,
    NotLeader,
    ProposalDropped,
    RaftError,
    ReadyPending,
    TransferInProgress,
)
from cronmesh.raft.messages import (
    AppendEntries,
    AppendEntriesResp,
    InstallSnapshot,
    InstallSnapshotResp,
    Message,
    ReadIndex,
    ReadIndexResp,
    RequestVote,
    RequestVoteResp,
    TimeoutNow,
    decode,
    encode,
)
from cronmesh.raft.node import RaftConfig, RaftNode, Status
from cronmesh.raft.ready import ReadState, Ready, Role, SoftState
from cronmesh.raft.storage import (
    LogStore,
    MemoryLogStore,
    MemoryStableStore,
    StableStore,
    bootstrap,
    persist_ready,
)
from cronmesh.raft.types import (
    ConfChange,
    ConfChangeOp,
    Entry,
    EntryKind,
    HardState,
    Membership,
    Snapshot,
    SnapshotMeta,
)

__all__ = [
    "AppendEntries",
    "AppendEntriesResp",
    "ConfChange",
    "ConfChangeOp",
    "ConfigChangeInProgress",
    "DecodeError",
    "Entry",
    "EntryKind",
    "HardState",
    "InstallSnapshot",
    "InstallSnapshotResp",
    "InvalidRequest",
    "LogStore",
    "Membership",
    "MemoryLogStore",
    "MemoryStableStore",
    "Message",
    "NotLeader",
    "ProposalDropped",
    "RaftConfig",
    "RaftError",
    "RaftNode",
    "ReadIndex",
    "ReadIndexResp",
    "ReadState",
    "Ready",
    "ReadyPending",
    "RequestVote",
    "RequestVoteResp",
    "Role",
    "Snapshot",
    "SnapshotMeta",
    "SoftState",
    "StableStore",
    "Status",
    "TimeoutNow",
    "TransferInProgress",
    "bootstrap",
    "decode",
    "encode",
    "persist_ready",
]
