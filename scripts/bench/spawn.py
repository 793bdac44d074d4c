"""Benchmark: what recording a run's process, or a parent-death signal, costs
the shell executor's spawn rate.

Each way runs `/bin/true` through the shell executor (or asyncio, for the
preexec_fn way), `--parallel` runs in flight at once, for `--seconds`, and
counts runs finished per second. The ways take turns for `--rounds` rounds
so that a change in the machine's load hits them all alike; the figure per
way is its median over the rounds, and each is also given relative to
`executor` (the start path as it was before processes were marked).

  executor    ShellExecutor.run, no on_start callback (as before runs
              were marked)
  mark        the same, plus what the runner does for a run: note its
              process in a ProcessMarker writing to a real outbox (LMDB,
              no fsync, in a temporary directory) and drop it when the run
              ends (these runs end within the marker's half second, so no
              /proc read and no write happens: the common case)
  mark-all    as mark, but with a marker delay of 0 s and no drop, so
              every run's start time is read in the marker's thread (and
              a mark written for the runs not reaped by then): an upper
              bound for runs that last
  pdeathsig   asyncio's subprocess_exec with a preexec_fn that sets
              PR_SET_PDEATHSIG (the fork path a preexec_fn forces)
  setpriv     ShellExecutor.run of `setpriv --pdeathsig KILL /bin/true`
              (util-linux sets the signal, then execs the job: one more exec)

    .venv/bin/python scripts/bench/spawn.py
    .venv/bin/python scripts/bench/spawn.py --seconds 3 --rounds 5 --json
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cronmesh.core.executors.base import OutputBuffer
from cronmesh.core.executors.shell import ShellExecutor, install_pidfd_child_watcher
from cronmesh.core.orphans import ProcessMark, ProcessMarker
from cronmesh.storage.env import DataDir
from cronmesh.storage.outbox import Outbox

PR_SET_PDEATHSIG = 1

RunOne = Callable[[int], Awaitable[None]]


async def rate(run_one: RunOne, seconds: float, parallel: int) -> float:
    """Runs finished per second with `parallel` in flight."""
    deadline = time.monotonic() + seconds
    done = 0

    async def worker(slot: int) -> None:
        nonlocal done
        n = 0
        while time.monotonic() < deadline:
            await run_one(slot * 1_000_000 + n)
            n += 1
            done += 1

    start = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(parallel)))
    return done / (time.monotonic() - start)


def make_ways(outbox: Outbox) -> dict[str, RunOne]:
    executor = ShellExecutor()
    true = {"command": "/bin/true"}
    libc = ctypes.CDLL(None, use_errno=True)

    async def plain(n: int) -> None:
        result = await executor.run(
            true, OutputBuffer(), job_name="bench", execution_id=str(n)
        )
        assert result.success, result.output

    def write(exec_id: str, mark: ProcessMark) -> None:
        outbox.note_process(exec_id, mark.to_json())

    def with_marker(marker: ProcessMarker, drop: bool) -> RunOne:
        async def marked(n: int) -> None:
            exec_id = str(n)
            result = await executor.run(
                true,
                OutputBuffer(),
                job_name="bench",
                execution_id=exec_id,
                on_start=lambda pid, reaped: marker.note(exec_id, pid, reaped),
            )
            assert result.success, result.output
            if drop:
                marker.drop(exec_id)  # what the runner does when a run ends

        return marked

    def set_pdeathsig() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    async def pdeathsig(n: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            "/bin/true",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=set_pdeathsig,
        )
        await proc.communicate()
        assert proc.returncode == 0

    ways: dict[str, RunOne] = {
        "executor": plain,
        "mark": with_marker(ProcessMarker(write), drop=True),
        "mark-all": with_marker(ProcessMarker(write, delay=0.0), drop=False),
        "pdeathsig": pdeathsig,
    }
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        wrapped = {"command": f"{setpriv} --pdeathsig KILL /bin/true"}

        async def via_setpriv(n: int) -> None:
            result = await executor.run(
                wrapped, OutputBuffer(), job_name="bench", execution_id=str(n)
            )
            assert result.success, result.output

        ways["setpriv"] = via_setpriv
    return ways


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    install_pidfd_child_watcher()
    with tempfile.TemporaryDirectory(prefix="cronmesh-spawn-") as tmp:
        data = DataDir(Path(tmp))
        outbox = Outbox(data)
        try:
            ways = make_ways(outbox)
            chosen = [w for w in args.ways if w in ways]
            rates: dict[str, list[float]] = {w: [] for w in chosen}
            await rate(ways["executor"], 1.0, args.parallel)  # warm-up
            for _ in range(args.rounds):
                for way in chosen:
                    measured = await rate(ways[way], args.seconds, args.parallel)
                    rates[way].append(measured)
        finally:
            outbox.close()
            data.close()
    base = statistics.median(rates["executor"]) if "executor" in rates else 0.0
    return {
        "parallel": args.parallel,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "runs_per_s": {w: [round(r) for r in rs] for w, rs in rates.items()},
        "median_runs_per_s": {
            w: round(statistics.median(rs)) for w, rs in rates.items()
        },
        "vs_executor": {
            w: round(statistics.median(rs) / base, 3) if base else None
            for w, rs in rates.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=64)
    parser.add_argument(
        "--ways",
        nargs="*",
        default=["executor", "mark", "mark-all", "pdeathsig", "setpriv"],
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(result))
        return
    for way, median in result["median_runs_per_s"].items():
        print(
            f"{way:10} {median:6d} runs/s  x{result['vs_executor'][way]}  "
            f"rounds {result['runs_per_s'][way]}"
        )


if __name__ == "__main__":
    main()
