"""Binary wire format of gossip packets and streams, with optional AES-GCM.

Layout, version 1 (all integers big endian)::

    envelope  = 0x01 frame                  plaintext
              | 0x02 nonce(12) sealed(frame) tag(16)   AES-GCM, AAD = 0x02
    frame     = kind:u8 count:u8 message{count}
    message   = type:u8 length:(u16 in packets | u32 in streams) body

A packet (``kind`` 1) is one UDP datagram holding up to 255 messages (the
"compound" message of memberlist), built to fit ``udp_budget`` bytes; a
stream (``kind`` 2) carries exactly one message over TCP and may be large
(push-pull state). Strings are ``u8 length + UTF-8``; meta is ``u16 length
+ bytes``. A body may be longer than the fields this version reads (later
versions append fields); a message type we do not know is skipped.

When a keyring is configured every inbound envelope must be encrypted, and
plaintext is refused. Every malformed input raises :class:`DecodeError`, and
nothing else: callers count it and carry on.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

from cronmesh.errors import ValidationError
from cronmesh.gossip.keyring import NONCE_SIZE, TAG_SIZE, DecodeError, Keyring
from cronmesh.gossip.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    MemberRecord,
    MemberState,
    Message,
    Nack,
    Ping,
    PushPull,
    Suspect,
)
from cronmesh.gossip.tags import MAX_META_BYTES, decode_tags

__all__ = [
    "MAX_MESSAGES_PER_PACKET",
    "DecodeError",
    "decode_packet",
    "decode_stream",
    "encode_message",
    "encode_packet",
    "encode_stream",
    "packet_overhead",
]

MAX_MESSAGES_PER_PACKET = 255
# Limitation: the envelope version is the only version on the wire; there
# is no per-member protocol range as memberlist has, so a v2 must stay
# decodable by v1 (append fields, new message types) or need a full restart.
_PLAIN, _SEALED = 0x01, 0x02
_KIND_PACKET, _KIND_STREAM = 1, 2
_SEALED_AAD = bytes((_SEALED,))
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_HEAD16 = struct.Struct(">BH")
_HEAD32 = struct.Struct(">BI")

# Message type codes on the wire (never renumber).
_T_PING, _T_INDIRECT, _T_ACK, _T_NACK = 1, 2, 3, 4
_T_ALIVE, _T_SUSPECT, _T_DEAD, _T_PUSH_PULL = 5, 6, 7, 8


# --- encoding -------------------------------------------------------------


def _text(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValidationError(f"{value[:20]!r}... is over 255 bytes", "name")
    return bytes((len(raw),)) + raw


def _blob(value: bytes) -> bytes:
    return _U16.pack(len(value)) + value


def _write_ping(msg: Ping) -> bytes:
    return b"".join(
        (
            _U32.pack(msg.seq),
            _text(msg.target),
            _text(msg.source),
            _text(msg.host),
            _U16.pack(msg.port),
        )
    )


def _write_indirect(msg: IndirectPing) -> bytes:
    return b"".join(
        (
            _U32.pack(msg.seq),
            _text(msg.target),
            _text(msg.target_host),
            _U16.pack(msg.target_port),
            bytes((int(msg.nack),)),
            _text(msg.source),
            _text(msg.host),
            _U16.pack(msg.port),
        )
    )


def _write_seq(msg: Ack | Nack) -> bytes:
    return _U32.pack(msg.seq)


def _write_alive(msg: Alive) -> bytes:
    return b"".join(
        (
            _U32.pack(msg.incarnation),
            _text(msg.node),
            _text(msg.host),
            _U16.pack(msg.port),
            _blob(msg.meta),
        )
    )


def _write_accusation(msg: Suspect | Dead) -> bytes:
    return _U32.pack(msg.incarnation) + _text(msg.node) + _text(msg.sender)


def _write_push_pull(msg: PushPull) -> bytes:
    parts = [bytes((int(msg.join),)), _U32.pack(len(msg.members))]
    parts += [_record(rec) for rec in msg.members]
    return b"".join(parts)


_WRITERS: dict[type, tuple[int, Callable[[Any], bytes]]] = {
    Ping: (_T_PING, _write_ping),
    IndirectPing: (_T_INDIRECT, _write_indirect),
    Ack: (_T_ACK, _write_seq),
    Nack: (_T_NACK, _write_seq),
    Alive: (_T_ALIVE, _write_alive),
    Suspect: (_T_SUSPECT, _write_accusation),
    Dead: (_T_DEAD, _write_accusation),
    PushPull: (_T_PUSH_PULL, _write_push_pull),
}


def _body(msg: Message) -> tuple[int, bytes]:
    """Return (type code, body bytes) for one message."""
    try:
        code, write = _WRITERS[type(msg)]
    except KeyError:
        raise TypeError(f"not a gossip message: {msg!r}") from None
    return code, write(msg)


def _record(rec: MemberRecord) -> bytes:
    return b"".join(
        (
            _text(rec.name),
            _text(rec.host),
            _U16.pack(rec.port),
            _U32.pack(rec.incarnation),
            bytes((int(rec.state),)),
            _blob(rec.meta),
        )
    )


def encode_message(msg: Message) -> bytes:
    """Frame one message for a packet (type, u16 length, body)."""
    code, body = _body(msg)
    return _HEAD16.pack(code, len(body)) + body


def packet_overhead(keyring: Keyring | None) -> int:
    """Bytes a packet adds around its framed messages."""
    sealed = NONCE_SIZE + TAG_SIZE if keyring is not None else 0
    return 3 + sealed


def _seal(frame: bytes, keyring: Keyring | None) -> bytes:
    if keyring is None:
        return bytes((_PLAIN,)) + frame
    return _SEALED_AAD + keyring.encrypt(frame, _SEALED_AAD)


def encode_packet(frames: Sequence[bytes], keyring: Keyring | None) -> bytes:
    """Build one datagram from framed messages (see :func:`encode_message`).

    Raises:
        ValueError: no frames, or more than 255 of them.
    """
    if not 0 < len(frames) <= MAX_MESSAGES_PER_PACKET:
        raise ValueError(f"a packet holds 1..255 messages, not {len(frames)}")
    head = bytes((_KIND_PACKET, len(frames)))
    return _seal(head + b"".join(frames), keyring)


def encode_stream(msg: Message, keyring: Keyring | None) -> bytes:
    """Build the payload of one stream exchange (a single message)."""
    code, body = _body(msg)
    head = bytes((_KIND_STREAM, 1)) + _HEAD32.pack(code, len(body))
    return _seal(head + body, keyring)


# --- decoding -------------------------------------------------------------


class _Reader:
    """Bounds-checked cursor; every overrun raises DecodeError."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def take(self, n: int) -> bytes:
        start = self.pos
        if start + n > self.end:
            raise DecodeError(f"truncated: need {n} bytes at offset {start}")
        self.pos = start + n
        return self.buf[start : start + n]

    def u8(self) -> int:
        pos = self.pos
        if pos >= self.end:
            raise DecodeError(f"truncated: need 1 byte at offset {pos}")
        self.pos = pos + 1
        return self.buf[pos]

    def u16(self) -> int:
        pos, buf = self.pos, self.buf
        if pos + 2 > self.end:
            raise DecodeError(f"truncated: need 2 bytes at offset {pos}")
        self.pos = pos + 2
        return (buf[pos] << 8) | buf[pos + 1]

    def u32(self) -> int:
        pos = self.pos
        if pos + 4 > self.end:
            raise DecodeError(f"truncated: need 4 bytes at offset {pos}")
        self.pos = pos + 4
        return int(_U32.unpack_from(self.buf, pos)[0])

    def text(self) -> str:
        pos, buf = self.pos, self.buf
        if pos >= self.end:
            raise DecodeError(f"truncated: need 1 byte at offset {pos}")
        end = pos + 1 + buf[pos]
        if end > self.end:
            raise DecodeError(f"truncated string at offset {pos}")
        self.pos = end
        try:
            return buf[pos + 1 : end].decode()
        except UnicodeDecodeError as exc:
            raise DecodeError("string is not UTF-8") from exc

    def meta(self) -> bytes:
        meta = self.take(self.u16())
        if not meta:
            return meta
        if len(meta) > MAX_META_BYTES:
            raise DecodeError(f"meta of {len(meta)} bytes is over {MAX_META_BYTES}")
        try:
            decode_tags(meta)
        except ValueError as exc:
            raise DecodeError(f"bad tags in meta: {exc}") from exc
        return meta


