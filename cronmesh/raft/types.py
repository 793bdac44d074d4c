"""Plain value types shared by the Raft core, its storage and its messages.

Everything here is an immutable dataclass so that a value handed out in a
``Ready`` can never be changed behind the caller's back.  Indices and terms
are positive integers; index 0 and term 0 mean "before the first entry"
(Raft thesis §3.5).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field

from cronmesh.errors import InvariantViolation
from cronmesh.raft.errors import InvalidRequest

__all__ = [
    "ConfChange",
    "ConfChangeOp",
    "Entry",
    "EntryKind",
    "HardState",
    "Membership",
    "Snapshot",
    "SnapshotMeta",
    "decode_config_entry",
    "encode_config_entry",
]


class EntryKind(enum.IntEnum):
    """What a log entry carries."""

    NORMAL = 0  # application command, opaque bytes
    CONFIG = 1  # a whole new Membership, see encode_config_entry
    NOOP = 2  # appended by a new leader to commit earlier terms (thesis §3.6.2)


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry."""

    index: int  # position in the log, >= 1
    term: int  # term of the leader that created it, >= 1
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""  # opaque to Raft for NORMAL entries

    def size(self) -> int:
        """Approximate bytes this entry costs in a message (payload + header)."""
        return len(self.data) + 24


@dataclass(frozen=True, slots=True)
class HardState:
    """State that MUST be durable before any message of the same Ready is sent."""

    term: int = 0  # latest term this server has seen
    vote: str | None = None  # candidate voted for in ``term``, if any
    commit: int = 0  # highest index known committed (may lag after restart)


class ConfChangeOp(enum.Enum):
    """Single-server membership changes (thesis §4.1)."""

    ADD_VOTER = "add_voter"  # a new voting member
    ADD_LEARNER = "add_learner"  # a non-voting member that only receives the log
    PROMOTE = "promote"  # learner becomes voter
    REMOVE = "remove"  # voter or learner leaves


@dataclass(frozen=True, slots=True)
class ConfChange:
    """A request to change membership by exactly one server."""

    op: ConfChangeOp
    node: str  # id of the server being added, promoted or removed


@dataclass(frozen=True, slots=True)
class Membership:
    """A configuration: who votes and who only listens."""

    voters: frozenset[str] = field(default_factory=frozenset)
    learners: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.voters & self.learners:
            both = sorted(self.voters & self.learners)
            raise InvariantViolation(f"raft: nodes both voter and learner: {both}")

    @property
    def members(self) -> frozenset[str]:
        """Every server that receives the log."""
        return self.voters | self.learners

    def apply(self, change: ConfChange) -> Membership:
        """Return the configuration after ``change``.

        Raises:
            InvalidRequest: the change makes no sense for this configuration.
        """
        node, voters, learners = change.node, self.voters, self.learners
        if change.op is ConfChangeOp.ADD_VOTER and node not in voters:
            return Membership(voters | {node}, learners - {node})
        if change.op is ConfChangeOp.ADD_LEARNER and node not in self.members:
            return Membership(voters, learners | {node})
        if change.op is ConfChangeOp.PROMOTE and node in learners:
            return Membership(voters | {node}, learners - {node})
        if change.op is ConfChangeOp.REMOVE and node in self.members:
            if voters == {node}:
                raise InvalidRequest("raft: cannot remove the last voter", "node")
            return Membership(voters - {node}, learners - {node})
        raise InvalidRequest(f"raft: {change.op.value} {node} is a no-op here", "op")


def encode_config_entry(membership: Membership, change: ConfChange | None) -> bytes:
    """Serialize the data of a CONFIG entry (the whole resulting configuration)."""
    doc: dict[str, object] = {
        "voters": sorted(membership.voters),
        "learners": sorted(membership.learners),
    }
    if change is not None:
        doc["change"] = [change.op.value, change.node]
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def decode_config_entry(data: bytes) -> Membership:
    """Parse the data of a CONFIG entry written by ``encode_config_entry``."""
    try:
        doc = json.loads(data)
        voters, learners = doc["voters"], doc["learners"]
        if not all(isinstance(n, str) for n in [*voters, *learners]):
            raise TypeError("node ids must be strings")
    except (ValueError, KeyError, TypeError) as exc:
        raise InvariantViolation(f"raft: malformed config entry {data!r}") from exc
    return Membership(frozenset(voters), frozenset(learners))


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """Where a snapshot sits in the log and the configuration in force there."""

    index: int  # last log index the snapshot covers
    term: int  # term of that entry
    membership: Membership  # configuration as of ``index`` (thesis §5.1)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Application state as of ``meta.index``; ``data`` is opaque to Raft."""

    meta: SnapshotMeta
    data: bytes
