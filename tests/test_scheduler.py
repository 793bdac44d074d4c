"""Scheduler timing rules with a fake wall clock, and the state machine's guards."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cronmesh.core.dispatcher import FireOutcome
from cronmesh.core.fsm import StateMachine, encode_command
from cronmesh.core.model import Execution, format_time
from cronmesh.core.scheduler import Scheduler
from cronmesh.storage.env import DataDir
from cronmesh.storage.state import StateStore

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


class FakeDispatcher:
    def __init__(self) -> None:
        self.fires: list[tuple[str, datetime]] = []

    async def fire(self, name: str, *, fire_at: datetime, trigger: str) -> FireOutcome:
        self.fires.append((name, fire_at))
        return FireOutcome()


class World:
    def __init__(self, tmp: Path) -> None:
        self.data = DataDir(tmp / "data")
        self.store = StateStore(self.data)
        self.fsm = StateMachine(self.store)
        self.index = 0
        self.now = T0
        self.dispatcher = FakeDispatcher()
        self.scheduler = Scheduler(
            self.store,
            self.dispatcher,  # type: ignore[arg-type]
            catch_up=60,
            wall=lambda: self.now.timestamp(),
        )

    def apply(self, op: str, **fields: Any) -> Any:
        self.index += 1
        return self.fsm.apply_batch([(self.index, encode_command(op, **fields))])[0]

    def add_job(self, name: str, schedule: str, **extra: Any) -> None:
        """Create or edit a job, the write taken at `now` (as the API does)."""
        job = {
            "name": name,
            "schedule": schedule,
            "executor": "shell",
            "executor_config": {"command": "true"},
            **extra,
        }
        assert self.apply("set_job", job=job, at=format_time(self.now)).ok

    def lead(self) -> None:
        """This node becomes the leader now: every job is planned again."""
        self.scheduler.lead_start = self.now
        self.scheduler.entries.clear()
        for job in self.store.list_jobs():
            self.scheduler._load(job)

    def record_fire(self, name: str, fire: datetime) -> Any:
        execution = Execution(
            job_name=name,
            started_at=fire,
            node_name="n",
            group=1,
            scheduled_at=fire,
            finished_at=fire,
            success=True,
        )
        return self.apply(
            "execution_started", execution=execution.to_json(), fire=format_time(fire)
        )

    def run_due(self) -> list[datetime]:
        async def go() -> None:
            self.scheduler._fire_due(self.now.timestamp())
            await asyncio.sleep(0)

        before = len(self.dispatcher.fires)
        asyncio.run(go())
        return [f for _, f in self.dispatcher.fires[before:]]


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_missed_fires_within_the_window_run_once_each(world: World) -> None:
    world.add_job("every10", "@every 10s")
    world.record_fire("every10", T0)
    world.now = T0 + timedelta(seconds=35)  # the agent was down 35 s
    world.scheduler._load(world.store.get_job("every10"))  # type: ignore[arg-type]
    fired = world.run_due()
    assert fired == [T0 + timedelta(seconds=s) for s in (10, 20, 30)]
    assert world.scheduler.next_fire("every10") == T0 + timedelta(seconds=40)
    assert world.scheduler.missed == 0


def test_J14_long_outage_skips_old_fires_and_resumes(world: World) -> None:
    world.add_job("minutely", "0 * * * * *")
    world.record_fire("minutely", T0)
    world.now = T0 + timedelta(minutes=110, seconds=30)
    world.scheduler._load(world.store.get_job("minutely"))  # type: ignore[arg-type]
    fired = world.run_due()
    assert fired == [T0 + timedelta(minutes=110)], "one catch-up run at most"
    assert world.scheduler.missed == 109
    assert world.scheduler.next_fire("minutely") == T0 + timedelta(minutes=111)


def test_a_fire_instant_is_committed_once(world: World) -> None:
    world.add_job("j", "@every 1s")
    assert world.record_fire("j", T0).ok
    again = world.record_fire("j", T0)
    assert again.code == 409
    earlier = world.record_fire("j", T0 - timedelta(seconds=5))
    assert earlier.code == 409
    assert len(world.store.executions("j")) == 1


def test_clock_jumping_back_never_refires_an_instant(world: World) -> None:
    world.add_job("j", "0 0 * * * *")
    world.record_fire("j", T0)
    world.now = T0 - timedelta(hours=3)
    world.scheduler._clock_jumped(-3 * 3600.0)
    assert world.scheduler.next_fire("j") == T0 + timedelta(hours=1)
    assert world.run_due() == []


def test_editing_a_job_replaces_its_heap_entry(world: World) -> None:
    world.add_job("j", "@every 5s")
    world.scheduler._load(world.store.get_job("j"))  # type: ignore[arg-type]
    job = world.store.get_job("j")
    assert job is not None
    job.schedule = "@every 60s"
    world.scheduler._load(job, changed=True)
    world.now = T0 + timedelta(seconds=5)
    assert world.run_due() == []
    world.now = T0 + timedelta(seconds=60)
    assert world.run_due() == [T0 + timedelta(seconds=60)]


def test_one_shot_job_with_a_committed_fire_is_not_scheduled(world: World) -> None:
    at = T0 + timedelta(seconds=10)
    world.add_job("once", f"@at {format_time(at)}")
    world.scheduler._load(world.store.get_job("once"))  # type: ignore[arg-type]
    assert world.scheduler.next_fire("once") == at
    world.record_fire("once", at)
    world.scheduler._load(world.store.get_job("once"))  # type: ignore[arg-type]
    assert world.scheduler.next_fire("once") is None


def test_runs_are_staged_ahead_of_their_instant_but_forbid_jobs_are_not(
    world: World,
) -> None:
    world.add_job("hourly", "0 0 * * * *")
    world.add_job("secondly", "@every 1s")
    world.add_job("held", "0 0 * * * *", concurrency="forbid")
    hour = T0 + timedelta(hours=1)
    for name in ("hourly", "secondly", "held"):
        world.record_fire(
            name, hour - timedelta(seconds=2) if name == "secondly" else T0
        )
        world.scheduler._load(world.store.get_job(name))  # type: ignore[arg-type]
    world.now = hour - timedelta(seconds=1.5)
    assert world.run_due() == [hour - timedelta(seconds=1)]  # 0.9 s ahead of it
    # 1 s ahead (the default), or 90 % of the gap for an every-second job.
    world.now = hour - timedelta(seconds=1)
    assert world.run_due() == [hour]
    fired = world.dispatcher.fires
    assert ("hourly", hour) in fired and ("held", hour) not in fired
    # Until its instant comes, the staged instant is still the job's next.
    assert world.scheduler.next_fire("hourly") == hour
    world.now = hour
    assert sorted(world.run_due()) == [hour, hour]  # held, and secondly 0.9 s ago
    assert ("held", hour) in world.dispatcher.fires
    assert world.scheduler.next_fire("hourly") == hour + timedelta(hours=1)
    world.now = hour + timedelta(seconds=0.05)
    assert world.run_due() == []
    world.now = hour + timedelta(seconds=0.1)
    assert world.run_due() == [hour + timedelta(seconds=1)]


@pytest.mark.parametrize(
    ("schedule", "first"),
    [
        (f"@at {format_time(T0 + timedelta(seconds=5))}", 5),
        ("@every 10s", 7),  # created at -3 s
        ("*/10 * * * * *", 0),
    ],
    ids=["at", "every", "cron"],
)
def test_a_job_never_fired_runs_its_instant_missed_during_a_failover(
    world: World, schedule: str, first: int
) -> None:
    """Created 3 s before the leader died; the next leader takes over 8 s
    later. The first instant passed while no server led: it runs once."""
    world.now = T0 - timedelta(seconds=3)
    world.add_job("j", schedule)
    world.now = T0 + timedelta(seconds=8)
    world.lead()
    assert world.run_due() == [T0 + timedelta(seconds=first)]
    assert world.run_due() == []


def test_a_job_applied_after_the_new_leader_started_catches_up_too(
    world: World,
) -> None:
    """The write was committed under the old leader but applied here only
    after this node began to lead (Raft applies old entries once the new
    leader commits one of its own term)."""
    world.now = T0 + timedelta(seconds=8)
    world.lead()
    world.now = T0 - timedelta(seconds=3)
    world.add_job("j", "@every 10s")  # stamped by the old leader at -3 s
    world.now = T0 + timedelta(seconds=9)
    world.scheduler._load(world.store.get_job("j"), changed=True)  # type: ignore[arg-type]
    assert world.run_due() == [T0 + timedelta(seconds=7)]


def test_a_job_created_while_leading_starts_from_now(world: World) -> None:
    """A write stamped after this node began to lead is planned from the
    moment the leader sees it, whatever the proposing server's clock said."""
    world.lead()
    world.now = T0 + timedelta(seconds=20)
    world.add_job("j", "@every 10s")
    job = world.store.get_job("j")
    assert job is not None
    job.schedule_since = T0 + timedelta(seconds=5)  # a server 15 s behind
    world.scheduler._load(job, changed=True)
    assert world.run_due() == []
    assert world.scheduler.next_fire("j") == T0 + timedelta(seconds=30)


