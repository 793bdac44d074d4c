"""Adversarial reproductions against this session's distributed execution:
the leader's overload guard, the agents' report pipeline, hand-overs.

Real `cronmesh agent` processes on loopback (3 servers and 2 worker agents,
tests/test_distributed.py's start_mesh), one mesh for the module. A test of
a defect that is not fixed is marked xfail(strict=True): it fails the day
the defect is gone, until its mark is removed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess, shell_job
from test_distributed import by_name, start_mesh, stop_all

from cronmesh.core.admission import WindowSettings
from cronmesh.core.commitlog import MAX_COMMAND_BYTES
from cronmesh.core.fsm import ApplyResult, StateMachine, encode_command
from cronmesh.core.model import Execution, format_time
from cronmesh.core.runner import Runner
from cronmesh.core.scheduler import Scheduler
from cronmesh.errors import ValidationError
from cronmesh.storage.env import DataDir
from cronmesh.storage.state import StateStore

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AgentProcess]]:
    nodes = start_mesh(tmp_path_factory.mktemp("break3-mesh"))
    yield nodes
    stop_all(nodes)


def unfinished(node: AgentProcess, jobs: list[str]) -> list[str]:
    """The jobs among `jobs` whose run `node` does not have as finished."""
    return [
        job for job in jobs if not [e for e in node.executions(job) if e["finished_at"]]
    ]


def test_results_whose_output_escapes_to_more_bytes_are_all_reported(
    mesh: list[AgentProcess], tmp_path: Path
) -> None:
    """A report batch is cut at MAX_REPORT_BYTES characters of output, but
    the command that carries it is JSON with every non-ASCII or control
    character escaped (six bytes for one), and Raft refuses a command over
    MAX_COMMAND_BYTES (2 MiB). Two results of 256 kB of control characters
    each make a 3 MB batch: refused, retried forever, and the agent's
    pipeline (two batches in flight) stays blocked for every later result."""
    s1, w1 = mesh[0], by_name(mesh, "w1")
    go = tmp_path / "go"
    # 256,000 bytes of \x01 (max_output), each escaped as \u0001 in JSON.
    command = (
        f"while [ ! -e {go} ]; do sleep 0.05; done; "
        "head -c 256000 /dev/zero | tr '\\0' '\\1'"
    )
    big = [f"escaped-output-{i}" for i in range(6)]
    for name in big:
        job = shell_job(name, command, tags={"id": "w1"}, config={"shell": "true"})
        assert s1.post_job(job).status_code == 201
        assert s1.http.post(f"/v1/jobs/{name}/run").status_code == 202
    s1.wait_for(
        "every run started on w1",
        lambda: (
            len([b for b in s1.http.get("/v1/busy").json() if b["job_name"] in big])
            == len(big)
        ),
    )
    go.touch()  # they all end together: their reports queue up together
    # w1 waits: a time-out shows its log (the refused report).
    w1.wait_for("every big result reported", lambda: not unfinished(s1, big), 30)
    # The pipeline is free again: a small result after them arrives too.
    small = shell_job("after-escaped-output", "echo ok", tags={"id": "w1"})
    assert s1.post_job(small).status_code == 201
    assert s1.http.post("/v1/jobs/after-escaped-output/run").status_code == 202
    s1.finished("after-escaped-output", timeout=20)


class RecordingLog:
    """A commit log that refuses, as Raft does, a command over the limit."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    async def propose(self, payload: bytes) -> ApplyResult:
        if len(payload) > MAX_COMMAND_BYTES:
            raise ValidationError(f"command: {len(payload)} bytes")
        self.payloads.append(payload)
        return ApplyResult()


def test_a_result_too_large_for_one_command_is_reported_cut() -> None:
    """With a large --max-output, one result of control characters escapes
    to more than a Raft entry holds: it was retried for ever. It is cut
    (keeping its end) until it fits."""
    commit_log = RecordingLog()
    runner = Runner("n", commit_log, max_output=1_000_000)  # type: ignore[arg-type]
    execution = Execution(
        job_name="loud",
        started_at=T0,
        node_name="n",
        group=1,
        finished_at=T0,
        output="\x01" * 999_990 + "the end",
    )

    async def main() -> None:
        async with asyncio.timeout(10):
            await runner.report(execution)

    asyncio.run(main())
    [payload] = commit_log.payloads
    sent = json.loads(payload)["execution"]["output"]
    assert sent.endswith("the end") and len(sent) < 999_990


