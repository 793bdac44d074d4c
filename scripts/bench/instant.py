"""Benchmark: N runs due at one instant, started by the shell executor.

The floor under the cluster's fire lag (scripts/bench/cluster.py): no Raft,
no gRPC, no scheduler, only process starts. Each run is `/bin/date +%s.%N`
(its output is the moment the program really ran); its lag is that moment
minus the instant. Two ways, taking turns for `--rounds` rounds:

  timer   every run waits on the event loop's timer and calls
          ShellExecutor.run at the instant (fork and exec at the instant)
  gate    every run is started `--ahead` seconds early, held at one
          StartGate (core/executors/gate.py), which opens at the instant

    .venv/bin/python scripts/bench/instant.py
    .venv/bin/python scripts/bench/instant.py --runs 100 --rounds 5 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

from cronmesh.core.executors.base import OutputBuffer
from cronmesh.core.executors.gate import StartGate
from cronmesh.core.executors.shell import ShellExecutor, install_pidfd_child_watcher

CONFIG = {"command": "/bin/date +%s.%N"}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def one_round(way: str, runs: int, ahead: float) -> list[float]:
    loop = asyncio.get_running_loop()
    executor = ShellExecutor()
    instant_wall = time.time() + ahead
    instant = loop.time() + ahead
    gate = StartGate(loop, instant) if way == "gate" else None

    async def run(i: int) -> float:
        if gate is None:
            await asyncio.sleep(max(0.0, instant - loop.time()))
            result = await executor.run(
                CONFIG, OutputBuffer(1000), job_name="bench", execution_id=str(i)
            )
        else:
            result = await executor.run(
                CONFIG,
                OutputBuffer(1000),
                job_name="bench",
                execution_id=str(i),
                gate=gate,
            )
        assert result.success, result.output
        return float(result.output.split()[0]) - instant_wall

    if gate is not None:
        loop.call_at(instant, gate.open)
    return list(await asyncio.gather(*(run(i) for i in range(runs))))


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    install_pidfd_child_watcher()
    lags: dict[str, list[list[float]]] = {"timer": [], "gate": []}
    for _ in range(args.rounds):
        for way in lags:
            lags[way].append(await one_round(way, args.runs, args.ahead))
            await asyncio.sleep(0.5)
    out: dict[str, Any] = {
        "runs": args.runs,
        "rounds": args.rounds,
        "load_before": os.getloadavg()[0],
    }
    for way, rounds in lags.items():
        out[way] = {
            "p50_ms": round(
                statistics.median(percentile(r, 0.5) for r in rounds) * 1e3, 1
            ),
            "p99_ms": round(
                statistics.median(percentile(r, 0.99) for r in rounds) * 1e3, 1
            ),
            "max_ms": round(statistics.median(max(r) for r in rounds) * 1e3, 1),
            "min_ms": round(min(min(r) for r in rounds) * 1e3, 2),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="runs due at the instant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ahead", type=float, default=1.0, help="seconds staged ahead")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.runs} runs of /bin/date due at one instant, median of", end=" ")
    print(f"{args.rounds} rounds")
    for way in ("timer", "gate"):
        r = result[way]
        print(
            f"  {way:5}  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
            f"max {r['max_ms']:7.1f} ms  (earliest {r['min_ms']} ms)"
        )


if __name__ == "__main__":
    main()
