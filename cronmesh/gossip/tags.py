"""Member tags: a small ``dict[str, str]`` carried as a member's metadata.

Encoding (version 1): one version byte ``0x01``, then for each tag in key
order ``u8 key length, key, u16 value length, value`` (UTF-8, big endian).
An empty dict encodes to ``b""`` so members without tags pay nothing. The
encoded form is capped at :data:`MAX_META_BYTES`, the budget memberlist
gives node metadata, so an alive message always fits one UDP datagram.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from cronmesh.errors import ValidationError

__all__ = ["MAX_META_BYTES", "RESERVED_TAGS", "decode_tags", "encode_tags"]

# Largest encoded tag set, bytes.
MAX_META_BYTES = 512

# Tag names Dkron reserves for itself; the agent refuses them in user tags.
RESERVED_TAGS: tuple[str, ...] = (
    "role",
    "dc",
    "region",
    "server",
    "rpc_addr",
    "port",
    "version",
    "expect",
)

_VERSION = 1
_U16 = struct.Struct(">H")


def encode_tags(tags: Mapping[str, str]) -> bytes:
    """Encode ``tags`` compactly.

    Raises:
        ValidationError: a key or value is not a string, a key is empty or
            over 255 bytes, or the encoded form exceeds 512 bytes.
    """
    if not tags:
        return b""
    parts = [bytes((_VERSION,))]
    for key in sorted(tags):
        value = tags[key]
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValidationError("tag keys and values must be strings", "tags")
        raw_key, raw_value = key.encode(), value.encode()
        if not 0 < len(raw_key) < 256:
            raise ValidationError(f"tag name {key!r} must be 1..255 bytes", "tags")
        parts += [bytes((len(raw_key),)), raw_key, _U16.pack(len(raw_value))]
        parts.append(raw_value)
    encoded = b"".join(parts)
    if len(encoded) > MAX_META_BYTES:
        raise ValidationError(
            f"tags encode to {len(encoded)} bytes, over the {MAX_META_BYTES}-byte"
            " limit of gossip metadata",
            "tags",
        )
    return encoded


def decode_tags(meta: bytes) -> dict[str, str]:
    """Decode metadata made by :func:`encode_tags`.

    Raises:
        ValueError: the bytes are not a valid version-1 tag set (the codec
            turns this into a ``DecodeError`` for data from peers).
    """
    if not meta:
        return {}
    if meta[0] != _VERSION:
        raise ValueError(f"unknown tag encoding version {meta[0]}")
    tags: dict[str, str] = {}
    pos, end = 1, len(meta)
    while pos < end:
        key_len = meta[pos]
        key_end = pos + 1 + key_len
        if key_len == 0 or key_end + 2 > end:
            raise ValueError("truncated tag")
        (value_len,) = _U16.unpack_from(meta, key_end)
        value_end = key_end + 2 + value_len
        if value_end > end:
            raise ValueError("truncated tag value")
        key = meta[pos + 1 : key_end].decode()
        tags[key] = meta[key_end + 2 : value_end].decode()
        pos = value_end
    return tags