# -- the leader's overload guard: fires waiting for a place in the window --


class Leadership:
    """The part of a commit log the scheduler may ask: whether it leads."""

    def __init__(self) -> None:
        self.leading = True

    def is_leader(self) -> bool:
        return self.leading


class HeldDispatcher:
    """Fires hold their place in the window until `release` is set."""

    def __init__(self) -> None:
        self.started: list[tuple[str, datetime]] = []
        self.release = asyncio.Event()
        self.log = Leadership()

    async def fire(self, name: str, *, fire_at: datetime, trigger: str) -> object:
        self.started.append((name, fire_at))
        await self.release.wait()
        return type("Outcome", (), {"dispatches": ()})()


class OneSlot:
    """A state machine and a scheduler with a window of one fire, driven
    by hand at a fake wall clock (the scheduler hears the FSM's events)."""

    def __init__(self, tmp_path: Path) -> None:
        self.data = DataDir(tmp_path / "d")
        self.store = StateStore(self.data)
        self.fsm = StateMachine(self.store)
        self.now = T0
        self.dispatcher = HeldDispatcher()
        self.scheduler = Scheduler(
            self.store,
            self.dispatcher,  # type: ignore[arg-type]
            wall=lambda: self.now.timestamp(),
            window=WindowSettings(initial=1, floor=1, ceiling=1),
        )
        self.fsm.listeners.append(self.scheduler.on_event)
        self.scheduler.leading = self.dispatcher.log.is_leader

    def apply(self, op: str, **fields: Any) -> None:
        index = self.store.applied_index() + 1
        result = self.fsm.apply_batch([(index, encode_command(op, **fields))])[0]
        assert result.ok, result.error

    def set_job(self, name: str, schedule: str) -> None:
        job = {
            "name": name,
            "schedule": schedule,
            "executor": "shell",
            "executor_config": {"command": "true"},
        }
        self.apply("set_job", job=job, at=format_time(self.now))

    def at(self, seconds: float) -> None:
        self.now = T0 + timedelta(seconds=seconds)
        self.scheduler._fire_due(self.now.timestamp())

    async def start(self) -> None:
        # The events reach a running scheduler only; its timing task is not
        # needed here (the test moves the clock), so a stand-in holds its place.
        self.scheduler._task = asyncio.create_task(asyncio.Event().wait())
        self.scheduler.lead_start = self.now
        for job in self.store.list_jobs():
            self.scheduler._load(job)  # as Scheduler.start() does

    async def finish(self) -> None:
        self.dispatcher.release.set()
        for _ in range(20):
            await asyncio.sleep(0)
        await self.scheduler.stop()
        self.data.close()


def test_a_waiting_fire_does_not_run_a_job_deleted_and_created_again(
    tmp_path: Path,
) -> None:
    """A fire waits for the window; meanwhile its job is deleted and a job
    of the same name created that runs manually only. The old job's waiting
    instant must not run the new job (nor any job deleted meanwhile)."""
    mesh = OneSlot(tmp_path)

    async def main() -> None:
        mesh.set_job("a-holder", "@every 1s")
        mesh.set_job("b-victim", "@every 1s")
        await mesh.start()
        mesh.at(1)  # a-holder takes the only place; b-victim's +1 s waits
        await asyncio.sleep(0)
        assert mesh.dispatcher.started == [("a-holder", T0 + timedelta(seconds=1))]
        mesh.apply("delete_job", name="b-victim")
        mesh.set_job("b-victim", "@manually")
        await mesh.finish()

    asyncio.run(main())
    assert [name for name, _ in mesh.dispatcher.started] == ["a-holder"]


def test_a_waiting_fire_of_the_old_schedule_does_not_run_an_edited_job(
    tmp_path: Path,
) -> None:
    """An edited job starts from now on its new schedule (scheduler._load);
    an instant of its old schedule still waiting must not run it, or a job
    moved to one `@at` run runs twice."""
    mesh = OneSlot(tmp_path)
    later = T0 + timedelta(hours=1)

    async def main() -> None:
        mesh.set_job("a-holder", "@every 1s")
        mesh.set_job("b-edited", "@every 1s")
        await mesh.start()
        mesh.at(1)  # a-holder takes the only place; b-edited's +1 s waits
        mesh.set_job("b-edited", f"@at {later.isoformat()}")
        await mesh.finish()

    asyncio.run(main())
    assert [name for name, _ in mesh.dispatcher.started] == ["a-holder"]