def _read_ping(r: _Reader) -> Message:
    return Ping(r.u32(), r.text(), r.text(), r.text(), r.u16())


def _read_indirect(r: _Reader) -> Message:
    seq, target, target_host, target_port = r.u32(), r.text(), r.text(), r.u16()
    nack = r.u8() != 0
    return IndirectPing(seq, target, target_host, target_port, nack, *_src(r))


def _src(r: _Reader) -> tuple[str, str, int]:
    return r.text(), r.text(), r.u16()


def _read_ack(r: _Reader) -> Message:
    return Ack(r.u32())


def _read_nack(r: _Reader) -> Message:
    return Nack(r.u32())


def _read_alive(r: _Reader) -> Message:
    return Alive(r.u32(), r.text(), r.text(), r.u16(), r.meta())


def _read_suspect(r: _Reader) -> Message:
    return Suspect(r.u32(), r.text(), r.text())


def _read_dead(r: _Reader) -> Message:
    return Dead(r.u32(), r.text(), r.text())


def _read_push_pull(r: _Reader) -> Message:
    join = r.u8() != 0
    count = r.u32()
    if count > r.end - r.pos:
        raise DecodeError(f"push-pull claims {count} members in too few bytes")
    return PushPull(join, tuple(_read_record(r) for _ in range(count)))


