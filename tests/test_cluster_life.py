"""A cluster's life with real processes: identity, names, remove-peer, health."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO, AgentProcess, shell_job
from test_cluster import job_names, leader_of, peers, start_cluster

from cronmesh.agent import _raise_for
from cronmesh.cluster import Cluster
from cronmesh.core.commitlog import NotLeaderError
from cronmesh.core.fsm import ApplyResult, StateMachine, encode_command
from cronmesh.errors import (
    ConflictError,
    NotFoundError,
    RemoteError,
    StorageError,
    UnavailableError,
    ValidationError,
)
from cronmesh.rpc import raft_pb2
from cronmesh.storage.env import DataDir
from cronmesh.storage.state import StateStore


def raft_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cronmesh", "raft", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def statuses(node: AgentProcess) -> dict[str, str]:
    return {m["Name"]: m["statusText"] for m in node.http.get("/v1/members").json()}


def test_two_clusters_in_one_mesh_stay_apart(agent_factory: Any) -> None:
    a = agent_factory(name="a1", start=False)
    b = agent_factory(name="b1", start=False)
    for node in (a, b):
        node.start(wait=False)
    for node in (a, b):
        node.wait_ready(timeout=60)
    assert a.post_job(shell_job("job-a", "true")).status_code == 201
    assert b.post_job(shell_job("job-b", "true")).status_code == 201
    # b1 comes back (with its state) joining a1's mesh.
    assert b.stop() == 0
    b.extra += ["--join", a.gossip_addr]
    b.start(wait=False).wait_ready(timeout=60)
    a.wait_for("one mesh", lambda: statuses(a) == {"a1": "alive", "b1": "alive"})
    for node, other in ((a, "b1"), (b, "a1")):
        node.wait_for(
            "the other cluster noticed",
            lambda n=node, o=other: (
                f"server {o} in the mesh belongs to cluster" in n.log()
            ),
        )
    assert [r["ID"] for r in peers(a)] == ["a1"]
    assert [r["ID"] for r in peers(b)] == ["b1"]
    assert a.post_job(shell_job("job-a2", "true")).status_code == 201
    assert b.post_job(shell_job("job-b2", "true")).status_code == 201
    assert job_names(a) == {"job-a", "job-a2"}
    assert job_names(b) == {"job-b", "job-b2"}
    # A job for every node runs on this cluster's nodes only.
    assert a.http.post("/v1/jobs/job-a/run").status_code == 202
    a.finished("job-a")
    assert {e["node_name"] for e in a.executions("job-a")} == {"a1"}
    for node in (a, b):
        assert node.http.get("/health").status_code == 200
        assert "InvariantViolation" not in node.log()
    tags = {m["Name"]: m["Tags"]["cluster"] for m in a.http.get("/v1/members").json()}
    assert tags["a1"] and tags["b1"] and tags["a1"] != tags["b1"]


def test_a_duplicate_node_name_is_refused(agent_factory: Any, tmp_path: Path) -> None:
    first = agent_factory(name="twin", start=False)
    first.start(wait=False).wait_ready(timeout=60)
    second = agent_factory(
        "--join",
        first.gossip_addr,
        name="twin",
        data_dir=tmp_path / "second",
        start=False,
    )
    second.start(wait=False)
    assert second.proc is not None and second.proc.wait(30) != 0
    assert "already has this name" in second.log()
    assert first.gossip_addr in second.log()
    first.wait_for("the conflict logged", lambda: "name conflict" in first.log())
    members = first.http.get("/v1/members").json()
    assert [(m["Name"], m["Port"]) for m in members] == [("twin", first.gossip_port)]
    assert first.http.get("/health").status_code == 200


def test_remove_peer_through_a_follower_and_health_without_a_leader(
    agent_factory: Any,
) -> None:
    nodes = start_cluster(agent_factory)
    leader = leader_of(nodes)
    follower, doomed = [n for n in nodes if n is not leader]
    assert follower.http.get("/health").json()["status"] == "healthy"

    # A live server is refused: reconcile would add it back at once.
    alive = raft_cli("remove-peer", "--peer-id", doomed.name, "--address", follower.url)
    assert alive.returncode == 1
    assert "alive" in alive.stderr, alive.stderr

    doomed.kill9()
    leader.wait_for(
        "the mesh saw it fail", lambda: statuses(leader)[doomed.name] == "failed", 30
    )
    follower.wait_for(
        "the follower saw it fail",
        lambda: statuses(follower)[doomed.name] == "failed",
        30,
    )
    removed = raft_cli(
        "remove-peer", "--peer-id", doomed.name, "--address", follower.url
    )
    assert removed.returncode == 0, removed.stderr
    assert {r["ID"] for r in peers(leader)} == {leader.name, follower.name}
    missing = raft_cli("remove-peer", "--peer-id", "nobody", "--address", follower.url)
    assert missing.returncode == 1 and "not a member" in missing.stderr

    # Two voters left; without the second one there is no leader.
    follower.kill9()
    leader.wait_for(
        "health reports the lost leader",
        lambda: leader.http.get("/health").status_code == 503,
        30,
    )
    health = leader.http.get("/health").json()
    assert health["status"] == "unhealthy" and health["leader"] is False
    assert any("no raft leader" in issue for issue in health["issues"])
    listed = raft_cli("list-peers", "--address", leader.url)
    assert listed.returncode == 0, listed.stderr
    assert "no leader" in listed.stderr and leader.name in listed.stdout


def test_a_server_waiting_to_bootstrap_says_so(agent_factory: Any) -> None:
    """Before the first configuration: the peers list, a write and doctor
    name what the server waits for (not a 500, not "a majority is down")."""
    lone = agent_factory("--bootstrap-expect", "3", name="lone", start=False)
    lone.start(wait=False)

    def answers() -> bool:
        try:
            return lone.http.get("/health").status_code == 503
        except httpx.HTTPError:
            return False

    lone.wait_for("the API to answer", answers)
    peers_answer = lone.http.get("/v1/raft/peers")
    assert peers_answer.status_code == 503, peers_answer.text
    assert (
        "waiting for servers to bootstrap: 1 of 3 seen" in peers_answer.json()["error"]
    )
    write = lone.post_job(shell_job("early", "true"))
    assert write.status_code == 503, write.text
    assert "no leader yet: waiting for servers to bootstrap" in write.json()["error"]
    listed = raft_cli("list-peers", "--address", lone.url)
    assert listed.returncode == 1
    assert "waiting for servers to bootstrap" in listed.stderr, listed.stderr
    assert "Traceback" not in lone.log()
    doctor = subprocess.run(
        [sys.executable, "-m", "cronmesh", "doctor", "--address", lone.url],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert "cannot list the Raft peers: no raft configuration yet" in doctor.stdout


# -- in process: the transport refuses another cluster's messages -------------


def test_the_transport_refuses_messages_of_another_cluster(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = DataDir(tmp_path / "data")
    mesh = {"s2": "c-one"}
    cluster = Cluster(
        "s1",
        data,
        StateMachine(StateStore(data)),
        ("127.0.0.1", 0),
        lambda: {"s2": "127.0.0.1:1"},
        identities=lambda: dict(mesh),
    )
    received: list[object] = []
    cluster.transport.on_message = received.append

    def message(sender: str, cluster_id: str) -> raft_pb2.RaftMessage:
        return raft_pb2.RaftMessage(
            **{"from": sender, "payload": b"\x00"}, cluster_id=cluster_id
        )

    # Fresh: a cluster nobody in the mesh shows is refused.
    with pytest.raises(RemoteError, match="no server in the mesh shows"):
        cluster.transport._receive(message("x9", "c-two"))
    assert cluster.cluster_id == ""
    # The mesh's cluster is joined on the first message (undecodable here).
    with pytest.raises(RemoteError, match="undecodable"):
        cluster.transport._receive(message("s2", "c-one"))
    assert cluster.cluster_id == "c-one"
    with caplog.at_level(logging.WARNING, logger="cronmesh.cluster"):
        with pytest.raises(RemoteError, match="belongs to cluster c-two"):
            cluster.transport._receive(message("x9", "c-two"))
    assert "refused raft messages from another cluster" in caplog.text
    assert cluster.transport.refused == 2 and received == []
    assert cluster.foreign_messages() == 2
    # Nothing is sent to a server of another cluster.
    mesh["s2"] = "c-two"
    cluster._identities_cache = (-1.0, {})
    assert cluster._resolve("s2") is None
    data.close()
    again = DataDir(tmp_path / "data")
    assert (
        Cluster(
            "s1", again, StateMachine(StateStore(again)), ("127.0.0.1", 0), dict
        ).cluster_id
        == "c-one"
    ), "the adopted id is durable"
    again.close()


def test_a_forwarded_write_keeps_the_kind_of_the_leaders_refusal(
    tmp_path: Path,
) -> None:
    """The leader's Propose answered every refusal but "too large" as a
    redirect, so the forwarding server reported "not the leader" instead of
    the real 404/409/503; and a redirect naming no leader was taken for a
    success. s2 forwards to s1's handler; s1's proposal raises."""
    servers, dirs = {}, []
    for name in ("s1", "s2"):
        data = DataDir(tmp_path / name)
        dirs.append(data)
        servers[name] = Cluster(
            name, data, StateMachine(StateStore(data)), ("127.0.0.1", 0), dict
        )
    s1, s2 = servers["s1"], servers["s2"]
    refusal: list[Exception] = []

    async def refuse(command: bytes) -> ApplyResult:
        raise refusal[0]

    s1.driver.is_leader = lambda: True  # type: ignore[method-assign]
    s1.driver.leader = "s1"
    s1.driver.propose = refuse  # type: ignore[method-assign]
    s2.driver.leader = "s1"
    s2.driver.forward = lambda peer, command: s1._on_propose(command)
    cases: list[tuple[Exception, type[Exception]]] = [
        (NotFoundError("job 'x' not found"), NotFoundError),
        (ConflictError("job 'x' is running"), ConflictError),
        (ValidationError("command: too large"), ValidationError),
        (StorageError("raft stopped: disk full"), UnavailableError),
        (NotLeaderError("s3"), NotLeaderError),  # a redirect, still
    ]
    for error, kind in cases:
        refusal[:] = [error]

        async def forward() -> None:
            _raise_for(await s2.driver.propose(encode_command("noop")))

        with pytest.raises(kind) as caught:
            asyncio.run(forward())
        assert kind is NotLeaderError or str(caught.value) == str(error)
    # s1 lost the lead and knows no leader: the write was not taken.
    s1.driver.is_leader = lambda: False  # type: ignore[method-assign]
    s1.driver.leader = None
    with pytest.raises(NotLeaderError):
        asyncio.run(s2.driver.propose(encode_command("noop")))
    for data in dirs:
        data.close()
