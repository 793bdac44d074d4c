"""Benchmark: how precisely and how fast one node fires `@every 1s` jobs.

For each job count it starts a real agent (fsync on), creates the jobs through
the API, lets them run, stops the agent, and reads every execution back from
its data dir. Each job runs `/bin/date +%s.%N` directly (no shell), so its
output is the instant the process really ran; the fire lag is that instant
minus the scheduled instant. Missed fires are whole seconds with no
execution between a job's first and last fire; doubled fires are instants
that ran twice. The bare spawn rate is `/bin/true` started through asyncio
as fast as it goes, in the same run, on the same machine.

    .venv/bin/python scripts/bench/schedule.py                 # 500 and 2000 jobs, 60 s
    .venv/bin/python scripts/bench/schedule.py --jobs 500 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from cronmesh.storage.env import DataDir
from cronmesh.storage.state import StateStore


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bare_spawn_rate(seconds: float = 5.0, parallel: int = 64) -> float:
    """/bin/true processes per second, `parallel` in flight at once."""
    deadline = time.monotonic() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            proc = await asyncio.create_subprocess_exec(
                "/bin/true",
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            await proc.communicate()
            done += 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(parallel)))
    return done / (time.monotonic() - start)


def run_agent(jobs: int, duration: float) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="cronmesh-bench-"))
    port = free_port()
    log = (data_dir.parent / f"{data_dir.name}.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cronmesh",
            "agent",
            "--server",
            "--node-name",
            "bench",
            "--data-dir",
            str(data_dir),
            "--http-addr",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            "--shutdown-grace",
            "5",
        ],
        stdout=log,
        stderr=log,
    )
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    for _ in range(300):
        try:
            if http.get("/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    for i in range(jobs):
        response = http.post(
            "/v1/jobs",
            json={
                "name": f"bench-{i:05d}",
                "schedule": "@every 1s",
                "executor": "shell",
                "executor_config": {"command": "/bin/date +%s.%N"},
            },
        )
        response.raise_for_status()
    started = time.time()
    time.sleep(duration)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    elapsed = time.time() - started
    return collect(data_dir, jobs, elapsed)


def collect(data_dir: Path, jobs: int, elapsed: float) -> dict[str, Any]:
    data = DataDir(data_dir)
    store = StateStore(data)
    lags: list[float] = []
    missed = doubled = total = unparsed = 0
    for i in range(jobs):
        runs = store.executions(f"bench-{i:05d}")
        instants = Counter(r.scheduled_at for r in runs if r.scheduled_at)
        doubled += sum(n - 1 for n in instants.values() if n > 1)
        if instants:
            first, last = min(instants), max(instants)
            expected = int((last - first).total_seconds()) + 1
            missed += expected - len(instants)
        for run in runs:
            if run.scheduled_at is None or not run.finished_at:
                continue
            total += 1
            try:
                ran = float(run.output.strip().splitlines()[0])
            except (ValueError, IndexError):
                unparsed += 1
                continue
            lags.append(ran - run.scheduled_at.timestamp())
    data.close()
    return {
        "jobs": jobs,
        "seconds": round(elapsed, 1),
        "executions": total,
        "executions_per_s": round(total / elapsed, 1),
        "lag_ms_p50": round(percentile(lags, 0.50) * 1e3, 1),
        "lag_ms_p99": round(percentile(lags, 0.99) * 1e3, 1),
        "lag_ms_max": round(max(lags, default=float("nan")) * 1e3, 1),
        "lag_ms_mean": round(statistics.fmean(lags) * 1e3, 1) if lags else None,
        "missed": missed,
        "doubled": doubled,
        "unparsed_outputs": unparsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, nargs="*", default=[500, 2000])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    bare = asyncio.run(bare_spawn_rate())
    results = {
        "when": datetime.now().isoformat(timespec="seconds"),
        "bare_true_spawns_per_s": round(bare, 1),
        "runs": [],
    }
    for count in args.jobs:
        result = run_agent(count, args.duration)
        result["share_of_bare_spawn_rate"] = round(result["executions_per_s"] / bare, 2)
        results["runs"].append(result)
        if not args.json:
            print(json.dumps(result), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"bare /bin/true spawns per second: {bare:.0f}")


if __name__ == "__main__":
    main()
