"""Cluster properties checked on the deterministic simulator, over many seeds.

Sizing (the whole ``tests/gossip`` run must stay under 4 minutes on two
slow cores): the expensive 100-member / 10 % loss / 10-minute property runs
on 3 seeds; the cheap 10-20 member properties run on 15-200 seeds each,
about 540 seeds in all (about 70 s of CPU on a desktop core). A failure
message always names the seed, so ``scripts/simulate-gossip`` can replay it.
"""

from __future__ import annotations

import pytest

from cronmesh.gossip.config import profile
from cronmesh.gossip.sim import (
    ScenarioResult,
    detection_bound_ms,
    run_crash_scenario,
    run_join_scenario,
    run_leave_scenario,
    run_loss_scenario,
    run_partition_scenario,
    run_restart_scenario,
)


def _check(result: ScenarioResult) -> None:
    assert result.ok, f"{result.name} failed for seed {result.seed}: {result.detail}"


@pytest.mark.parametrize("seed", range(200))
def test_join_reaches_every_member_within_10_probe_intervals(seed: int) -> None:
    _check(run_join_scenario(10, seed))


@pytest.mark.parametrize("seed", range(120))
def test_crashed_member_failed_everywhere_within_lifeguard_bound(seed: int) -> None:
    _check(run_crash_scenario(16, seed))


@pytest.mark.parametrize("seed", range(30))
def test_crash_detection_bound_holds_under_10pct_loss(seed: int) -> None:
    _check(run_crash_scenario(20, seed, loss=0.10))


@pytest.mark.parametrize("seed", range(100))
def test_graceful_leave_is_reported_as_leave(seed: int) -> None:
    _check(run_leave_scenario(12, seed))


@pytest.mark.parametrize("seed", range(30))
def test_restarted_member_refutes_its_death_and_rejoins(seed: int) -> None:
    _check(run_restart_scenario(10, seed))


@pytest.mark.parametrize("seed", range(40))
def test_healed_partition_re_merges(seed: int) -> None:
    _check(run_partition_scenario(12, seed))


@pytest.mark.parametrize("seed", range(15))
def test_no_false_failures_20_members_10pct_loss(seed: int) -> None:
    _check(run_loss_scenario(20, 0.10, 2, seed))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_false_failures_100_members_10pct_loss_10_minutes(seed: int) -> None:
    _check(run_loss_scenario(100, 0.10, 10, seed))


def test_detection_bound_is_the_lifeguard_formula() -> None:
    lan = profile("lan")
    first, rest = detection_bound_ms(lan, 16)
    # Round robin: 2 rounds of 15 probes + 1, at the worst health (x8).
    assert first == 31 * 8 * 1_000
    # 6 * (4 * log10(16) * 1 s = 4.816 s) + 2 * 8 transmits * 200 ms
    assert rest == 6 * 4_816 + 2 * 8 * 200
    first, rest = detection_bound_ms(lan, 100)
    assert rest == 6 * 8_000 + 2 * 12 * 200
