"""Snapshots of the applied state, for Raft log compaction and InstallSnapshot.

A snapshot is every row of the state tables (jobs, runtime, executions,
outputs, running), zlib-compressed. The applied index is not part of the
rows: `load_state` sets it to the snapshot's index in the same transaction
that replaces the tables, so a crash shows the old state or the new one.

    blob  = zlib(version (1) | table count (2) | table*)
    table = name length (1) | name | row count (4) | row*
    row   = key length (4) | key | value length (4) | value
"""

from __future__ import annotations

import struct
import zlib

import lmdb

from cronmesh.errors import RemoteError
from cronmesh.storage.env import DataDir
from cronmesh.storage.state import TABLES, StateView

__all__ = ["dump_state", "load_state"]

VERSION = 1
SNAPSHOT_TABLES = tuple(t for t in TABLES if t != "meta")
_U32 = struct.Struct(">I")


def dump_state(data: DataDir) -> bytes:
    """The applied state as one compressed blob (read in one transaction)."""
    parts = [struct.pack(">BH", VERSION, len(SNAPSHOT_TABLES))]
    with data.env.begin(write=False) as txn:
        for name in SNAPSHOT_TABLES:
            rows = list(txn.cursor(db=data.db(name)))
            parts.append(struct.pack(">B", len(name)) + name.encode())
            parts.append(_U32.pack(len(rows)))
            for key, value in rows:
                parts += [
                    _U32.pack(len(key)),
                    bytes(key),
                    _U32.pack(len(value)),
                    bytes(value),
                ]
    return zlib.compress(b"".join(parts), 1)


def load_state(data: DataDir, blob: bytes, index: int) -> None:
    """Replace the applied state by `blob`, as of log `index`.

    Raises:
        RemoteError: the blob is not a snapshot this version can read;
            nothing was changed.
    """
    tables = _parse(blob)

    def write(txn: lmdb.Transaction) -> None:
        for name in SNAPSHOT_TABLES:
            txn.drop(data.db(name), delete=False)
        for name, rows in tables.items():
            db = data.db(name)
            for key, value in rows:
                txn.put(key, value, db=db)
        StateView(data, txn).set_applied_index(index)

    data.write(write)


def _parse(blob: bytes) -> dict[str, list[tuple[bytes, bytes]]]:
    try:
        raw = zlib.decompress(blob)
        version, count = struct.unpack_from(">BH", raw, 0)
        if version != VERSION:
            raise RemoteError(f"snapshot version {version} is not {VERSION}")
        pos = 3
        tables: dict[str, list[tuple[bytes, bytes]]] = {}
        for _ in range(count):
            size = raw[pos]
            name = raw[pos + 1 : pos + 1 + size].decode()
            pos += 1 + size
            (rows,) = _U32.unpack_from(raw, pos)
            pos += 4
            found = []
            for _ in range(rows):
                (klen,) = _U32.unpack_from(raw, pos)
                key = raw[pos + 4 : pos + 4 + klen]
                pos += 4 + klen
                (vlen,) = _U32.unpack_from(raw, pos)
                value = raw[pos + 4 : pos + 4 + vlen]
                pos += 4 + vlen
                found.append((key, value))
            if name not in SNAPSHOT_TABLES:
                raise RemoteError(f"snapshot has unknown table {name!r}")
            tables[name] = found
    except (zlib.error, struct.error, IndexError, UnicodeDecodeError) as exc:
        raise RemoteError(f"unreadable state snapshot: {exc}") from exc
    return tables
