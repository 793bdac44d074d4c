"""SWIM gossip membership with Lifeguard, as a pure core plus wire codec.

The core (:class:`GossipCore`) does no I/O and reads no clock; a driver
feeds it time, packets and stream results and carries out the
:class:`Batch` each input returns. ``sim.py`` is a deterministic simulator
of many cores over a fake network.
"""

from __future__ import annotations

from cronmesh.gossip.codec import (
    decode_packet,
    decode_stream,
    encode_message,
    encode_packet,
    encode_stream,
)
from cronmesh.gossip.config import PROFILES, GossipConfig, profile
from cronmesh.gossip.core import GossipCore
from cronmesh.gossip.keyring import DecodeError, Keyring, decode_key, generate_key
from cronmesh.gossip.messages import MemberState
from cronmesh.gossip.outputs import (
    Batch,
    EventKind,
    GossipStats,
    Member,
    MemberEvent,
    OutPacket,
    PingRequest,
    PushPullRequest,
    TcpRequest,
)
from cronmesh.gossip.suspicion import (
    expected_confirmations,
    remaining_suspicion_ms,
    suspicion_timeout_ms,
)
from cronmesh.gossip.tags import MAX_META_BYTES, RESERVED_TAGS, decode_tags, encode_tags

__all__ = [
    "MAX_META_BYTES",
    "PROFILES",
    "RESERVED_TAGS",
    "Batch",
    "DecodeError",
    "EventKind",
    "GossipConfig",
    "GossipCore",
    "GossipStats",
    "Keyring",
    "Member",
    "MemberEvent",
    "MemberState",
    "OutPacket",
    "PingRequest",
    "PushPullRequest",
    "TcpRequest",
    "decode_key",
    "decode_packet",
    "decode_stream",
    "decode_tags",
    "encode_message",
    "encode_packet",
    "encode_stream",
    "encode_tags",
    "expected_confirmations",
    "generate_key",
    "profile",
    "remaining_suspicion_ms",
    "suspicion_timeout_ms",
]