def test_a_catch_up_burst_still_waiting_is_not_shed(tmp_path: Path) -> None:
    mesh = OneSlot(tmp_path)

    async def main() -> None:
        mesh.set_job("burst", "@every 10s")
        await mesh.start()
        mesh.at(35)  # late by 35 s: +10, +20, +30 come due in one turn
        mesh.at(41)  # +10 still holds the place; +40 comes due
        assert mesh.scheduler.shed == 0, mesh.scheduler._waiting
        await mesh.finish()

    asyncio.run(main())


def test_a_waiting_fire_does_not_start_after_the_lead_is_lost(tmp_path: Path) -> None:
    """Leadership is lost while a fire holds the window and another waits.
    The held fire ends (its proposal fails: not the leader) before the
    scheduler is stopped (the follow-up runs as a task of its own); the
    place it frees must not start the waiting fire on a node that no
    longer leads (a follower would forward it and hand its runs over)."""
    mesh = OneSlot(tmp_path)

    async def main() -> None:
        mesh.set_job("a-holder", "@every 1s")
        mesh.set_job("b-waiting", "@every 1s")
        await mesh.start()
        mesh.at(1)
        await asyncio.sleep(0)
        mesh.dispatcher.log.leading = False
        await mesh.finish()

    asyncio.run(main())
    assert [name for name, _ in mesh.dispatcher.started] == ["a-holder"]


def test_an_at_job_whose_instant_passes_during_a_failover_runs_late(
    tmp_path: Path,
) -> None:
    mesh = OneSlot(tmp_path)
    at = T0 + timedelta(seconds=5)

    async def main() -> None:
        mesh.set_job("one-shot", f"@at {at.isoformat()}")
        await mesh.start()  # the old leader, at T0
        await mesh.scheduler.stop()  # loses the lead at T0
        mesh.now = T0 + timedelta(seconds=8)
        await mesh.start()  # the new leader, 8 s later (catch-up: 60 s)
        mesh.at(8)
        await mesh.finish()

    asyncio.run(main())
    assert mesh.dispatcher.started == [("one-shot", at)]


# -- orphan clean-up at restart ------------------------------------------------


def test_orphan_search_never_picks_the_agents_own_process_group() -> None:
    """An agent started from a job (a job that restarts or upgrades the
    agent: `cronmesh agent ... &` in its script) inherits the job's
    CRONMESH_EXECUTION_ID, and the restarted agent finds that execution in
    its outbox as interrupted. Searching by environment must not take the
    agent's own group for the job's: stopping it would SIGTERM the agent
    itself. A child process in a session of its own plays the agent."""
    code = (
        "import json, os\n"
        "from cronmesh.core.orphans import find_orphans\n"
        "found = find_orphans([('exec-of-the-restart-job', None)])\n"
        "print(json.dumps({'own': os.getpgrp(), "
        "'found': [o.pgid for o in found]}))\n"
    )
    env = {**os.environ, "CRONMESH_EXECUTION_ID": "exec-of-the-restart-job"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=True,
        check=True,
    )
    seen = json.loads(done.stdout)
    assert seen["own"] not in seen["found"], seen


def test_a_forwarded_command_too_large_is_refused_not_redirected(
    mesh: list[AgentProcess],
) -> None:
    """The leader answered a proposal it refused as too large with no code,
    which callers read as "not the leader, ask another": the real error was
    lost and the caller went round the servers with it for ever."""
    import grpc
    from test_distributed import leader_of

    from cronmesh.rpc import raft_pb2, raft_pb2_grpc

    lead = leader_of(mesh[:3])
    host = lead.gossip_addr.rsplit(":", 1)[0]

    async def propose() -> raft_pb2.ProposeReply:
        async with grpc.aio.insecure_channel(f"{host}:{lead.rpc_port}") as channel:
            stub = raft_pb2_grpc.RaftStub(channel)
            command = encode_command("noop", pad="x" * (MAX_COMMAND_BYTES + 10))
            request = raft_pb2.ProposeRequest(command=command)
            return await stub.Propose(request, timeout=30)

    reply = asyncio.run(propose())
    assert reply.code == 400, reply
    assert "a Raft entry may hold" in reply.error
