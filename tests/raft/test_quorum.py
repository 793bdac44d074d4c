"""Table tests for the majority arithmetic (thesis §3.4, §3.6)."""

from __future__ import annotations

import pytest

from cronmesh.raft.quorum import VoteResult, committed_index, quorum_size, vote_result


@pytest.mark.parametrize(
    ("voters", "size"),
    [(0, 1), (1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (7, 4)],
)
def test_quorum_size(voters: int, size: int) -> None:
    assert quorum_size([f"n{i}" for i in range(voters)]) == size


@pytest.mark.parametrize(
    ("match", "voters", "expected"),
    [
        ({}, [], 0),
        ({"a": 5}, ["a"], 5),
        ({"a": 5, "b": 3}, ["a", "b"], 3),
        ({"a": 5, "b": 3, "c": 1}, ["a", "b", "c"], 3),
        ({"a": 5, "b": 5, "c": 1}, ["a", "b", "c"], 5),
        ({"a": 5}, ["a", "b", "c"], 0),  # missing voters count as 0
        ({"a": 9, "b": 7, "c": 4, "d": 2}, ["a", "b", "c", "d"], 4),
        ({"a": 9, "b": 7, "c": 4, "d": 2, "e": 1}, ["a", "b", "c", "d", "e"], 4),
        ({"a": 9, "b": 9, "learner": 9}, ["a", "b", "c"], 9),
        ({"a": 9, "learner": 9}, ["a", "b", "c"], 0),  # learners never count
        ({"leader": 9, "b": 2, "c": 2}, ["b", "c"], 2),  # leader being removed
    ],
)
def test_committed_index(
    match: dict[str, int], voters: list[str], expected: int
) -> None:
    assert committed_index(match, voters) == expected


W, L, P = VoteResult.WON, VoteResult.LOST, VoteResult.PENDING


@pytest.mark.parametrize(
    ("votes", "voters", "expected"),
    [
        ({"a": True}, ["a"], W),
        ({}, ["a"], P),
        ({"a": False}, ["a"], L),
        ({"a": True}, ["a", "b", "c"], P),
        ({"a": True, "b": True}, ["a", "b", "c"], W),
        ({"a": True, "b": False}, ["a", "b", "c"], P),
        ({"a": True, "b": False, "c": False}, ["a", "b", "c"], L),
        ({"a": True, "b": True}, ["a", "b", "c", "d"], P),
        ({"a": True, "b": False, "c": False}, ["a", "b", "c", "d"], L),
        ({"a": True, "x": True, "y": True}, ["a", "b", "c"], P),  # non-voters ignored
        ({}, [], L),
    ],
)
def test_vote_result(
    votes: dict[str, bool], voters: list[str], expected: VoteResult
) -> None:
    assert vote_result(votes, voters) is expected
