"""Table tests for the pure formulas: suspicion timeout, k, retransmits,
awareness. Expected values are worked out by hand from memberlist's
formulas (util.go ``suspicionTimeout``/``retransmitLimit``, suspicion.go
``remainingSuspicionTime``)."""

from __future__ import annotations

import pytest

from cronmesh.gossip.awareness import Awareness
from cronmesh.gossip.broadcast import BroadcastQueue, retransmit_limit
from cronmesh.gossip.core import _push_pull_scale
from cronmesh.gossip.suspicion import (
    Suspicion,
    expected_confirmations,
    remaining_suspicion_ms,
    suspicion_timeout_ms,
)


@pytest.mark.parametrize(
    ("mult", "n", "interval_ms", "expected_ms"),
    [
        (1, 0, 1_000, 1_000),  # log10(max(1, 0)) = 0, floored to 1
        (1, 5, 1_000, 1_000),  # log10 5 = 0.699 -> scale floored to 1
        (1, 10, 1_000, 1_000),  # log10 10 = 1
        (1, 50, 1_000, 1_698),  # log10 50 = 1.69897 -> 1.698
        (1, 100, 1_000, 2_000),
        (1, 500, 1_000, 2_698),  # 2.69897 -> 2.698
        (1, 1_000, 1_000, 3_000),
        (4, 16, 1_000, 4_816),  # lan: 4 * 1.204 s
        (4, 100, 1_000, 8_000),  # lan, 100 members: 4 * 2 * 1 s
        (3, 50, 1_000, 5_094),  # local: 3 * 1.698 s
        (6, 1_000, 5_000, 90_000),  # wan: 6 * 3 * 5 s
    ],
)
def test_suspicion_timeout_matches_memberlist(
    mult: int, n: int, interval_ms: int, expected_ms: int
) -> None:
    assert suspicion_timeout_ms(mult, n, interval_ms) == expected_ms


@pytest.mark.parametrize(
    ("mult", "n", "expected_k"),
    [
        (4, 1, 0),
        (4, 3, 0),  # n - 2 = 1 < 2: too few members to confirm, use min
        (4, 4, 2),
        (4, 100, 2),
        (3, 3, 1),
        (3, 2, 0),
        (6, 5, 0),  # k would be 4 but only 3 others can confirm
        (6, 6, 4),
        (2, 10, 0),
    ],
)
def test_expected_confirmations(mult: int, n: int, expected_k: int) -> None:
    assert expected_confirmations(mult, n) == expected_k


@pytest.mark.parametrize(
    ("confirmations", "k", "elapsed", "min_ms", "max_ms", "expected"),
    [
        (0, 3, 0, 2_000, 30_000, 30_000),  # nobody confirmed: the maximum
        (1, 3, 2_000, 2_000, 30_000, 14_000),  # ln2/ln4 = .5 -> 16 s - 2 s
        (2, 3, 3_000, 2_000, 30_000, 4_810),  # ln3/ln4 -> 7.8105 s floor ms
        (3, 3, 4_000, 2_000, 30_000, -2_000),  # k reached: the minimum
        (4, 3, 5_000, 2_000, 30_000, -3_000),  # never below the minimum
        (0, 0, 1_000, 8_000, 48_000, 7_000),  # k = 0: minimum at once
        (0, 2, 0, 8_000, 48_000, 48_000),  # lan, 100 members
        (1, 2, 0, 8_000, 48_000, 22_762),  # ln2/ln3 = .630930 -> 48 - 25.23719
        (2, 2, 0, 8_000, 48_000, 8_000),
    ],
)
def test_remaining_suspicion_time(
    confirmations: int, k: int, elapsed: int, min_ms: int, max_ms: int, expected: int
) -> None:
    got = remaining_suspicion_ms(confirmations, k, elapsed, min_ms, max_ms)
    assert got == expected


def test_suspicion_counts_each_independent_sender_once() -> None:
    timer = Suspicion("origin", k=2, min_ms=8_000, max_ms=48_000, start_ms=1_000)
    assert timer.deadline_ms == 49_000
    assert not timer.confirm("origin")  # the accuser is not a confirmation
    assert timer.confirm("b")
    assert not timer.confirm("b")
    assert timer.deadline_ms == 1_000 + 22_762
    assert timer.confirm("c")
    assert timer.deadline_ms == 9_000
    assert not timer.confirm("d")  # k reached
    assert timer.confirmations == 2


@pytest.mark.parametrize(
    ("mult", "n", "expected"),
    [(4, 1, 4), (4, 9, 4), (4, 10, 8), (4, 99, 8), (4, 100, 12), (2, 5, 2)],
)
def test_retransmit_limit(mult: int, n: int, expected: int) -> None:
    # mult * ceil(log10(n + 1))
    assert retransmit_limit(mult, n) == expected


@pytest.mark.parametrize(
    ("n", "expected_ms"),
    [(1, 30_000), (32, 30_000), (33, 60_000), (64, 60_000), (65, 90_000)],
)
def test_push_pull_interval_scales_like_memberlist(n: int, expected_ms: int) -> None:
    assert _push_pull_scale(30_000, n) == expected_ms


def test_awareness_saturates_and_scales() -> None:
    health = Awareness(max_multiplier=8)
    health.apply_delta(-1)
    assert health.score == 0
    assert health.scale(500) == 500
    health.apply_delta(3)
    assert health.scale(1_000) == 4_000
    health.apply_delta(100)
    assert health.score == 7
    assert health.scale(1_000) == 8_000


def test_broadcast_queue_orders_invalidates_and_retires() -> None:
    queue = BroadcastQueue()
    queue.queue("a", b"a-old")
    queue.queue("b", b"b1")
    queue.queue("a", b"a-new")  # replaces a-old
    assert len(queue) == 2
    assert queue.take(1_000, limit=2, max_count=10) == [b"a-new", b"b1"]
    queue.queue("c", b"c1")
    # c has fewer transmits, so it goes first; then a-new, b1 reach the limit.
    assert queue.take(1_000, limit=2, max_count=10) == [b"c1", b"a-new", b"b1"]
    assert "a" not in queue and "b" not in queue and "c" in queue
    assert queue.take(1, limit=2, max_count=10) == []  # does not fit
