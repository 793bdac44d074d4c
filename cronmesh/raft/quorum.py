"""Majority arithmetic, kept apart so it can be table-tested (thesis §3.4, §3.6).

A configuration of n voters needs n // 2 + 1 of them.  Servers outside the
voter set (learners, a leader being removed) never count.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping

__all__ = ["VoteResult", "committed_index", "quorum_size", "vote_result"]


class VoteResult(enum.Enum):
    """Outcome of an election so far."""

    PENDING = "pending"  # neither a majority for nor a majority against yet
    WON = "won"  # a majority granted
    LOST = "lost"  # a majority can no longer be reached


def quorum_size(voters: Collection[str]) -> int:
    """Smallest number of voters that forms a majority (0 voters: 1, never met)."""
    return len(voters) // 2 + 1


def committed_index(match: Mapping[str, int], voters: Collection[str]) -> int:
    """Highest index stored on a majority of ``voters``.

    Args:
        match: highest index known replicated, per server; a missing voter
            counts as 0.
        voters: the voting members.

    Returns:
        The index, or 0 when there are no voters.
    """
    if not voters:
        return 0
    acked = sorted((match.get(v, 0) for v in voters), reverse=True)
    return acked[quorum_size(voters) - 1]


def vote_result(votes: Mapping[str, bool], voters: Collection[str]) -> VoteResult:
    """Tally ``votes`` (server → granted) over ``voters``; others are ignored."""
    need = quorum_size(voters)
    granted = sum(1 for v in voters if votes.get(v) is True)
    rejected = sum(1 for v in voters if votes.get(v) is False)
    if voters and granted >= need:
        return VoteResult.WON
    if rejected > len(voters) - need or not voters:
        return VoteResult.LOST
    return VoteResult.PENDING
