"""Hand-overs, draining servers and failover liveness (issue 5), with real
processes: 3 servers and 2 worker agents as tests/test_distributed.py starts
them, one mesh for the module. The tests run in file order; the failover
test restarts what it kills, and the draining test stops a server for good,
so it comes last.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import AgentProcess, shell_job, start_run
from test_break_distributed import execution, kill_pid_in, read_pid
from test_distributed import by_name, leader_of, start_mesh, stop_all, ts

from cronmesh.rpc import agent_pb2, agent_pb2_grpc

# Short, so a lost run is failed quickly; long enough for a loaded machine.
EXECUTION_TIMEOUT = 12


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AgentProcess]]:
    nodes = start_mesh(
        tmp_path_factory.mktemp("handover-mesh"),
        "--execution-timeout",
        str(EXECUTION_TIMEOUT),
        "--shutdown-grace",
        "30",
    )
    yield nodes
    stop_all(nodes)


def agent_run(node: AgentProcess, job: dict[str, Any], run: dict[str, Any]) -> Any:
    """gRPC AgentRun on `node`, as a leader hands an execution over."""
    with grpc.insecure_channel(f"127.0.0.1:{node.rpc_port}") as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        return stub.AgentRun(
            agent_pb2.RunRequest(
                job=json.dumps(job).encode(), execution=json.dumps(run).encode()
            ),
            timeout=10,
        )


def test_a_repeated_hand_over_starts_nothing_twice(
    mesh: list[AgentProcess], tmp_path: Path
) -> None:
    s1, w1 = mesh[0], by_name(mesh, "w1")
    marks = tmp_path / "marks"
    script = f"echo start >> {marks}; sleep 3; echo end >> {marks}"
    exec_id = start_run(s1, "handed-twice", script, "w1")
    s1.wait_for("the run started", lambda: marks.exists())
    stored_job = s1.http.get("/v1/jobs/handed-twice").json()
    run = execution(s1, "handed-twice", exec_id)
    # The leader's answer was lost and it asks again: the agent has it.
    again = agent_run(w1, stored_job, run)
    assert (again.accepted, again.state) == (True, "running"), again
    done = s1.finished("handed-twice")[0]
    assert done["success"] is True, done
    # Asked once more after the result was delivered (and left the outbox).
    time.sleep(1.5)
    late = agent_run(w1, stored_job, run)
    assert (late.accepted, late.state) == (True, "done"), late
    time.sleep(1)
    assert marks.read_text().splitlines() == ["start", "end"]
    assert [e["id"] for e in s1.executions("handed-twice")] == [exec_id]


def member_status(node: AgentProcess, name: str) -> str:
    for member in node.http.get("/v1/members").json():
        if member["Name"] == name:
            return str(member["statusText"])
    return "unknown"


def elected_at(node: AgentProcess) -> float:
    """When `node` last became leader, from its log (UTC epoch seconds)."""
    lines = [line for line in node.log().splitlines() if "became leader" in line]
    assert lines, node.log()
    return ts(lines[-1].split()[0]).timestamp()


def test_after_a_failover_a_dead_agent_s_run_fails_within_the_timeout(
    mesh: list[AgentProcess], tmp_path: Path
) -> None:
    """kill -9 of the leader and of the agent running a job, together."""
    servers, w1 = mesh[:3], by_name(mesh, "w1")
    leader = leader_of(servers)
    pid_file = tmp_path / "pid"
    script = f"echo $$ > {pid_file}; exec sleep 60"
    exec_id = start_run(leader, "orphaned", script, "w1")
    try:
        read_pid(pid_file, leader)
        leader.kill9()
        w1.kill9()
        new_leader = leader_of([n for n in servers if n is not leader])

        def ended() -> dict[str, Any]:
            found = execution(new_leader, "orphaned", exec_id)
            return found if found.get("finished_at") else {}

        found = new_leader.wait_for("the run failed", ended, EXECUTION_TIMEOUT + 10)
        assert found["success"] is False
        assert "[cronmesh] failed: agent w1" in found["output"], found["output"]
        # At the latest one sweep (1 s) after --execution-timeout from the
        # election; 1 s more for a loaded machine.
        delay = ts(found["finished_at"]).timestamp() - elected_at(new_leader)
        assert 0 < delay < EXECUTION_TIMEOUT + 2, (delay, found["output"])
    finally:
        kill_pid_in(pid_file)
        for node in (w1, leader):
            node.start(wait=False)
        for node in (w1, leader):
            node.wait_ready(timeout=60)
        leader.wait_for(
            "5 alive members",
            lambda: [member_status(leader, n.name) for n in mesh] == ["alive"] * 5,
            30,
        )


def test_a_draining_server_is_not_picked(
    mesh: list[AgentProcess], tmp_path: Path
) -> None:
    servers = mesh[:3]
    leader = leader_of(servers)
    draining = next(n for n in servers if n is not leader)
    pid_file = tmp_path / "pid"
    # A run that keeps the server draining (it waits for it on SIGTERM).
    busy = shell_job(
        "keeps-draining",
        f"echo $$ > {pid_file}; exec sleep 40",
        tags={"port": str(draining.rpc_port)},
        config={"shell": "true"},
    )
    assert leader.post_job(busy).status_code == 201
    assert leader.http.post("/v1/jobs/keeps-draining/run").status_code == 202
    try:
        read_pid(pid_file, leader)
        assert draining.proc is not None
        draining.proc.send_signal(signal.SIGTERM)
        leader.wait_for(
            f"{draining.name} announces it drains",
            lambda: any(
                m["Name"] == draining.name and m["Tags"].get("draining") == "true"
                for m in leader.http.get("/v1/members").json()
            ),
        )
        for name, tags in (("two-servers", "true:2"), ("all-servers", "true")):
            job = shell_job(name, "echo ok", tags={"server": tags})
            assert leader.post_job(job).status_code == 201
            for _ in range(4):
                run = leader.http.post(f"/v1/jobs/{name}/run")
                assert run.status_code == 202, run.text
            runs = leader.finished(name, count=8)
            # Every run went to the two servers that take runs, never to
            # the draining one (which would refuse: "not run").
            assert all(r["success"] for r in runs), runs
            assert Counter(r["node_name"] for r in runs) == Counter(
                {n.name: 4 for n in servers if n is not draining}
            )
    finally:
        kill_pid_in(pid_file)
    # Its last run ended (killed above): the draining server stops cleanly.
    assert draining.stop() == 0, draining.log()
