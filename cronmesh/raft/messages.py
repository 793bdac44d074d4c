"""Messages exchanged between Raft servers, and their wire codec.

Every message names its sender (``frm``), its receiver (``to``) and the term
of the sender when it was made (thesis §3.3: a server that sees a higher term
adopts it; a message with a lower term is stale).  Heartbeats are
AppendEntries without entries.  ReadIndex/ReadIndexResp are the exception to
the term rule: they never change a term (see RaftNode.step).

Wire format (``encode``/``decode``), version 1::

    magic b"RF" | version u8 | type u8 | UTF-8 JSON array of the fields in
    declaration order; bytes as base64 text, entries as [index, term, kind,
    base64 data], node-id tuples as JSON arrays.

It is self-describing enough to reject garbage (``DecodeError``) and never
executes anything it reads (no pickle).  A new field means a new version.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, fields
from typing import Any

from cronmesh.raft.errors import DecodeError
from cronmesh.raft.types import Entry, EntryKind

__all__ = [
    "WIRE_VERSION",
    "AppendEntries",
    "AppendEntriesResp",
    "InstallSnapshot",
    "InstallSnapshotResp",
    "Message",
    "ReadIndex",
    "ReadIndexResp",
    "RequestVote",
    "RequestVoteResp",
    "TimeoutNow",
    "decode",
    "encode",
]

WIRE_VERSION = 1
_HEADER = struct.Struct(">2sBB")
_MAGIC = b"RF"


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Fields every message carries."""

    to: str  # receiving server id
    frm: str  # sending server id
    term: int  # sender's current term (>= 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendEntries(Message):
    """Leader → follower: replicate entries, or a heartbeat when empty (§3.5)."""

    prev_index: int  # index of the entry just before ``entries``
    prev_term: int  # term of that entry (0 for index 0)
    entries: tuple[Entry, ...] = ()  # consecutive, starting at prev_index + 1
    commit: int = 0  # leader's commit index
    seq: int = 0  # leader's read-round counter, echoed back (read-index, §6.4)


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendEntriesResp(Message):
    """Follower → leader: outcome of one AppendEntries or a finished snapshot."""

    success: bool
    match_index: int = 0  # on success: last index known to match the leader
    reject_index: int = 0  # on failure: the prev_index that did not match
    conflict_term: int = 0  # on failure: term at reject_index here, 0 if none
    conflict_index: int = 0  # on failure: first index worth retrying from (§5.3)
    seq: int = 0  # ``seq`` of the request being answered


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestVote(Message):
    """Candidate → voter: ask for a (pre-)vote (§3.4, pre-vote §9.6).

    For a pre-vote ``term`` is the term the candidate *would* use; nobody
    adopts it.
    """

    last_index: int  # index of the candidate's last entry
    last_term: int  # term of the candidate's last entry
    pre_vote: bool = False
    transfer: bool = False  # sent on TimeoutNow: bypasses the leader lease (§3.10)


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestVoteResp(Message):
    """Voter → candidate: whether the (pre-)vote is granted."""

    granted: bool
    pre_vote: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallSnapshot(Message):
    """Leader → follower: one chunk of a snapshot (§5.3)."""

    snap_index: int  # last index the snapshot covers
    snap_term: int  # term of that entry
    voters: tuple[str, ...]  # configuration as of snap_index
    learners: tuple[str, ...]
    offset: int  # byte offset of ``data`` in the snapshot
    data: bytes  # this chunk
    done: bool  # True on the last chunk


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallSnapshotResp(Message):
    """Follower → leader: bytes of the snapshot received so far (not done yet)."""

    snap_index: int  # which snapshot this is about
    next_offset: int  # the offset the follower expects next


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutNow(Message):
    """Leader → transfer target: start an election right away (§3.10)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadIndex(Message):
    """Follower → leader: ask for a read index on behalf of a client (§6.4)."""

    ctx: bytes  # request id chosen by the application, echoed back


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadIndexResp(Message):
    """Leader → follower: the index to wait for, or a refusal."""

    ctx: bytes
    index: int = 0  # serve once the state machine has applied this index
    ok: bool = True  # False: the leader could not confirm; retry elsewhere


_TYPES: tuple[type[Message], ...] = (
    AppendEntries,
    AppendEntriesResp,
    RequestVote,
    RequestVoteResp,
    InstallSnapshot,
    InstallSnapshotResp,
    TimeoutNow,
    ReadIndex,
    ReadIndexResp,
)
_CODES = {cls: code for code, cls in enumerate(_TYPES, start=1)}
# Per class: (field name, annotation text) in declaration order.
_FIELDS = {cls: [(f.name, str(f.type)) for f in fields(cls)] for cls in _TYPES}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise DecodeError("raft: expected base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise DecodeError("raft: bad base64") from exc


def _to_wire(kind: str, value: Any) -> Any:
    if kind == "bytes":
        return _b64(value)
    if kind == "tuple[Entry, ...]":
        return [[e.index, e.term, int(e.kind), _b64(e.data)] for e in value]
    if kind == "tuple[str, ...]":
        return list(value)
    return value


def _int(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise DecodeError(f"raft: expected a non-negative int, got {value!r}")
    return value


def _entry(raw: Any) -> Entry:
    if not isinstance(raw, list) or len(raw) != 4:
        raise DecodeError("raft: malformed entry")
    try:
        kind = EntryKind(_int(raw[2]))
    except ValueError as exc:
        raise DecodeError(f"raft: unknown entry kind {raw[2]!r}") from exc
    return Entry(_int(raw[0]), _int(raw[1]), kind, _unb64(raw[3]))


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise DecodeError(f"raft: expected a string, got {value!r}")
    return value


def _from_wire(kind: str, value: Any) -> Any:
    if kind == "int":
        return _int(value)
    if kind == "bool":
        if type(value) is not bool:
            raise DecodeError(f"raft: expected a bool, got {value!r}")
        return value
    if kind == "str":
        return _str(value)
    if kind == "bytes":
        return _unb64(value)
    if not isinstance(value, list):
        raise DecodeError(f"raft: expected a list for {kind}")
    if kind == "tuple[Entry, ...]":
        return tuple(_entry(item) for item in value)
    if kind == "tuple[str, ...]":
        return tuple(_str(item) for item in value)
    raise DecodeError(f"raft: no decoder for {kind}")  # pragma: no cover


def encode(msg: Message) -> bytes:
    """Serialize ``msg`` for the transport (see the module docstring)."""
    # Limitation: JSON with base64 payloads makes entries about a third
    # larger on the wire; a binary body would need a new wire version.
    cls = type(msg)
    body = [_to_wire(kind, getattr(msg, name)) for name, kind in _FIELDS[cls]]
    head = _HEADER.pack(_MAGIC, WIRE_VERSION, _CODES[cls])
    return head + json.dumps(body, separators=(",", ":")).encode()


def decode(data: bytes) -> Message:
    """Parse bytes made by ``encode``.

    Raises:
        DecodeError: wrong magic, unknown version or type, or malformed fields.
    """
    if len(data) < _HEADER.size:
        raise DecodeError("raft: message too short")
    magic, version, code = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != WIRE_VERSION:
        raise DecodeError(f"raft: bad header magic={magic!r} version={version}")
    if not 1 <= code <= len(_TYPES):
        raise DecodeError(f"raft: unknown message type {code}")
    cls = _TYPES[code - 1]
    try:
        body = json.loads(data[_HEADER.size :])
    except ValueError as exc:
        raise DecodeError("raft: body is not JSON") from exc
    spec = _FIELDS[cls]
    if not isinstance(body, list) or len(body) != len(spec):
        raise DecodeError(f"raft: {cls.__name__} needs {len(spec)} fields")
    values = {
        name: _from_wire(kind, v) for (name, kind), v in zip(spec, body, strict=True)
    }
    return cls(**values)
