"""The pure rules behind hand-overs (issue 5): unanswered hand-overs, the
FSM's verdict rule, draining nodes, a new leader's liveness clocks."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cronmesh.core import dispatcher as dispatcher_module
from cronmesh.core.commitlog import LocalLog
from cronmesh.core.dispatcher import Dispatcher
from cronmesh.core.fsm import StateMachine, encode_command
from cronmesh.core.liveness import VERDICT_HANDOVER, LivenessWatch
from cronmesh.core.model import STATUS_SUCCESS, Execution, Job
from cronmesh.core.runner import Runner
from cronmesh.core.targets import Candidate, select_targets
from cronmesh.errors import CronmeshError, RunRefusedError, TransportError
from cronmesh.storage.env import DataDir
from cronmesh.storage.state import StateStore

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _run(node: str, started: float = 0) -> Execution:
    return Execution(
        job_name="j",
        started_at=T0 + timedelta(seconds=started),
        node_name=node,
        group=1,
    )


def test_heartbeats_without_an_unanswered_run_say_it_never_started() -> None:
    watch = LivenessWatch(timeout=30, heartbeat=3)
    watch.lead(now=0)
    lost, kept = _run("w1"), _run("w1", 1)
    watch.handover_unanswered(lost.id, "w1")
    watch.handover_unanswered(kept.id, "w1")
    assert watch.verdict(lost.id) == VERDICT_HANDOVER
    watch.beat("w2", [], now=1)  # another node's heartbeat says nothing
    watch.beat("w1", [], now=2)  # may have left before the hand-over
    assert watch.overdue([lost, kept], {"w1": "alive"}, now=2) == []
    watch.beat("w1", [kept.id], now=5)  # the agent has this one after all
    late = watch.overdue([lost, kept], {"w1": "alive"}, now=5)
    assert [(e.id, "never started on w1" in why) for e, why in late] == [
        (lost.id, True)
    ]
    assert watch.verdict(kept.id) == ""
    # Settled: the kept run is watched as any other.
    assert watch.overdue([kept], {"w1": "alive"}, now=34) == []
    assert [e.id for e, _ in watch.overdue([kept], {"w1": "alive"}, now=35)] == [
        kept.id
    ]


def test_a_new_leader_counts_from_its_election_or_from_when_the_node_went() -> None:
    watch = LivenessWatch(timeout=30, heartbeat=3)
    watch.lead(now=100)
    alive, dead_long, dead_now = _run("w1"), _run("w2", 1), _run("w3", 2)
    status = {"w1": "alive", "w2": "failed", "w3": "failed"}
    gone = {"w2": 80.0, "w3": 100.5}
    runs = [alive, dead_long, dead_now]
    # First sweep, a second after the election: w2 was gone long before.
    first = watch.overdue(runs, status, now=101, gone_since=gone)
    assert [e.node_name for e, _ in first] == ["w2"]
    runs.remove(dead_long)
    # w3 went after the election: two heartbeat periods from the election.
    assert watch.overdue(runs, status, now=105.5, gone_since=gone) == []
    late = watch.overdue(runs, status, now=106, gone_since=gone)
    assert [e.node_name for e, _ in late] == ["w3"]
    # The live-looking node: a full timeout from the election, not from
    # the first sweep a second later.
    assert [e.node_name for e, _ in watch.overdue([alive], status, 130, gone)] == ["w1"]


def test_a_node_heard_from_after_it_went_is_not_judged_from_then() -> None:
    watch = LivenessWatch(timeout=30, heartbeat=3)
    watch.lead(now=100)
    run = _run("w1")
    watch.heard([run.id], now=101)
    status = {"w1": "left"}
    assert watch.overdue([run], status, now=103, gone_since={"w1": 50.0}) == []
    assert watch.overdue([run], status, now=107, gone_since={"w1": 50.0}) != []


def test_draining_nodes_are_never_picked_and_counts_pick_among_the_rest() -> None:
    def node(name: str, **tags: str) -> Candidate:
        return Candidate(name, {"region": "global", "role": "worker", **tags})

    members = [node("w1", draining="true"), node("w2"), node("w3"), node("w4")]
    for seed in range(30):
        rng = random.Random(seed)
        names, _ = select_targets({"role": "worker:3"}, "global", members, rng)
        assert names == ["w2", "w3", "w4"]
    names, _ = select_targets({"role": "worker"}, "global", members, random.Random())
    assert names == ["w2", "w3", "w4"]
    names, why = select_targets({}, "global", members[:1], random.Random())
    assert names == [] and "no alive node" in why


@pytest.fixture
def fsm(tmp_path: Path) -> Iterator[StateMachine]:
    data = DataDir(tmp_path / "d")
    machine = StateMachine(StateStore(data))
    job = Job.from_json(
        {"name": "j", "executor": "shell", "executor_config": {"command": "true"}}
    )
    apply(machine, "set_job", job=job.to_json())
    yield machine
    data.close()


def apply(machine: StateMachine, op: str, **fields: object) -> int:
    index = machine.store.applied_index() + 1
    return machine.apply_batch([(index, encode_command(op, **fields))])[0].code


def done(run: Execution, success: bool, verdict: str = "", at: int = 5) -> dict:
    ended = Execution.from_json(run.to_json())
    ended.finished_at = T0 + timedelta(seconds=at)
    ended.success = success
    ended.verdict = verdict
    ended.output = "verdict" if verdict else "agent"
    return ended.to_json()


def test_the_agents_report_replaces_a_hand_over_verdict_once(
    fsm: StateMachine,
) -> None:
    run = _run("w1")
    assert apply(fsm, "execution_started", executions=[run.to_json()]) == 200
    verdict = done(run, False, VERDICT_HANDOVER)
    assert apply(fsm, "execution_done", execution=verdict) == 200
    assert fsm.store.get_job("j").error_count == 1  # type: ignore[union-attr]
    # Another leader's verdict never replaces anything.
    assert apply(fsm, "execution_done", execution=verdict) == 208
    assert apply(fsm, "execution_done", execution=done(run, True)) == 200
    stored = fsm.store.get_execution("j", run.id)
    assert stored is not None
    assert (stored.success, stored.verdict, stored.output) == (True, "", "agent")
    job = fsm.store.get_job("j")
    assert job is not None
    assert (job.success_count, job.error_count, job.status) == (1, 0, STATUS_SUCCESS)
    # The agent's result is final: a repeat or a stale report changes nothing.
    assert apply(fsm, "execution_done", execution=done(run, False)) == 208
    assert apply(fsm, "execution_done", execution=verdict) == 208
    stored = fsm.store.get_execution("j", run.id)
    assert stored is not None and stored.success is True


def test_a_verdict_never_replaces_an_agents_result(fsm: StateMachine) -> None:
    run = _run("w1")
    assert apply(fsm, "execution_started", executions=[run.to_json()]) == 200
    assert apply(fsm, "execution_done", execution=done(run, True)) == 200
    late = done(run, False, VERDICT_HANDOVER, at=9)
    assert apply(fsm, "execution_done", execution=late) == 208
    stored = fsm.store.get_execution("j", run.id)
    assert stored is not None and (stored.success, stored.verdict) == (True, "")


@pytest.mark.parametrize(
    ("error", "kept_running", "verdict"),
    [
        (CronmeshError("agent at x unreachable: DEADLINE_EXCEEDED"), True, ""),
        (TransportError("agent at x unreachable: UNAVAILABLE"), False, "handover"),
        (RunRefusedError("agent at x refused the run: stopping"), False, ""),
    ],
)
def test_only_a_hand_over_that_may_have_arrived_is_left_running(
    fsm: StateMachine,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    kept_running: bool,
    verdict: str,
) -> None:
    monkeypatch.setattr(dispatcher_module, "DISPATCH_PAUSE", 0)

    async def scenario() -> tuple[list[Execution], int, Execution | None]:
        log = LocalLog(fsm)
        runner = Runner("s1", log, max_output=1000)
        dispatcher = Dispatcher("s1", fsm.store, log, runner)
        dispatcher.members = lambda: [Candidate("w1", {"region": "global"})]
        calls = 0
        unanswered: list[Execution] = []

        async def send_run(
            node: str, job: Job, execution: Execution, start_in: float = 0.0
        ) -> None:
            nonlocal calls
            calls += 1
            raise error

        dispatcher.send_run = send_run
        dispatcher.on_unanswered = unanswered.append
        outcome = await dispatcher.fire("j", trigger="manual")
        assert outcome.execution is not None
        for _ in range(50):
            await asyncio.sleep(0.01)
        stored = fsm.store.get_execution("j", outcome.execution.id)
        return unanswered, calls, stored

    unanswered, calls, stored = asyncio.run(scenario())
    assert stored is not None
    assert stored.running is kept_running
    assert stored.verdict == verdict
    if kept_running:
        assert [e.id for e in unanswered] == [stored.id]
        assert calls == dispatcher_module.DISPATCH_ATTEMPTS
    else:
        assert unanswered == []
        assert stored.output == f"[cronmesh] not run: {error}\n"
        refused = isinstance(error, RunRefusedError)
        assert calls == (1 if refused else dispatcher_module.DISPATCH_ATTEMPTS)
