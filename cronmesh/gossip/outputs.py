"""What the SWIM core hands back: one :class:`Batch` per input.

Theory of operation: the core never performs I/O. Every input method
returns a batch; the driver must, in order, (1) send ``packets`` as UDP
datagrams, (2) start every ``tcp_requests`` entry and later report its
outcome with ``GossipCore.tcp_result`` (``None`` on failure or timeout),
(3) deliver ``events`` to the application, and (4) write ``reply`` back on
the stream when the input was ``receive_stream``. Nothing in a batch needs
acknowledging: the core has already moved on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cronmesh.gossip.messages import MemberState
from cronmesh.gossip.tags import decode_tags

__all__ = [
    "Batch",
    "EventKind",
    "GossipStats",
    "Member",
    "MemberEvent",
    "OutPacket",
    "PingRequest",
    "PushPullRequest",
    "TcpRequest",
]


@dataclass(frozen=True, slots=True)
class Member:
    """A snapshot of one member as the local node sees it."""

    name: str
    host: str
    port: int
    incarnation: int  # u32, bumped only by the member itself
    meta: bytes  # encoded tags
    state: MemberState
    state_change_ms: int  # driver time of the last state change

    @property
    def tags(self) -> dict[str, str]:
        """The member's tags (meta was validated when it arrived)."""
        return decode_tags(self.meta)


class EventKind(enum.StrEnum):
    """Membership changes reported to the application (serf's names)."""

    JOIN = "join"  # new member, or a dead/left member came back
    UPDATE = "update"  # an alive member changed its tags or address
    LEAVE = "leave"  # the member left gracefully
    FAILED = "failed"  # the member was declared dead
    REAP = "reap"  # a dead or left member was forgotten
    # Joining, we found a live member with our name at another address;
    # the event's member is that other claim. Not a serf event.
    CONFLICT = "conflict"


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """One membership change, about another member (never ourselves)."""

    # Limitation: no event for the local member (serf reports its own join);
    # the agent reads ``GossipCore.local_member`` instead.

    kind: EventKind
    member: Member


@dataclass(frozen=True, slots=True)
class OutPacket:
    """A UDP datagram to send, at most ``udp_budget`` bytes."""

    host: str
    port: int
    data: bytes


@dataclass(frozen=True, slots=True)
class PushPullRequest:
    """Open a stream to host:port, send ``payload``, report the reply."""

    request_id: int
    host: str
    port: int
    payload: bytes  # our full state, encoded (and sealed) by the codec
    join: bool  # first contact: the driver's join() waits on these


@dataclass(frozen=True, slots=True)
class PingRequest:
    """TCP fallback probe: send ``payload`` over a stream, report the ack."""

    request_id: int
    host: str
    port: int
    payload: bytes
    deadline_ms: int  # a result after this driver time is ignored


TcpRequest = PushPullRequest | PingRequest


@dataclass(slots=True)
class Batch:
    """Everything one input produced; see the module docstring for order."""

    packets: list[OutPacket] = field(default_factory=list)
    tcp_requests: list[TcpRequest] = field(default_factory=list)
    events: list[MemberEvent] = field(default_factory=list)
    reply: bytes | None = None  # stream reply, only from receive_stream


@dataclass(slots=True)
class GossipStats:
    """Counters since start; the driver exports them as metrics."""

    packets_sent: int = 0
    bytes_sent: int = 0
    packets_received: int = 0
    bytes_received: int = 0
    dropped_packets: int = 0  # undecodable packets/streams, wrong key included
    probes: int = 0
    probes_failed: int = 0
    refutes: int = 0
    suspicions: int = 0
