"""`cronmesh doctor` against real agents and against broken data dirs."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from conftest import AgentProcess, free_port, shell_job
from test_cluster import leader_of, start_cluster
from typer.testing import CliRunner

from cronmesh.cli.main import app


def doctor(*args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(app, ["doctor", "--json", *args])
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    assert report["ok"] is (result.exit_code == 0)
    return result.exit_code, report


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for check in report["checks"]:
        # A check that fails more than once (two agents) keeps its worst.
        if check["name"] not in found or check["status"] == "fail":
            found[check["name"]] = check
    return found


def addresses(nodes: list[AgentProcess]) -> list[str]:
    return [arg for node in nodes for arg in ("--address", node.url)]


def test_doctor_on_a_cluster_names_a_dead_peer_and_the_fix(
    agent_factory: Any,
) -> None:
    nodes = start_cluster(agent_factory)
    leader = leader_of(nodes)
    assert leader.post_job(shell_job("j", "true")).status_code == 201
    code, report = doctor(*addresses(nodes), "--data-dir", str(leader.data_dir))
    checks = by_name(report)
    assert code == 0, report
    assert str(leader.proc.pid) in checks["data dir lock"]["message"]
    assert "1 jobs" in checks["data dir lmdb"]["message"]
    assert checks["ports"]["status"] == "ok"
    assert checks["clock skew"]["status"] == "ok"
    assert "3 peers answer" in checks["raft peers"]["message"]
    assert checks["gossip key"]["status"] == "warn"
    assert "cronmesh keygen" in checks["gossip key"]["fix"]

    victim = next(n for n in nodes if n is not leader)
    victim.kill9()
    survivors = [n for n in nodes if n is not victim]
    code, report = doctor(*addresses(survivors))
    peers = by_name(report)["raft peers"]
    assert code == 1 and peers["status"] == "fail"
    assert victim.name in peers["message"]
    assert f"remove-peer --peer-id {victim.name}" in peers["fix"]
    # The same victim asked directly: the agent check fails.
    code, report = doctor("--address", victim.url)
    assert code == 1 and by_name(report)["agent"]["status"] == "fail"

    # Removed while the mesh still saw it alive, the leader would add it back.
    leader.wait_for(
        f"{victim.name} seen failed",
        lambda: any(
            m["Name"] == victim.name and m["statusText"] == "failed"
            for m in leader.http.get("/v1/members").json()
        ),
        timeout=30,
    )
    removed = leader.http.delete(f"/v1/raft/peers/{victim.name}")
    assert removed.status_code == 200, removed.text
    for node in survivors:
        node.wait_for(
            f"{node.name} applied the removal",
            lambda n=node: (
                victim.name
                not in {r["ID"] for r in n.http.get("/v1/raft/peers").json()}
            ),
        )
    code, report = doctor(*addresses(survivors))
    assert code == 0, [c for c in report["checks"] if c["status"] == "fail"]
    assert "2 peers answer" in by_name(report)["raft peers"]["message"]


def test_doctor_on_broken_data_dirs_and_taken_ports(
    agent_factory: Any, tmp_path: Path
) -> None:
    node = agent_factory(name="d1")
    assert node.post_job(shell_job("kept", "true")).status_code == 201
    assert node.stop() == 0
    nobody = f"127.0.0.1:{free_port()}"  # no agent answers here
    ports = [
        "--http-addr",
        f"127.0.0.1:{free_port()}",
        "--bind-addr",
        f"127.0.0.1:{free_port()}",
        "--rpc-port",
        str(free_port()),
    ]

    # A stopped agent's data dir is fine; only the agent itself is missing.
    code, report = doctor("--address", nobody, "--data-dir", str(node.data_dir), *ports)
    checks = by_name(report)
    assert code == 1 and checks["agent"]["status"] == "fail"
    assert checks["data dir lock"]["message"].startswith("not locked")
    assert "1 jobs" in checks["data dir lmdb"]["message"]
    assert checks["ports"]["status"] == "ok"

    # LMDB overwritten with garbage.
    broken = tmp_path / "broken"
    shutil.copytree(node.data_dir, broken)
    (broken / "state" / "data.mdb").write_bytes(b"not an lmdb file" * 64)
    code, report = doctor("--address", nobody, "--data-dir", str(broken), *ports)
    lmdb_check = by_name(report)["data dir lmdb"]
    assert code == 1 and lmdb_check["status"] == "fail"
    assert "cannot be read" in lmdb_check["message"] and lmdb_check["fix"]

    # A data dir that is a file, one that is missing.
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    code, report = doctor("--address", nobody, "--data-dir", str(not_dir), *ports)
    assert by_name(report)["data dir"]["status"] == "fail"
    code, report = doctor("--address", nobody, "--data-dir", str(tmp_path / "no"))
    assert "does not exist" in by_name(report)["data dir"]["message"]

    # The lock held by a process that is no agent at --address, and the
    # HTTP port taken by another program.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    http_port = taken.getsockname()[1]
    fd = os.open(node.data_dir / "LOCK", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, b"4242\n", 0)
        code, report = doctor(
            "--address",
            nobody,
            "--data-dir",
            str(node.data_dir),
            *ports[2:],
            "--http-addr",
            f"127.0.0.1:{http_port}",
        )
    finally:
        os.close(fd)
        taken.close()
    checks = by_name(report)
    assert checks["data dir lock"]["status"] == "warn"
    assert "pid 4242" in checks["data dir lock"]["message"]
    assert checks["ports"]["status"] == "fail"
    assert f":{http_port}" in checks["ports"]["message"]
    assert "--http-addr" in checks["ports"]["fix"]


def test_doctor_refuses_bad_flags_with_exit_2() -> None:
    result = CliRunner().invoke(app, ["doctor", "--http-addr", "x:y"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "--http-addr" in result.stderr
