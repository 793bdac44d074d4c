"""encode/decode round trips (hypothesis) and rejection of malformed input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


@given(messages)
def test_round_trip(msg: Message) -> None:
    assert decode(encode(msg)) == msg


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
        _raw(1, [], version=2),  # unknown version
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


def test_header_is_versioned() -> None:
    raw = encode(TimeoutNow(to="a", frm="b", term=3))
    assert raw[:4] == b"RF\x01\x07"
