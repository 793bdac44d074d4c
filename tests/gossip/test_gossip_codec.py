"""Wire codec: round trips, compound packets, encryption, and fuzzing that
proves malformed input only ever raises DecodeError."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cronmesh.errors import RemoteError, ValidationError
from cronmesh.gossip.codec import (
    DecodeError,
    decode_packet,
    decode_stream,
    encode_message,
    encode_packet,
    encode_stream,
    packet_overhead,
)
from cronmesh.gossip.keyring import Keyring, generate_key
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
from cronmesh.gossip.tags import (
    MAX_META_BYTES,
    RESERVED_TAGS,
    decode_tags,
    encode_tags,
)

KEY_A = Keyring([generate_key()])
KEY_B = Keyring([generate_key()])
META = encode_tags({"role": "agent", "dc": "eu-1"})

SAMPLES: list[Message] = [
    Ping(7, "node-b", "node-a", "10.0.0.1", 7946),
    IndirectPing(8, "node-c", "10.0.0.3", 7946, True, "node-a", "10.0.0.1", 7946),
    Ack(0xFFFFFFFF),
    Nack(9),
    Alive(3, "node-a", "fe80::1", 65535, META),
    Suspect(4, "node-b", "node-a"),
    Dead(5, "node-b", "node-b"),
]
PUSH_PULL = PushPull(
    True,
    (
        MemberRecord("a", "10.0.0.1", 7946, 1, MemberState.ALIVE, META),
        MemberRecord("b", "10.0.0.2", 7946, 9, MemberState.LEFT, b""),
    ),
)


@pytest.mark.parametrize("keyring", [None, KEY_A], ids=["plain", "aes-gcm"])
def test_compound_packet_round_trip(keyring: Keyring | None) -> None:
    packet = encode_packet([encode_message(m) for m in SAMPLES], keyring)
    assert decode_packet(packet, keyring) == SAMPLES


@pytest.mark.parametrize("keyring", [None, KEY_A], ids=["plain", "aes-gcm"])
def test_stream_round_trip(keyring: Keyring | None) -> None:
    assert decode_stream(encode_stream(PUSH_PULL, keyring), keyring) == PUSH_PULL
    assert decode_stream(encode_stream(Ack(3), keyring), keyring) == Ack(3)


def test_packet_overhead_is_what_encoding_adds() -> None:
    frame = encode_message(Ack(1))
    for keyring in (None, KEY_A):
        size = len(encode_packet([frame], keyring))
        assert size == len(frame) + packet_overhead(keyring)


def test_push_pull_is_refused_inside_a_datagram() -> None:
    packet = encode_packet([encode_message(PUSH_PULL), encode_message(Ack(1))], None)
    assert decode_packet(packet, None) == [Ack(1)]


@pytest.mark.parametrize(
    ("data", "keyring"),
    [
        (b"", None),
        (b"\x09\x01\x01", None),  # unknown envelope version
        (encode_packet([encode_message(Ack(1))], None), KEY_A),  # plaintext
        (encode_packet([encode_message(Ack(1))], KEY_A), None),  # no keyring
        (encode_packet([encode_message(Ack(1))], KEY_A), KEY_B),  # wrong key
        (encode_packet([encode_message(Ack(1))], None)[:-1], None),  # truncated
        (encode_packet([encode_message(Ack(1))], None) + b"x", None),  # stray
        (encode_stream(Ack(1), None), None),  # stream where packet expected
    ],
    ids=[
        "empty",
        "version",
        "plaintext",
        "no-keyring",
        "wrong-key",
        "truncated",
        "stray",
        "kind",
    ],
)
def test_bad_packets_raise_decode_error(data: bytes, keyring: Keyring | None) -> None:
    with pytest.raises(DecodeError):
        decode_packet(data, keyring)


def test_decode_error_is_a_remote_error() -> None:
    assert issubclass(DecodeError, RemoteError)


def test_unknown_message_type_is_skipped() -> None:
    future = bytes((200, 0, 2)) + b"hi"
    packet = encode_packet([future, encode_message(Nack(4))], None)
    assert decode_packet(packet, None) == [Nack(4)]


# --- fuzzing ------------------------------------------------------------------

_VALID = [
    encode_packet([encode_message(m) for m in SAMPLES], None),
    encode_packet([encode_message(SAMPLES[4])], None),
    encode_stream(PUSH_PULL, None),
]


def _decode_any(data: bytes, keyring: Keyring | None) -> None:
    for decode in (decode_packet, decode_stream):
        try:
            decode(data, keyring)
        except DecodeError:
            pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_any(data, None)
    _decode_any(data, KEY_A)
    _decode_any(b"\x01" + data, None)
    _decode_any(b"\x01\x01" + data, None)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(_VALID),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    st.integers(0, 10_000),
)
def test_fuzz_mutated_valid_packets(
    base: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(base)
    for pos, value in flips:
        data[pos % len(data)] = value
    _decode_any(bytes(data), None)
    _decode_any(bytes(data[: cut % (len(data) + 1)]), None)


_SEALED = [encode_packet([encode_message(m) for m in SAMPLES], KEY_A)]
_SEALED.append(encode_stream(PUSH_PULL, KEY_A))


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(_SEALED),
    st.integers(0, 10_000),
    st.integers(1, 255),
    st.integers(0, 10_000),
)
def test_fuzz_mutated_sealed_packets(base: bytes, pos: int, xor: int, cut: int) -> None:
    data = bytearray(base)
    data[pos % len(data)] ^= xor  # any flipped bit breaks the GCM tag
    with pytest.raises(DecodeError):
        decode_packet(bytes(data), KEY_A)
    with pytest.raises(DecodeError):
        decode_stream(bytes(data), KEY_A)
    _decode_any(bytes(base[: cut % len(base)]), KEY_A)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(SAMPLES), min_size=1, max_size=20), st.booleans())
def test_fuzz_wrong_key(messages: list[Message], truncate: bool) -> None:
    packet = encode_packet([encode_message(m) for m in messages], KEY_A)
    if truncate:
        packet = packet[: len(packet) // 2]
    with pytest.raises(DecodeError):
        decode_packet(packet, KEY_B)
    if not truncate:
        assert decode_packet(packet, KEY_A) == messages


# --- tags ---------------------------------------------------------------------


def test_tags_round_trip_compactly() -> None:
    tags = {"role": "agent", "dc": "dc1", "ünï": "çødé", "empty": ""}
    encoded = encode_tags(tags)
    assert decode_tags(encoded) == tags
    assert encode_tags({}) == b"" and decode_tags(b"") == {}
    assert len(encode_tags({"dc": "dc1"})) == 1 + 1 + 2 + 2 + 3


def test_tags_over_512_bytes_are_refused_with_the_size() -> None:
    with pytest.raises(ValidationError, match=r"encode to 514 bytes, over the 512"):
        encode_tags({"k": "x" * 509})
    assert len(encode_tags({"k": "x" * 507})) == MAX_META_BYTES


def test_reserved_tags_are_dkrons() -> None:
    assert set(RESERVED_TAGS) == {
        "role",
        "dc",
        "region",
        "server",
        "rpc_addr",
        "port",
        "version",
        "expect",
    }
