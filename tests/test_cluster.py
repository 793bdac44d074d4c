"""Three real server processes on loopback agreeing through Raft."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from conftest import REPO, AgentProcess, shell_job


def start_cluster(agent_factory: Any, size: int = 3) -> list[AgentProcess]:
    """`size` servers that find each other through gossip (all join s1)."""
    nodes = [agent_factory(name=f"s{i}", start=False) for i in range(1, size + 1)]
    for node in nodes:
        node.extra += ["--bootstrap-expect", str(size)]
        if node is not nodes[0]:
            node.extra += [
                "--retry-join",
                nodes[0].gossip_addr,
                "--retry-interval",
                "0.5",
            ]
    for node in nodes:
        node.start(wait=False)
    for node in nodes:
        node.wait_ready(timeout=60)
    return nodes


def leader_of(nodes: list[AgentProcess], timeout: float = 20) -> AgentProcess:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in nodes:
            try:
                if node.http.get("/v1/isleader").status_code == 200:
                    return node
            except Exception:  # a node that is starting or dead
                pass
        time.sleep(0.1)
    raise AssertionError("no leader elected")


def peers(node: AgentProcess) -> list[dict[str, Any]]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cronmesh",
            "raft",
            "list-peers",
            "--json",
            "--address",
            node.url,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def job_names(node: AgentProcess) -> set[str]:
    return {j["name"] for j in node.http.get("/v1/jobs").json()}


def test_jobs_survive_the_leader_kill_and_the_old_leader_catches_up(
    agent_factory: Any,
) -> None:
    nodes = start_cluster(agent_factory)
    leader = leader_of(nodes)
    rows = peers(leader)
    assert {r["ID"] for r in rows} == {"s1", "s2", "s3"}
    assert [r["ID"] for r in rows if r["State"] == "leader"] == [leader.name]
    assert all(r["Voter"] for r in rows)

    # Writes through every server; followers forward to the leader.
    for i in range(100):
        node = nodes[i % 3]
        response = node.post_job(shell_job(f"job-{i:03d}", "true", "@manually"))
        assert response.status_code == 201, (node.name, response.text)
    assert (
        leader.post_job(shell_job("tick", "echo tick", "@every 1s")).status_code == 201
    )
    follower = next(n for n in nodes if n is not leader)
    consistent = follower.http.get("/v1/jobs/tick", params={"consistent": ""})
    assert consistent.status_code == 200, "a consistent read saw an old state"
    for node in nodes:
        node.wait_for("all jobs replicated", lambda n=node: len(job_names(n)) == 101)

    leader.finished("tick", count=2, timeout=20)
    leader.kill9()
    survivors = [n for n in nodes if n is not leader]
    new_leader = leader_of(survivors, timeout=20)
    assert new_leader is not leader
    for i in range(100, 110):
        node = survivors[i % 2]
        response = node.post_job(shell_job(f"job-{i:03d}", "true", "@manually"))
        assert response.status_code == 201, response.text
    tick_before = len(new_leader.executions("tick"))
    new_leader.wait_for(
        "tick runs on the new leader",
        lambda: len(new_leader.executions("tick")) >= tick_before + 2,
    )

    leader.start()
    leader.wait_for("old leader caught up", lambda: len(job_names(leader)) == 111, 60)
    rows = {r["ID"]: r for r in peers(new_leader)}
    assert rows[leader.name]["State"] == "follower" and rows[leader.name]["Voter"]
    assert rows[new_leader.name]["State"] == "leader"
    runs = new_leader.executions("tick")
    # No tags: every server runs each fire, once.
    instants = Counter((r["scheduled_at"], r["node_name"]) for r in runs)
    assert max(instants.values()) == 1, "a fire instant ran twice across the failover"


def test_no_writes_without_a_majority(agent_factory: Any) -> None:
    nodes = start_cluster(agent_factory)
    leader = leader_of(nodes)
    followers = [n for n in nodes if n is not leader]
    for node in followers:
        node.kill9()
    # Check-quorum makes the lone leader step down; writes are refused.
    leader.wait_for(
        "leader steps down",
        lambda: leader.http.get("/v1/isleader").status_code == 404,
        20,
    )
    response = leader.post_job(shell_job("lonely", "true"))
    assert response.status_code == 503
    assert "leader" in response.json()["error"]


def test_a_new_server_is_promoted_and_a_leaving_one_removed(agent_factory: Any) -> None:
    nodes = start_cluster(agent_factory)
    leader = leader_of(nodes)
    # Named to sort first: with the three it makes "bootstrap-expect 3"
    # fresh-looking names, but it must join the existing cluster.
    fourth = agent_factory(
        "--bootstrap-expect", "3", "--join", nodes[0].gossip_addr, name="s0"
    )
    leader.wait_for(
        "s0 promoted to voter",
        lambda: any(r["ID"] == "s0" and r["Voter"] for r in peers(leader)),
        30,
    )
    assert "raft bootstrapped" not in fourth.log()
    assert fourth.http.get("/v1/leader").json()["Name"] == leader.name
    members = {
        m["Name"]: m["statusText"] for m in leader.http.get("/v1/members").json()
    }
    assert members == {"s0": "alive", "s1": "alive", "s2": "alive", "s3": "alive"}
    assert fourth.stop() == 0
    leader = leader_of(nodes)
    leader.wait_for(
        "s0 removed from Raft", lambda: "s0" not in {r["ID"] for r in peers(leader)}, 30
    )
    assert leader.wait_for(
        "s0 left",
        lambda: (
            {
                m["Name"]: m["statusText"]
                for m in leader.http.get("/v1/members").json()
            }.get("s0")
            == "left"
        ),
    )


def test_recover_a_cluster_that_lost_its_quorum(
    agent_factory: Any, tmp_path: Any
) -> None:
    nodes = start_cluster(agent_factory)
    leader = leader_of(nodes)
    assert leader.post_job(shell_job("kept", "true")).status_code == 201
    for node in nodes:
        node.wait_for("replicated", lambda n=node: "kept" in job_names(n))
    survivor = next(n for n in nodes if n is not leader)
    for node in nodes:
        node.kill9()
    peers_file = tmp_path / "peers.json"
    peers_file.write_text(json.dumps([survivor.name]))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cronmesh",
            "raft",
            "recover",
            "--peers",
            str(peers_file),
            "--data-dir",
            str(survivor.data_dir),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    survivor.start()
    assert leader_of([survivor]) is survivor
    assert "kept" in job_names(survivor)
    assert survivor.post_job(shell_job("after", "true")).status_code == 201
    assert [r["ID"] for r in peers(survivor)] == [survivor.name]


def test_a_leader_stopped_gracefully_hands_over_first(agent_factory: Any) -> None:
    nodes = start_cluster(agent_factory)
    leader = leader_of(nodes)
    assert leader.stop() == 0
    assert "leadership handed over" in leader.log()
    survivors = [n for n in nodes if n is not leader]
    new_leader = leader_of(survivors, timeout=5)
    assert new_leader.post_job(shell_job("after-handover", "true")).status_code == 201


def test_first_instants_that_pass_while_no_server_leads_run_late(
    agent_factory: Any,
) -> None:
    """Two jobs are created, then the leader dies and a second server is
    paused, so no server leads while the jobs' first instants pass. The
    leader elected afterwards runs each missed instant once, late (within
    the 60 s catch-up window), instead of planning the jobs from the moment
    it took over: the instant they were created is replicated state."""
    nodes = start_cluster(agent_factory)
    leader = leader_of(nodes)
    at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    for job in (
        shell_job("late-at", "true", f"@at {at.isoformat()}"),
        shell_job("late-every", "true", "@every 2s"),
    ):
        assert leader.post_job(job).status_code == 201
    since = datetime.fromisoformat(
        leader.http.get("/v1/jobs/late-every").json()["schedule_since"]
    )
    leader.kill9()
    paused, alone = [n for n in nodes if n is not leader]
    assert paused.proc is not None
    paused.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()) + 1.5)
        assert alone.http.get("/v1/isleader").status_code == 404
    finally:
        paused.proc.send_signal(signal.SIGCONT)
    new_leader = leader_of([paused, alone], timeout=30)
    runs = new_leader.finished("late-at", timeout=30)
    assert {r["scheduled_at"] for r in runs} == {at.isoformat().replace("+00:00", "Z")}
    first = since.replace(microsecond=0) + timedelta(seconds=2)
    every = new_leader.finished("late-every", timeout=30)
    assert min(datetime.fromisoformat(r["scheduled_at"]) for r in every) == first


def test_servers_stopped_gracefully_log_nothing_alarming(agent_factory: Any) -> None:
    """SIGTERM to each server in turn, the leader first while a client
    follows the output of a run on another server through it: every log
    ends without errors or gRPC's "Aborting method ... due to server stop",
    and the follower gets a last line saying why its stream ended."""
    nodes = start_cluster(agent_factory)
    leader = leader_of(nodes)
    job = shell_job(
        "chatty", "echo begun; sleep 2; echo done", config={"shell": "true"}
    )
    assert leader.post_job(job).status_code == 201
    assert leader.http.post("/v1/jobs/chatty/run").status_code == 202
    elsewhere = leader.wait_for(
        "a run on another server",
        lambda: [
            e
            for e in leader.executions("chatty")
            if e["node_name"] != leader.name and e["finished_at"] is None
        ],
    )[0]
    path = f"/v1/jobs/chatty/executions/{elsewhere['id']}/output"
    with leader.http.stream("GET", path, params={"follow": "true"}) as response:
        assert response.status_code == 200
        chunks = response.iter_bytes()
        assert b"begun" in next(chunks)
        assert leader.stop() == 0
        told = b"".join(chunks).decode()
    assert f"[cronmesh] output stream ended: {leader.name} is stopping" in told
    for node in [n for n in nodes if n is not leader]:
        assert node.stop() == 0
    for node in nodes:
        alarming = [
            line
            for line in node.log().splitlines()
            if " ERROR " in line or "Aborting method" in line or "Traceback" in line
        ]
        assert alarming == [], (node.name, alarming)
