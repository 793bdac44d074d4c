"""Benchmark: how precisely and how fast one node fires `@every 1s` jobs.

For each job count it starts a real agent (fsync on), creates all the jobs
in one `/v1/restore` request (so they all start at the same second, and no
job fires while the others are still being created), lets them run, stops
the agent, and reads every execution back from its data dir. Each job runs
`/bin/date +%s.%N` directly (no shell), so its output is the instant the
process really ran; the fire lag is that instant minus the scheduled
instant. A run whose output is not a time did not run (e.g. it was still
waiting to start when the agent stopped): `unparsed_outputs`.

Only the measured window counts: the whole seconds from `--warmup` seconds
after the jobs were created to `--tail` seconds before the agent is stopped
(a fire of the last instants may still be in flight at the stop). In that
window a missed fire is a (job, instant) with no execution, a doubled fire
one with more than one; lag percentiles are over the window's executions.

Two reference figures are taken in the same run, on the same machine:
  * the bare spawn rate: `/bin/true` started through asyncio, 64 at a time,
    as fast as it goes;
  * the floor: N `/bin/date +%s.%N` started back to back from a whole
    second, with the lag of each measured like the jobs': once with
    os.posix_spawn from one thread (vfork-based, the cheapest start the
    standard library has), once with the shell executor's own start (libc's
    posix_spawn with the GIL released, from its spawn threads) and nothing
    else: no scheduler, no commit. That is how soon N processes of one
    instant can run on this machine at this load.

    .venv/bin/python scripts/bench/schedule.py                 # 500 and 2000 jobs, 60 s
    .venv/bin/python scripts/bench/schedule.py --jobs 500 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from cronmesh.errors import StorageError
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


def spawn_floor(count: int) -> dict[str, float]:
    """Lags of `count` /bin/date started back to back from a whole second.

    Two ways: os.posix_spawn from one thread (it holds the GIL while the
    vfork child runs to its exec), and the shell executor's own start
    (glibc's posix_spawn through ctypes, GIL released, from its spawn
    threads) with nothing else around it: no scheduler, no commit.
    """
    try:
        from cronmesh.core.executors.shell import SPAWN_THREADS, _spawn_path
    except ImportError:  # an older cronmesh (a before/after run): one way only
        SPAWN_THREADS, _spawn_path = 0, None

    argv = ("/bin/date", "+%s.%N")
    env = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()}

    def one_thread(write_fd: int) -> list[int]:
        actions = [(os.POSIX_SPAWN_DUP2, write_fd, 1)]
        return [
            os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)
            for _ in range(count)
        ]

    def threads(write_fd: int) -> list[int]:
        with ThreadPoolExecutor(SPAWN_THREADS) as pool:
            spawns = [
                pool.submit(_spawn_path, argv, env, write_fd) for _ in range(count)
            ]
            return [spawn.result() for spawn in spawns]

    figures = {}
    ways = [("floor_1thread", one_thread)]
    if _spawn_path is not None:
        ways.append(("floor_threads", threads))
    for name, start in ways:
        read_fd, write_fd = os.pipe()
        instant = float(int(time.time()) + 1)
        time.sleep(max(0.0, instant - time.time()))
        pids = start(write_fd)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as out:
            lags = [float(line) - instant for line in out.read().split()]
        for pid in pids:
            os.waitpid(pid, 0)
        for label, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
            figures[f"{name}_lag_ms_{label}"] = round(percentile(lags, q) * 1e3, 1)
    return figures


def start_agent(data_dir: Path, port: int, raft: bool) -> subprocess.Popen[bytes]:
    log = (data_dir.parent / f"{data_dir.name}.log").open("wb")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cronmesh",
            "agent",
            *(["--server"] if raft else []),
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
            # Loopback only: gossip on a free port, Raft's gRPC on another.
            "--bind-addr",
            "127.0.0.1:0",
            "--rpc-port",
            str(free_port()),
        ],
        stdout=log,
        stderr=log,
    )


def stop_agent(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()  # an agent that cannot stop must not outlive the bench
        proc.wait()


def run_agent(
    jobs: int, duration: float, warmup: float, tail: float, raft: bool
) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="cronmesh-bench-"))
    port = free_port()
    proc = start_agent(data_dir, port, raft)
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        for _ in range(300):
            try:
                if http.get("/v1/isleader").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        backup = {
            "jobs": [
                {
                    "name": f"bench-{i:05d}",
                    "schedule": "@every 1s",
                    "executor": "shell",
                    "executor_config": {"command": "/bin/date +%s.%N"},
                }
                for i in range(jobs)
            ]
        }
        response = http.post(
            "/v1/restore", files={"file": ("jobs.json", json.dumps(backup))}
        )
        response.raise_for_status()
        created = time.time()
        time.sleep(duration)
        stopping = time.time()
    finally:
        stop_agent(proc)
    window = (math.ceil(created + warmup), math.floor(stopping - tail))
    result = collect(data_dir, jobs, window)
    result["seconds"] = round(stopping - created, 1)
    return result


def _ran_at(output: str) -> float:
    try:
        return float(output.strip().splitlines()[0])
    except (ValueError, IndexError):
        return float("nan")


def collect(data_dir: Path, jobs: int, window: tuple[int, int]) -> dict[str, Any]:
    """Figures over the whole seconds `window[0] <= instant <= window[1]`."""
    first, last = window
    instants = range(first, last + 1)
    for _ in range(600):  # the lock outlives the agent by the time its fds close
        try:
            data = DataDir(data_dir)
            break
        except StorageError:
            time.sleep(0.1)
    else:
        data = DataDir(data_dir)
    store = StateStore(data)
    lags: list[float] = []
    missed = doubled = total = unparsed = unfinished = ran_in_window = 0
    for i in range(jobs):
        every = store.executions(f"bench-{i:05d}")
        for run in every:  # throughput: any instant's process run in the window
            ran_in_window += first <= _ran_at(run.output) < last + 1
        runs = [
            r
            for r in every
            if r.scheduled_at is not None
            and first <= r.scheduled_at.timestamp() <= last
        ]
        seen = Counter(int(r.scheduled_at.timestamp()) for r in runs)  # type: ignore[union-attr]
        doubled += sum(n - 1 for n in seen.values() if n > 1)
        missed += sum(1 for t in instants if t not in seen)
        for run in runs:
            if not run.finished_at:
                unfinished += 1
                continue
            total += 1
            try:
                ran = float(run.output.strip().splitlines()[0])
            except (ValueError, IndexError):
                unparsed += 1  # did not run: e.g. still queued at the stop
                continue
            lags.append(ran - run.scheduled_at.timestamp())  # type: ignore[union-attr]
    data.close()
    seconds = len(instants)
    return {
        "jobs": jobs,
        "window_s": seconds,
        "executions": total,
        # Processes that really ran (their output is a time) during the
        # window's seconds, whatever instant they belong to, per second.
        "executions_per_s": round(ran_in_window / seconds, 1) if seconds else None,
        "lag_ms_p50": round(percentile(lags, 0.50) * 1e3, 1),
        "lag_ms_p99": round(percentile(lags, 0.99) * 1e3, 1),
        "lag_ms_max": round(max(lags, default=float("nan")) * 1e3, 1),
        "lag_ms_mean": round(statistics.fmean(lags) * 1e3, 1) if lags else None,
        "missed": missed,
        "doubled": doubled,
        "unfinished": unfinished,
        "unparsed_outputs": unparsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, nargs="*", default=[500, 2000])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--tail", type=float, default=3.0)
    parser.add_argument(
        "--raft",
        action="store_true",
        default=True,
        help="start the agent with --server, a one-node Raft log (the default, "
        "and the only mode now: since distributed execution an agent without "
        "--server holds no jobs and asks a server, so alone it answers 503)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    bare = asyncio.run(bare_spawn_rate())
    results = {
        "when": datetime.now().isoformat(timespec="seconds"),
        "bare_true_spawns_per_s": round(bare, 1),
        "cpus": os.cpu_count(),
        "load_avg_1m_at_start": os.getloadavg()[0],
        "runs": [],
    }
    for count in args.jobs:
        result = run_agent(count, args.duration, args.warmup, args.tail, args.raft)
        result["share_of_bare_spawn_rate"] = round(
            (result["executions_per_s"] or 0) / bare, 2
        )
        result.update(spawn_floor(count))
        result["load_avg_1m"] = os.getloadavg()[0]
        results["runs"].append(result)
        if not args.json:
            print(json.dumps(result), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"bare /bin/true spawns per second: {bare:.0f}")
        print(
            f"cpus: {os.cpu_count()}, load at start: {results['load_avg_1m_at_start']}"
        )


if __name__ == "__main__":
    main()
