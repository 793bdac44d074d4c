"""Overload protection: the fire window, shedding waiting fires, and the
agents' report pipeline (cronmesh/core/admission.py, scheduler, runner)."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cronmesh.core.admission import LoopLag, Window, WindowSettings
from cronmesh.core.fsm import ApplyResult
from cronmesh.core.model import Execution, Job
from cronmesh.core.runner import MAX_REPORT_BATCH, REPORT_PIPELINE, Runner
from cronmesh.core.scheduler import Scheduler
from cronmesh.errors import UnavailableError
from cronmesh.storage.env import DataDir
from cronmesh.storage.state import StateStore

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
SMALL = WindowSettings(initial=4, floor=2, ceiling=16, high=0.25, low=0.05)


# -- the window's policy -----------------------------------------------------


def test_window_holds_its_limit_and_frees_places() -> None:
    window = Window(SMALL)
    assert [window.try_acquire() for _ in range(5)] == [True] * 4 + [False]
    window.release()
    assert window.try_acquire()
    assert not window.try_acquire()


def test_window_shrinks_on_lag_down_to_its_floor() -> None:
    window = Window(SMALL)
    window.adjust(0.4)
    assert window.limit == 2  # int(4 * 0.7)
    window.adjust(1.0)
    assert window.limit == 2
    assert window.shrinks == 1


def test_window_grows_only_when_full_and_the_loop_is_quick() -> None:
    window = Window(SMALL)
    window.adjust(0.0)
    assert window.limit == 4  # nobody filled it: no reason to grow
    for _ in range(4):
        assert window.try_acquire()
    window.adjust(0.1)
    assert window.limit == 4  # between low and high: hold
    window.adjust(0.01)
    assert window.limit == 5
    for _ in range(20):
        while window.try_acquire():
            pass
        window.adjust(0.0)
    assert window.limit == 16  # the ceiling


def test_a_quiet_loop_takes_a_shrunk_window_back_toward_its_start() -> None:
    window = Window(WindowSettings(initial=512, floor=32))
    for _ in range(20):
        window.adjust(1.0)  # a long stall
    assert window.limit == 32
    window.adjust(0.01)  # quiet, and nobody fills it
    assert window.limit == 272
    window.adjust(0.01)
    assert window.limit == 392
    window.adjust(0.1)  # neither quiet nor late: hold
    assert window.limit == 392


def test_loop_lag_reports_a_blocked_loop() -> None:
    seen: list[float] = []

    async def main() -> None:
        lag = LoopLag(interval=0.01, period=0.05)
        lag.listeners.append(seen.append)
        task = asyncio.create_task(lag.run())
        await asyncio.sleep(0.1)
        quiet = max(seen)
        time.sleep(0.3)  # the loop is blocked, as by a long apply
        await asyncio.sleep(0.1)
        task.cancel()
        assert lag.worst >= 0.25 > quiet

    asyncio.run(main())
    assert seen


# -- the scheduler sheds fires that waited a turn ----------------------------


class SlowDispatcher:
    """Fires never commit until released: every fire keeps its place."""

    def __init__(self) -> None:
        self.started: list[tuple[str, datetime]] = []
        self.release = asyncio.Event()

    async def fire(self, name: str, *, fire_at: datetime, trigger: str) -> object:
        self.started.append((name, fire_at))
        await self.release.wait()
        return type("Outcome", (), {"dispatches": ()})()


def add_job(store: StateStore, name: str, schedule: str) -> None:
    from cronmesh.core.fsm import StateMachine, encode_command

    fsm = StateMachine(store)
    index = store.applied_index() + 1
    job = {
        "name": name,
        "schedule": schedule,
        "executor": "shell",
        "executor_config": {"command": "true"},
    }
    assert fsm.apply_batch([(index, encode_command("set_job", job=job))])[0].ok


def test_a_full_window_sheds_the_older_waiting_fire_of_a_job(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "d")
    store = StateStore(data)
    for i in range(4):
        add_job(store, f"j{i}", "@every 1s")
    now = [T0]
    dispatcher = SlowDispatcher()
    scheduler = Scheduler(
        store,
        dispatcher,  # type: ignore[arg-type]
        wall=lambda: now[0].timestamp(),
        window=WindowSettings(initial=2, floor=2, ceiling=2),
    )

    async def main() -> None:
        for job in store.list_jobs():
            scheduler._load(job, changed=True)
        for second in (1, 2, 3):
            now[0] = T0 + timedelta(seconds=second)
            scheduler._fire_due(now[0].timestamp())
            await asyncio.sleep(0)
        # Two places: j0 and j1 started at +1 s and still hold them. Every
        # later instant waited, and the next second shed it: j2 and j3 twice
        # (+1 s, +2 s), j0 and j1 once (+2 s).
        assert sorted(dispatcher.started) == [
            ("j0", T0 + timedelta(seconds=1)),
            ("j1", T0 + timedelta(seconds=1)),
        ]
        assert scheduler.shed == 6
        assert scheduler._waiting == {
            name: [T0 + timedelta(seconds=3)] for name in ("j2", "j3", "j0", "j1")
        }
        dispatcher.release.set()
        for _ in range(10):
            await asyncio.sleep(0)
        third = sorted(name for name, at in dispatcher.started if at.second == 3)
        assert third == ["j0", "j1", "j2", "j3"]
        assert not scheduler._waiting

    asyncio.run(main())
    data.close()


def test_a_catch_up_burst_of_one_job_is_not_shed(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "d")
    store = StateStore(data)
    add_job(store, "burst", "@every 10s")
    now = [T0]
    dispatcher = SlowDispatcher()
    dispatcher.release.set()
    scheduler = Scheduler(
        store,
        dispatcher,  # type: ignore[arg-type]
        wall=lambda: now[0].timestamp(),
        window=WindowSettings(initial=1, floor=1, ceiling=1),
    )

    async def main() -> None:
        scheduler._load(store.get_job("burst"), changed=True)  # type: ignore[arg-type]
        # The loop was late by 35 s: three instants come due in one turn.
        now[0] = T0 + timedelta(seconds=35)
        scheduler._fire_due(now[0].timestamp())
        for _ in range(10):
            await asyncio.sleep(0)

    asyncio.run(main())
    assert [at for _, at in dispatcher.started] == [
        T0 + timedelta(seconds=s) for s in (10, 20, 30)
    ]
    assert scheduler.shed == 0
    data.close()


# -- the runner's reports: a bounded pipeline whose batches grow ---------------


class SlowLog:
    """A commit log whose proposals take `delay` s; counts calls in flight."""

    def __init__(self, delay: float, fail_first: int = 0) -> None:
        self.delay = delay
        self.fail_first = fail_first
        self.in_flight = 0
        self.most = 0
        self.calls: list[list[str]] = []

    async def propose(self, payload: bytes) -> ApplyResult:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.fail_first:
                self.fail_first -= 1
                raise UnavailableError("no leader")
            command = json.loads(payload)
            if command["op"] == "executions_done":
                docs = command["executions"]
            else:
                docs = [command["execution"]]
            self.calls.append([doc["job_name"] for doc in docs])
            return ApplyResult()
        finally:
            self.in_flight -= 1


def finished(i: int) -> Execution:
    at = T0 + timedelta(milliseconds=i)
    return Execution(
        job_name=f"j{i:03d}",
        started_at=at,
        node_name="n",
        group=i,
        finished_at=at,
        success=True,
    )


@pytest.mark.parametrize("fail_first", [0, 3])
def test_reports_travel_in_few_batches_with_few_calls_in_flight(
    fail_first: int,
) -> None:
    commit_log = SlowLog(0.05, fail_first=fail_first)
    runner = Runner("n", commit_log, max_output=1000)  # type: ignore[arg-type]
    runner.retry_delay = 0.01
    count = 300

    async def main() -> None:
        for i in range(count):
            await runner.finish(finished(i))
            if i % 10 == 0:
                await asyncio.sleep(0.005)  # results end over time
        while runner.unreported:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    reported = [name for call in commit_log.calls for name in call]
    assert sorted(reported) == [f"j{i:03d}" for i in range(count)]
    assert commit_log.most <= REPORT_PIPELINE
    assert all(len(call) <= MAX_REPORT_BATCH for call in commit_log.calls)
    # One call per result would be 300; waiting behind two calls of 50 ms
    # makes the batches grow.
    assert len(commit_log.calls) < count // 5


@pytest.mark.parametrize("limit", [1000, 400_000])
def test_the_runner_keeps_max_output_whatever_the_executors_default(
    limit: int,
) -> None:
    commit_log = SlowLog(0.0)
    runner = Runner("n", commit_log, max_output=limit)  # type: ignore[arg-type]
    job = Job.from_json(
        {
            "name": "big",
            "executor": "shell",
            "executor_config": {
                "command": "head -c 300000 /dev/zero | tr -c x x; echo; echo END",
                "shell": "true",
            },
        }
    )
    execution = finished(1)
    execution.finished_at = None

    async def main() -> str:
        runner.start(job, execution)
        while runner.unreported or execution.finished_at is None:
            await asyncio.sleep(0.02)
        return execution.output

    output = asyncio.run(main())
    assert output.endswith("END\n")
    if limit > 300_000:
        assert output == "x" * 300_000 + "\nEND\n"  # nothing cut
    else:
        assert len(output.encode()) <= limit and "bytes cut" in output


def test_an_unexpected_error_while_reporting_is_retried_not_dropped() -> None:
    class Flaky(SlowLog):
        async def propose(self, payload: bytes) -> ApplyResult:
            if self.fail_first:
                self.fail_first -= 1
                raise RuntimeError("a bug below the commit log")
            return await super().propose(payload)

    commit_log = Flaky(0.0, fail_first=2)
    runner = Runner("n", commit_log, max_output=1000)  # type: ignore[arg-type]
    runner.retry_delay = 0.01

    async def main() -> None:
        await runner.finish(finished(7))
        while runner.unreported:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert commit_log.calls == [["j007"]]
