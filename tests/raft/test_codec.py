"""encode/decode round trips (hypothesis), in both wire versions, and
rejection of malformed input."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cronmesh.errors import RemoteError
from cronmesh.raft import messages as messages_module
from cronmesh.raft.errors import DecodeError
from cronmesh.raft.messages import (
    AppendEntries,
    AppendEntriesResp,
    InstallSnapshot,
    InstallSnapshotResp,
    Message,
    ReadIndex,
    ReadIndexResp,
    RequestVote,
    RequestVoteResp,
    TimeoutNow,
    decode,
    encode,
)
from cronmesh.raft.types import Entry, EntryKind

ids = st.text(min_size=1, max_size=12)
nat = st.integers(min_value=0, max_value=2**62)
blobs = st.binary(max_size=64)
entries = st.builds(
    Entry, index=nat, term=nat, kind=st.sampled_from(EntryKind), data=blobs
)
common = {"to": ids, "frm": ids, "term": nat}

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        AppendEntries,
        prev_index=nat,
        prev_term=nat,
        entries=st.lists(entries, max_size=4).map(tuple),
        commit=nat,
        seq=nat,
        **common,
    ),
    st.builds(
        AppendEntriesResp,
        success=st.booleans(),
        match_index=nat,
        reject_index=nat,
        conflict_term=nat,
        conflict_index=nat,
        seq=nat,
        **common,
    ),
    st.builds(
        RequestVote,
        last_index=nat,
        last_term=nat,
        pre_vote=st.booleans(),
        transfer=st.booleans(),
        **common,
    ),
    st.builds(RequestVoteResp, granted=st.booleans(), pre_vote=st.booleans(), **common),
    st.builds(
        InstallSnapshot,
        snap_index=nat,
        snap_term=nat,
        voters=st.lists(ids, max_size=5).map(tuple),
        learners=st.lists(ids, max_size=3).map(tuple),
        offset=nat,
        data=blobs,
        done=st.booleans(),
        **common,
    ),
    st.builds(InstallSnapshotResp, snap_index=nat, next_offset=nat, **common),
    st.builds(TimeoutNow, **common),
    st.builds(ReadIndex, ctx=blobs, **common),
    st.builds(ReadIndexResp, ctx=blobs, index=nat, ok=st.booleans(), **common),
)


@given(messages, st.sampled_from([1, 2]))
def test_round_trip(msg: Message, version: int) -> None:
    raw = encode(msg, version)
    assert raw[2] == version
    assert decode(raw) == msg


def test_every_message_type_round_trips_in_version_2() -> None:
    entry = Entry(7, 2, EntryKind.CONFIG, b"\x00\xffraw")
    each: list[Message] = [
        AppendEntries(
            to="b",
            frm="a",
            term=2,
            prev_index=6,
            prev_term=2,
            entries=(entry, Entry(8, 2)),
            commit=5,
            seq=9,
        ),
        AppendEntriesResp(
            to="a",
            frm="b",
            term=2,
            success=False,
            match_index=1,
            reject_index=6,
            conflict_term=1,
            conflict_index=4,
            seq=9,
        ),
        RequestVote(to="b", frm="a", term=3, last_index=8, last_term=2, pre_vote=True),
        RequestVoteResp(to="a", frm="b", term=3, granted=True),
        InstallSnapshot(
            to="b",
            frm="a",
            term=3,
            snap_index=8,
            snap_term=2,
            voters=("a", "b"),
            learners=("ç",),
            offset=10,
            data=b"chunk",
            done=True,
        ),
        InstallSnapshotResp(to="a", frm="b", term=3, snap_index=8, next_offset=15),
        TimeoutNow(to="b", frm="a", term=3),
        ReadIndex(to="a", frm="b", term=3, ctx=b"\x01" * 12),
        ReadIndexResp(to="b", frm="a", term=3, ctx=b"c", index=8, ok=False),
    ]
    kinds = [getattr(messages_module, name) for name in messages_module.__all__]
    assert {type(m) for m in each} == {
        k for k in kinds if isinstance(k, type) and issubclass(k, Message)
    } - {Message}
    for msg in each:
        raw = encode(msg)
        assert raw[:3] == b"RF\x02"
        assert decode(raw) == msg
        assert decode(encode(msg, 1)) == msg
    # Entry data travels as it is, not as base64 text.
    assert b"\x00\xffraw" in encode(each[0])


def test_an_unknown_version_is_not_written() -> None:
    with pytest.raises(ValueError, match="no wire version 3"):
        encode(TimeoutNow(to="a", frm="b", term=1), 3)


@given(st.binary(max_size=80))
def test_garbage_is_rejected_cleanly(data: bytes) -> None:
    try:
        decode(data)
    except DecodeError:
        pass


def _raw(code: int, body: object, version: int = 1) -> bytes:
    return b"RF" + bytes([version, code]) + json.dumps(body).encode()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"RF",
        _raw(1, [], version=3),  # unknown version
        _raw(99, []),  # unknown type
        b"XX\x01\x07[]",  # bad magic
        _raw(7, ["a", "b"]),  # TimeoutNow with a field missing
        _raw(7, ["a", "b", -1]),  # negative term
        _raw(7, ["a", "b", True]),  # bool is not an int
        _raw(7, ["a", 1, 1]),  # frm not a string
        _raw(8, ["a", "b", 1, "not base64!"]),
        _raw(1, ["a", "b", 1, 0, 0, [[1, 1, 9, ""]], 0, 0]),  # unknown entry kind
        _raw(1, ["a", "b", 1, 0, 0, [[1, 1]], 0, 0]),  # short entry
        b"RF\x01\x07{not json",
    ],
)
def test_malformed_is_rejected(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data)


def _v2(code: int, body: bytes) -> bytes:
    return b"RF\x02" + bytes([code]) + body


def _s(text: bytes) -> bytes:
    return struct.pack(">H", len(text)) + text


_TIMEOUT_NOW = _v2(7, _s(b"a") + _s(b"b") + struct.pack(">Q", 3))
_RESP = _v2(4, _s(b"a") + _s(b"b") + struct.pack(">QBB", 3, 1, 0))
_ONE_ENTRY = _s(b"a") + _s(b"b") + struct.pack(">QQQI", 1, 0, 0, 1)


@pytest.mark.parametrize(
    "data",
    [
        _v2(7, b""),  # no fields at all
        _TIMEOUT_NOW[:-1],  # term cut short
        _TIMEOUT_NOW + b"\x00",  # a byte too many
        _v2(7, struct.pack(">H", 5) + b"ab"),  # string longer than the data
        _v2(7, _s(b"\xff\xfe") + _s(b"b") + struct.pack(">Q", 3)),  # not UTF-8
        _RESP[:-2] + b"\x02\x00",  # a bool that is 2
        _v2(1, _ONE_ENTRY + struct.pack(">QQBI", 1, 1, 9, 0) + bytes(16)),  # kind
        _v2(1, _ONE_ENTRY + struct.pack(">QQBI", 1, 1, 0, 50) + b"x" + bytes(16)),
        _v2(1, _s(b"a") + _s(b"b") + struct.pack(">QQQI", 1, 0, 0, 1000)),  # count
        _v2(9, _s(b"a") + _s(b"b") + struct.pack(">Q", 1) + struct.pack(">I", 9)),
    ],
)
def test_malformed_version_2_is_rejected_as_a_remote_error(data: bytes) -> None:
    assert decode(_TIMEOUT_NOW) == TimeoutNow(to="a", frm="b", term=3)
    assert decode(_RESP) == RequestVoteResp(to="a", frm="b", term=3, granted=True)
    with pytest.raises(RemoteError):
        decode(data)


def test_header_is_versioned() -> None:
    msg = TimeoutNow(to="a", frm="b", term=3)
    assert encode(msg)[:4] == b"RF\x02\x07"
    assert encode(msg, 1)[:4] == b"RF\x01\x07"


def test_a_node_id_too_long_for_version_2_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cannot encode TimeoutNow"):
        encode(TimeoutNow(to="a" * 70_000, frm="b", term=1))