def test_a_never_fired_instant_older_than_the_window_is_skipped(world: World) -> None:
    world.add_job("j", f"@at {format_time(T0 + timedelta(seconds=5))}")
    world.now = T0 + timedelta(seconds=66)  # 61 s late, the window is 60 s
    world.lead()
    assert world.run_due() == []
    assert world.scheduler.next_fire("j") is None


def test_an_at_job_moved_to_a_new_instant_after_it_ran_runs_again(
    world: World,
) -> None:
    world.add_job("once", f"@at {format_time(T0 + timedelta(seconds=5))}")
    world.record_fire("once", T0 + timedelta(seconds=5))
    world.now = T0 + timedelta(seconds=10)
    world.add_job("once", f"@at {format_time(T0 + timedelta(seconds=20))}")
    world.lead()
    assert world.scheduler.next_fire("once") == T0 + timedelta(seconds=20)
    world.add_job("once", f"@at {format_time(T0 + timedelta(seconds=20))}")
    world.record_fire("once", T0 + timedelta(seconds=20))
    world.now = T0 + timedelta(seconds=30)
    world.lead()  # an edit that kept the schedule does not arm it again
    assert world.scheduler.next_fire("once") is None


def test_a_one_shot_job_that_ran_late_is_not_armed_again_by_enabling_it(
    world: World,
) -> None:
    """Enabling sets schedule_since, but a one-shot job whose instant ran
    stays done: an @after run late within its grace would run again."""
    world.add_job("once", f"@after {format_time(T0)} <PT1H")
    late = T0 + timedelta(minutes=5)
    world.record_fire("once", late)  # a late start within the grace
    world.now = late + timedelta(minutes=1)
    assert world.apply("set_disabled", name="once", disabled=True).ok
    at = format_time(world.now)
    assert world.apply("set_disabled", name="once", disabled=False, at=at).ok
    world.lead()
    assert world.scheduler.next_fire("once") is None
    assert world.run_due() == []
