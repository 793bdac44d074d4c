"""The pure rules of distributed execution: targets, liveness, run records."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cronmesh.core.dispatcher import job_retry_delay, retry_backoff
from cronmesh.core.fsm import StateMachine, encode_command
from cronmesh.core.liveness import LivenessWatch
from cronmesh.core.model import Execution, Job
from cronmesh.core.targets import Candidate, parse_tags, select_targets
from cronmesh.storage.env import DataDir
from cronmesh.storage.outbox import Outbox
from cronmesh.storage.state import StateStore

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def members() -> list[Candidate]:
    def node(name: str, status: str = "alive", **tags: str) -> Candidate:
        return Candidate(name, {"region": "global", **tags}, status)

    return [
        node("s1", role="dkron"),
        node("w1", role="worker", zone="a"),
        node("w2", role="worker", zone="b"),
        node("w3", role="worker", zone="a"),
        node("w4", "failed", role="worker", zone="a"),
        Candidate("far", {"region": "eu", "role": "worker"}),
    ]


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ({}, {"s1", "w1", "w2", "w3"}),
        ({"role": "worker"}, {"w1", "w2", "w3"}),
        ({"role": "worker", "zone": "a"}, {"w1", "w3"}),
        ({"zone": "c"}, set()),
    ],
)
def test_every_alive_node_of_the_region_that_matches(
    tags: dict[str, str], expected: set[str]
) -> None:
    names, why = select_targets(tags, "global", members(), random.Random(1))
    assert set(names) == expected
    assert bool(why) == (not expected)


def test_a_count_picks_that_many_at_random_the_smallest_count_wins() -> None:
    seen: set[tuple[str, ...]] = set()
    for seed in range(40):
        names, _ = select_targets(
            {"role": "worker:2", "zone": "a:1"},
            "global",
            members(),
            random.Random(seed),
        )
        assert len(names) == 1 and names[0] in {"w1", "w3"}
        seen.add(tuple(names))
    assert len(seen) == 2, "the choice never varies"
    names, _ = select_targets(
        {"role": "worker:9"}, "global", members(), random.Random()
    )
    assert set(names) == {"w1", "w2", "w3"}


def test_no_target_says_why() -> None:
    _, why = select_targets({"role": "gpu"}, "global", members(), random.Random())
    assert "role=gpu" in why
    _, why = select_targets({}, "mars", members(), random.Random())
    assert "region 'mars'" in why
    _, why = select_targets({"role": "worker:0"}, "global", members(), random.Random())
    assert "0 nodes" in why
    assert parse_tags({"a": "x:3", "b": "y"}) == ({"a": "x", "b": "y"}, 3)


def _run(exec_id_node: str, started: float = 0) -> Execution:
    return Execution(
        job_name="j",
        started_at=T0 + timedelta(seconds=started),
        node_name=exec_id_node,
        group=1,
    )


def test_liveness_fails_silent_runs_after_the_timeout_and_gone_nodes_sooner() -> None:
    watch = LivenessWatch(timeout=30, heartbeat=3)
    watch.lead(now=100)
    quiet, gone, fine = _run("w1"), _run("w2", 1), _run("w3", 2)
    status = {"w1": "alive", "w2": "failed", "w3": "alive"}
    assert watch.overdue([quiet, gone, fine], status, now=105) == []
    watch.heard([fine.id], now=105)
    late = watch.overdue([quiet, gone, fine], status, now=112)
    assert [(e.node_name, "failed" in why) for e, why in late] == [("w2", True)]
    watch.heard([fine.id], now=125)
    late = watch.overdue([quiet, fine], status, now=136)
    assert [e.node_name for e, _ in late] == ["w1"]
    # A new leader counts from its election, not from the run's start.
    watch.lead(now=500)
    assert watch.overdue([fine], status, now=501) == []
    assert [e.id for e, _ in watch.overdue([fine], status, now=531)] == [fine.id]


def test_a_run_record_holds_every_target_and_guards_fire_and_parent(
    tmp_path: Path,
) -> None:
    data = DataDir(tmp_path / "d")
    store = StateStore(data)
    fsm = StateMachine(store)
    job = Job.from_json(
        {"name": "j", "executor": "shell", "executor_config": {"command": "true"}}
    )
    index = iter(range(1, 100))
    assert fsm.apply_batch(
        [(next(index), encode_command("set_job", job=job.to_json()))]
    )[0].ok
    group = [
        Execution(job_name="j", started_at=T0, node_name=n, group=7) for n in ("a", "b")
    ]

    def start(**extra: object) -> int:
        cmd = encode_command(
            "execution_started", executions=[e.to_json() for e in group], **extra
        )
        return fsm.apply_batch([(next(index), cmd)])[0].code

    assert start(fire="2026-03-01T00:00:00Z", forbid=True) == 200
    assert {e.node_name for e in store.running("j")} == {"a", "b"}
    assert start(fire="2026-03-01T00:00:00Z") == 409  # the same instant again
    assert start(forbid=True) == 409  # still running
    group = [
        Execution(
            job_name="j", started_at=T0 + timedelta(seconds=1), node_name="a", group=8
        )
    ]
    assert start(parent={"job": "p", "group": 5}) == 200
    group = [
        Execution(
            job_name="j", started_at=T0 + timedelta(seconds=2), node_name="a", group=9
        )
    ]
    assert start(parent={"job": "p", "group": 5}) == 409  # once per parent group
    data.close()


def test_the_outbox_keeps_records_across_a_reopen(tmp_path: Path) -> None:
    async def scenario() -> None:
        data = DataDir(tmp_path / "d")
        box = Outbox(data)
        running, done = _run("me"), _run("me", 1)
        await asyncio.gather(
            box.put_running(running, {"name": "j"}),
            box.put_running(done, {"name": "j"}),
        )
        done.finished_at, done.success = T0, True
        await box.put_done(done)
        box.close()
        data.close()
        data = DataDir(tmp_path / "d")
        box = Outbox(data)
        records = {r.execution.id: r for r in box.records()}
        box.close()
        assert records[running.id].done is False and records[running.id].job
        assert records[done.id].done is True and records[done.id].execution.success
        box = Outbox(data)
        await box.remove(done.id)
        assert [r.execution.id for r in box.records()] == [running.id]
        box.close()
        data.close()

    asyncio.run(scenario())


def test_retry_backoff_doubles_up_to_the_jobs_max() -> None:
    job = Job.from_json({"name": "j", "retry_backoff": {"initial": "2s", "max": "5s"}})
    assert [job_retry_delay(job, a, 0) for a in (1, 2, 3, 4)] == [2, 4, 5, 5]
    plain = Job.from_json({"name": "j"})
    assert job_retry_delay(plain, 2, 3.0) == retry_backoff(2, 3.0)
