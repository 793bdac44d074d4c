"""Benchmark: start times (execution ids) for N staged runs of one instant.

Every run staged for an instant gets the instant itself or the next free
microsecond after it (Dispatcher._staged_start), so its execution id is
unique. This times that choice alone, on the leader's event loop thread,
for N runs of one instant: no Raft, no hand-over, no process.

    .venv/bin/python scripts/bench/staged_ids.py
    .venv/bin/python scripts/bench/staged_ids.py --runs 1000 8000 20000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cronmesh.core.commitlog import LocalLog
from cronmesh.core.dispatcher import Dispatcher
from cronmesh.core.fsm import StateMachine
from cronmesh.storage.env import DataDir
from cronmesh.storage.state import StateStore


def one(runs: int, base: Path) -> float:
    """Seconds to choose the starts of `runs` runs due at one instant."""
    data = DataDir(base / f"d{runs}")
    try:
        fsm = StateMachine(StateStore(data))
        dispatcher = Dispatcher("s1", fsm.store, LocalLog(fsm), None)  # type: ignore[arg-type]
        instant = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=30)
        began = time.perf_counter()
        for _ in range(runs):
            dispatcher._staged_start(instant)
        return time.perf_counter() - began
    finally:
        data.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[1000, 4000, 8000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for runs in args.runs:
            took = one(runs, Path(tmp))
            print(f"runs={runs} seconds={took:.3f} per_run_us={took / runs * 1e6:.1f}")


if __name__ == "__main__":
    main()
