"""The messages members exchange, as plain immutable values.

Theory of operation (SWIM sections 3 and 4): failure detection uses
``Ping``/``Ack`` and, when a direct ack is missed, ``IndirectPing`` sent to k
other members, who ping the target and forward its ``Ack`` (or send a
``Nack``, Lifeguard IV.A, so the prober can tell its own health from the
target's). Membership changes travel as ``Alive``/``Suspect``/``Dead``
messages piggy-backed on other traffic (SWIM 4.1, infection-style
dissemination); ``Dead`` whose sender is the node itself means it left.
``PushPull`` is the full-state exchange done over a stream. The codec turns
these into bytes; the core only ever sees these values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "Ack",
    "Alive",
    "Dead",
    "IndirectPing",
    "MemberRecord",
    "MemberState",
    "Message",
    "Nack",
    "Ping",
    "PushPull",
    "Suspect",
]


class MemberState(enum.IntEnum):
    """What a member believes about another member (wire values fixed)."""

    ALIVE = 0  # answering probes, or not yet suspected
    SUSPECT = 1  # missed a probe; dies when the suspicion timer fires
    DEAD = 2  # failed: declared dead after suspicion, kept until reaped
    LEFT = 3  # left gracefully, kept until reaped


@dataclass(frozen=True, slots=True)
class Ping:
    """Direct probe; ``target`` guards against a reused address."""

    seq: int  # prober's sequence number, u32
    target: str  # name of the member meant to answer
    source: str  # prober's name
    host: str  # where to send the ack
    port: int


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """Ask the receiver to probe ``target`` and forward the ack to us."""

    seq: int  # the requester's sequence number, echoed in Ack/Nack
    target: str
    target_host: str
    target_port: int
    nack: bool  # requester wants a Nack if the target stays silent
    source: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to a Ping, or forwarded answer to an IndirectPing."""

    seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    """An indirect prober could not reach the target in time."""

    seq: int


@dataclass(frozen=True, slots=True)
class Alive:
    """``node`` is alive at ``incarnation``, with this address and meta."""

    incarnation: int  # u32
    node: str
    host: str
    port: int
    meta: bytes  # encoded tags, at most 512 bytes


@dataclass(frozen=True, slots=True)
class Suspect:
    """``sender`` suspects ``node`` at ``incarnation``."""

    incarnation: int
    node: str
    sender: str


@dataclass(frozen=True, slots=True)
class Dead:
    """``sender`` declares ``node`` dead; sender == node means it left."""

    incarnation: int
    node: str
    sender: str


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """One member's entry in a push-pull state exchange."""

    name: str
    host: str
    port: int
    incarnation: int
    state: MemberState
    meta: bytes


@dataclass(frozen=True, slots=True)
class PushPull:
    """A member's full view, sent over a stream; ``join`` on first contact."""

    join: bool
    members: tuple[MemberRecord, ...]


Message = Ping | IndirectPing | Ack | Nack | Alive | Suspect | Dead | PushPull
