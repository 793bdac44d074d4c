"""Randomized simulation: 2,000 seeds of faulty clusters, checked for safety.

Each seed runs 3-5 servers for 200 faulty ticks (loss, delay, duplication,
partitions, crashes that lose unpersisted state, membership changes,
compaction and snapshots, transfers, reads), then heals and requires every
acknowledged write on every member.  Replay a failure with the command in
the assertion message.
"""

from __future__ import annotations

import pytest

from cronmesh.raft.sim import SafetyViolation, SimFailure, run_seed

SEEDS = 2000
CHUNK = 50


@pytest.mark.parametrize("start", range(0, SEEDS, CHUNK))
def test_random_seeds(start: int) -> None:
    for seed in range(start, start + CHUNK):
        try:
            run_seed(seed)
        except (SafetyViolation, SimFailure) as exc:
            pytest.fail(
                f"seed {seed}: {type(exc).__name__}: {exc}\n"
                f"replay: scripts/simulate-raft --start {seed} --seeds 1 -vv"
            )


def test_long_run_with_five_nodes() -> None:
    result = run_seed(10_000, nodes=5, steps=1500)
    assert result.acked > 100
    assert result.stats["snapshot_installed"] >= 1
