"""Messages exchanged between Raft servers, and their wire codec.

Every message names its sender (``frm``), its receiver (``to``) and the term
of the sender when it was made (thesis §3.3: a server that sees a higher term
adopts it; a message with a lower term is stale).  Heartbeats are
AppendEntries without entries.  ReadIndex/ReadIndexResp are the exception to
the term rule: they never change a term (see RaftNode.step).

Wire format (``encode``/``decode``): ``magic b"RF" | version u8 | type u8 |
body``, the body holding the fields in declaration order.

- Version 2 (binary, what ``encode`` writes by default): ints are u64 and
  bools u8 (0 or 1), big-endian; runs of consecutive int/bool fields are
  one ``struct`` each; a str is u16 length + UTF-8, bytes u32 length + the
  bytes as they are, a tuple of str u16 count + strs, entries u32 count +
  per entry index u64 | term u64 | kind u8 | u32 length | data.
- Version 1 (the first): a UTF-8 JSON array; bytes as base64 text, entries
  as [index, term, kind, base64 data], node-id tuples as JSON arrays.
  ``decode`` still reads it, and ``encode(msg, 1)`` writes it for a peer
  that has not said it reads version 2 (see the transport).

Version 2 costs a fraction of version 1 per message (no JSON, no base64:
entry data is copied as it is).  Both are self-describing enough to reject
garbage (``DecodeError``, a ``RemoteError``: bytes from a peer), and
neither executes anything it reads (no pickle).  A new field means a new
version.
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
    "WIRE_VERSIONS",
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

WIRE_VERSION = 2  # what encode writes unless told otherwise
WIRE_VERSIONS = (1, 2)  # what decode reads
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


def _encode_v1(msg: Message) -> bytes:
    cls = type(msg)
    body = [_to_wire(kind, getattr(msg, name)) for name, kind in _FIELDS[cls]]
    head = _HEADER.pack(_MAGIC, 1, _CODES[cls])
    return head + json.dumps(body, separators=(",", ":")).encode()


def _decode_v1(cls: type[Message], body_bytes: bytes) -> Message:
    try:
        body = json.loads(body_bytes)
    except ValueError as exc:
        raise DecodeError("raft: body is not JSON") from exc
    spec = _FIELDS[cls]
    if not isinstance(body, list) or len(body) != len(spec):
        raise DecodeError(f"raft: {cls.__name__} needs {len(spec)} fields")
    values = {
        name: _from_wire(kind, v) for (name, kind), v in zip(spec, body, strict=True)
    }
    return cls(**values)


# -- version 2: per class, the fields as a list of segments, each one of
# ("fixed", struct, names, bool names) for a run of ints and bools, or
# ("str" | "bytes" | "strs" | "entries", name).
_Segment = tuple[Any, ...]
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_ENTRY = struct.Struct(">QQBI")  # index, term, kind, len(data)


def _segments(cls: type[Message]) -> list[_Segment]:
    out: list[_Segment] = []
    run: list[tuple[str, str]] = []

    def close_run() -> None:
        if run:
            fmt = ">" + "".join("Q" if kind == "int" else "B" for _, kind in run)
            bools = frozenset(name for name, kind in run if kind == "bool")
            out.append(("fixed", struct.Struct(fmt), [n for n, _ in run], bools))
            run.clear()

    named = {"str": "str", "bytes": "bytes", "tuple[str, ...]": "strs"}
    for name, kind in _FIELDS[cls]:
        if kind in ("int", "bool"):
            run.append((name, kind))
            continue
        close_run()
        if kind == "tuple[Entry, ...]":
            out.append(("entries", name))
        else:
            out.append((named[kind], name))
    close_run()
    return out


_SEGMENTS = {cls: _segments(cls) for cls in _TYPES}


def _put_str(parts: list[bytes], text: str) -> None:
    raw = text.encode()
    parts.append(_U16.pack(len(raw)))
    parts.append(raw)


def _encode_v2(msg: Message) -> bytes:
    # Limitation: a node id over 65,535 bytes of UTF-8, or a negative int
    # (neither is made by the core), cannot be encoded (ValueError).
    try:
        return _pack_v2(msg)
    except struct.error as exc:
        raise ValueError(f"raft: cannot encode {msg!r:.200}: {exc}") from exc


def _pack_v2(msg: Message) -> bytes:
    cls = type(msg)
    parts = [_HEADER.pack(_MAGIC, 2, _CODES[cls])]
    for seg in _SEGMENTS[cls]:
        what = seg[0]
        if what == "fixed":
            parts.append(seg[1].pack(*[getattr(msg, name) for name in seg[2]]))
        elif what == "str":
            _put_str(parts, getattr(msg, seg[1]))
        elif what == "bytes":
            data = getattr(msg, seg[1])
            parts.append(_U32.pack(len(data)))
            parts.append(data)
        elif what == "strs":
            items = getattr(msg, seg[1])
            parts.append(_U16.pack(len(items)))
            for item in items:
                _put_str(parts, item)
        else:
            entries = getattr(msg, seg[1])
            parts.append(_U32.pack(len(entries)))
            pack = _ENTRY.pack
            for e in entries:
                parts.append(pack(e.index, e.term, e.kind, len(e.data)))
                parts.append(e.data)
    return b"".join(parts)


_KINDS = {int(kind): kind for kind in EntryKind}


def _decode_v2(cls: type[Message], data: bytes) -> Message:
    try:
        values, pos = _read_v2(cls, data)
    except struct.error as exc:  # unpack_from past the end
        raise DecodeError("raft: message ends too early") from exc
    except UnicodeDecodeError as exc:
        raise DecodeError("raft: a string is not UTF-8") from exc
    if pos != len(data):
        raise DecodeError(f"raft: {cls.__name__} of wrong length")
    return cls(**values)


def _read_v2(cls: type[Message], data: bytes) -> tuple[dict[str, Any], int]:
    """The fields of a version 2 body and where it ended. A short string or
    bytes field reads as far as the data goes; the caller's length check
    catches that."""
    pos = _HEADER.size
    values: dict[str, Any] = {}
    u16, u32 = _U16.unpack_from, _U32.unpack_from
    for seg in _SEGMENTS[cls]:
        what = seg[0]
        if what == "fixed":
            got = seg[1].unpack_from(data, pos)
            pos += seg[1].size
            values.update(zip(seg[2], got, strict=True))
            for name in seg[3]:
                if values[name] > 1:
                    raise DecodeError(f"raft: {name} is not a bool")
                values[name] = values[name] == 1
        elif what == "entries":
            (count,) = u32(data, pos)
            pos += 4
            entries = []
            unpack = _ENTRY.unpack_from
            for _ in range(count):
                index, term, kind, size = unpack(data, pos)
                pos += _ENTRY.size
                entry_kind = _KINDS.get(kind)
                if entry_kind is None:
                    raise DecodeError(f"raft: unknown entry kind {kind}")
                entries.append(Entry(index, term, entry_kind, data[pos : pos + size]))
                pos += size
            values[seg[1]] = tuple(entries)
        elif what == "strs":
            (count,) = u16(data, pos)
            pos += 2
            items = []
            for _ in range(count):
                (size,) = u16(data, pos)
                items.append(data[pos + 2 : pos + 2 + size].decode())
                pos += 2 + size
            values[seg[1]] = tuple(items)
        elif what == "str":
            (size,) = u16(data, pos)
            values[seg[1]] = data[pos + 2 : pos + 2 + size].decode()
            pos += 2 + size
        else:
            (size,) = u32(data, pos)
            values[seg[1]] = data[pos + 4 : pos + 4 + size]
            pos += 4 + size
        if pos > len(data):
            raise DecodeError("raft: message ends too early")
    return values, pos


def encode(msg: Message, version: int = WIRE_VERSION) -> bytes:
    """Serialize ``msg`` for the transport in wire format ``version``
    (see the module docstring)."""
    if version == 2:
        return _encode_v2(msg)
    if version == 1:
        return _encode_v1(msg)
    raise ValueError(f"raft: no wire version {version}")


def decode(data: bytes) -> Message:
    """Parse bytes made by ``encode``, of any version in ``WIRE_VERSIONS``.

    Raises:
        DecodeError: wrong magic, unknown version or type, or malformed fields.
    """
    if len(data) < _HEADER.size:
        raise DecodeError("raft: message too short")
    magic, version, code = _HEADER.unpack_from(data)
    if magic != _MAGIC or version not in WIRE_VERSIONS:
        raise DecodeError(f"raft: bad header magic={magic!r} version={version}")
    if not 1 <= code <= len(_TYPES):
        raise DecodeError(f"raft: unknown message type {code}")
    cls = _TYPES[code - 1]
    if version == 2:
        return _decode_v2(cls, data)
    return _decode_v1(cls, data[_HEADER.size :])
