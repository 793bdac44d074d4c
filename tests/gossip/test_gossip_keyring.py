"""Keyring: key checks, rotation without downtime, atomic persistence."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from cronmesh.errors import StorageError, ValidationError
from cronmesh.gossip.codec import (
    DecodeError,
    decode_packet,
    encode_message,
    encode_packet,
)
from cronmesh.gossip.keyring import KEYRING_FILE, Keyring, decode_key, generate_key
from cronmesh.gossip.messages import Ack


def test_generate_key_is_base64_of_32_bytes() -> None:
    key = generate_key()
    assert len(base64.b64decode(key)) == 32
    assert key != generate_key()


@pytest.mark.parametrize("size", [16, 24, 32])
def test_aes_key_sizes_accepted(size: int) -> None:
    raw = bytes(range(size))
    assert decode_key(base64.b64encode(raw).decode()) == raw


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("not base64!", "not valid base64"),
        (base64.b64encode(b"x" * 20).decode(), "20 bytes"),
        ("", "0 bytes"),
    ],
)
def test_bad_keys_rejected(key: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        decode_key(key)


def test_rotation_without_downtime() -> None:
    old, new = generate_key(), generate_key()
    sender, receiver = Keyring([old]), Keyring([old])
    frame = [encode_message(Ack(1))]
    # 1. install the new key everywhere: old traffic still flows
    receiver.install(new)
    sender.install(new)
    assert decode_packet(encode_packet(frame, sender), receiver) == [Ack(1)]
    # 2. the sender switches first; the receiver decrypts with its 2nd key
    sender.use(new)
    assert decode_packet(encode_packet(frame, sender), receiver) == [Ack(1)]
    # 3. everyone uses the new key and drops the old one
    receiver.use(new)
    receiver.remove(old)
    assert decode_packet(encode_packet(frame, sender), receiver) == [Ack(1)]
    stale = Keyring([old])
    with pytest.raises(DecodeError):
        decode_packet(encode_packet(frame, stale), receiver)


def test_primary_key_rules() -> None:
    a, b = generate_key(), generate_key()
    ring = Keyring([a, b], primary=b)
    assert ring.primary_key == decode_key(b)
    assert ring.keys == [decode_key(b), decode_key(a)]
    with pytest.raises(ValidationError, match="primary"):
        ring.remove(b)
    with pytest.raises(ValidationError, match="install"):
        ring.use(generate_key())
    with pytest.raises(ValidationError, match="not installed"):
        ring.remove(generate_key())
    with pytest.raises(ValidationError, match="at least one"):
        Keyring([])


def test_save_and_load(tmp_path: Path) -> None:
    a, b = generate_key(), generate_key()
    ring = Keyring([a, b], primary=b)
    path = ring.save(tmp_path)
    assert path == tmp_path / KEYRING_FILE
    assert json.loads(path.read_text()) == [b, a]  # primary first, like serf
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEYRING_FILE]
    loaded = Keyring.load(tmp_path)
    assert loaded.keys == ring.keys and loaded.primary_key == ring.primary_key
    ring.remove(a)
    ring.save(tmp_path)  # overwrite in place
    assert Keyring.load(tmp_path).keys == [decode_key(b)]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        Keyring.load(tmp_path)
    (tmp_path / KEYRING_FILE).write_text("{not json")
    with pytest.raises(ValidationError, match="not JSON"):
        Keyring.load(tmp_path)
    (tmp_path / KEYRING_FILE).write_text('{"a": 1}')
    with pytest.raises(ValidationError, match="list"):
        Keyring.load(tmp_path)


def test_save_to_missing_directory_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        Keyring([generate_key()]).save(tmp_path / "missing")