def _read_record(r: _Reader) -> MemberRecord:
    name, host, port, inc = r.text(), r.text(), r.u16(), r.u32()
    raw_state = r.u8()
    if raw_state > MemberState.LEFT:
        raise DecodeError(f"unknown member state {raw_state}")
    return MemberRecord(name, host, port, inc, MemberState(raw_state), r.meta())


_READERS: dict[int, Callable[[_Reader], Message]] = {
    _T_PING: _read_ping,
    _T_INDIRECT: _read_indirect,
    _T_ACK: _read_ack,
    _T_NACK: _read_nack,
    _T_ALIVE: _read_alive,
    _T_SUSPECT: _read_suspect,
    _T_DEAD: _read_dead,
    _T_PUSH_PULL: _read_push_pull,
}


def _open(data: bytes, keyring: Keyring | None) -> bytes:
    """Strip the envelope; return the frame."""
    # Limitation: no replay protection; a captured sealed packet decrypts
    # again later (incarnation ordering makes replayed claims mostly stale).
    # Limitation: no plaintext grace mode, so turning encryption on in a
    # running cluster needs every member restarted with the key at once.
    if not data:
        raise DecodeError("empty payload")
    if data[0] == _PLAIN:
        if keyring is not None:
            raise DecodeError("plaintext payload while encryption is on")
        return data[1:]
    if data[0] == _SEALED:
        if keyring is None:
            raise DecodeError("encrypted payload but no keyring is configured")
        return keyring.decrypt(data[1:], _SEALED_AAD)
    raise DecodeError(f"unknown envelope version {data[0]}")


def _read_frame(frame: bytes, kind: int) -> list[Message]:
    r = _Reader(frame)
    if r.u8() != kind:
        raise DecodeError(f"frame kind {frame[0]} where {kind} was expected")
    count = r.u8()
    messages: list[Message] = []
    frame_end = r.end
    for _ in range(count):
        code = r.u8()
        length = r.u16() if kind == _KIND_PACKET else r.u32()
        end = r.pos + length
        if end > frame_end:
            raise DecodeError(f"message of {length} bytes overruns the frame")
        reader = _READERS.get(code)
        if reader is not None and not (kind == _KIND_PACKET and code == _T_PUSH_PULL):
            # Read the body with the cursor fenced at the message's end.
            r.end = end
            messages.append(reader(r))
            r.end = frame_end
        r.pos = end
    if r.pos != frame_end:
        raise DecodeError(f"{r.end - r.pos} stray bytes after the last message")
    return messages


def decode_packet(data: bytes, keyring: Keyring | None) -> list[Message]:
    """Decode one datagram into its messages (unknown types skipped).

    Raises:
        DecodeError: truncated, garbage, plaintext while encryption is on,
            or sealed with a key the ring does not hold.
    """
    return _read_frame(_open(bytes(data), keyring), _KIND_PACKET)


# Limitation: a stream is decoded whole; the driver must cap its size
# (a hostile peer could otherwise send a huge push-pull state).
def decode_stream(data: bytes, keyring: Keyring | None) -> Message:
    """Decode a stream payload made by :func:`encode_stream`.

    Raises:
        DecodeError: as :func:`decode_packet`, or no known message inside.
    """
    messages = _read_frame(_open(bytes(data), keyring), _KIND_STREAM)
    if len(messages) != 1:
        raise DecodeError("a stream payload must hold exactly one known message")
    return messages[0]
