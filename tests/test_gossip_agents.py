"""The gossip mesh between real agent processes on 127.0.0.x loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import REPO, AgentProcess, free_port

KEY_A = "bm90LWEtcmVhbC1rZXktYnV0LTMyLWJ5dGVzLWxvbmc="  # 32 bytes
KEY_B = "YW5vdGhlci0zMi1ieXRlLWtleS1mb3ItdGhlLXRlc3Q="  # 32 bytes


def statuses(node: AgentProcess) -> dict[str, str]:
    return {m["Name"]: m["statusText"] for m in node.http.get("/v1/members").json()}


def start_mesh(agent_factory: Any, size: int, *extra: str) -> list[AgentProcess]:
    nodes: list[AgentProcess] = []
    for i in range(1, size + 1):
        node = agent_factory(*extra, name=f"a{i}", server=False, start=False)
        # 127.0.0.2 .. : each agent on an address of its own.
        node.gossip_addr = f"127.0.0.{i + 1}:{node.gossip_port}"
        node.extra += ["--bind-addr", node.gossip_addr]
        if nodes:
            node.extra += ["--join", nodes[0].gossip_addr]
        node.start()
        nodes.append(node)
    return nodes


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cronmesh", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def test_members_see_each_other_and_a_killed_one_fails(agent_factory: Any) -> None:
    nodes = start_mesh(agent_factory, 5, "--encrypt", KEY_A)
    everyone = {f"a{i}": "alive" for i in range(1, 6)}
    for node in nodes:
        node.wait_for("all alive", lambda n=node: statuses(n) == everyone, 20)
    addresses = {m["Name"]: m["Addr"] for m in nodes[0].http.get("/v1/members").json()}
    assert addresses == {f"a{i}": f"127.0.0.{i + 1}" for i in range(1, 6)}
    nodes[3].kill9()
    # The local profile's bound: suspicion timeout for 5 members plus probing.
    for node in nodes[:3] + nodes[4:]:
        node.wait_for("a4 failed", lambda n=node: statuses(n)["a4"] == "failed", 30)
    assert nodes[2].stop() == 0
    for node in nodes[:2]:
        node.wait_for("a3 left", lambda n=node: statuses(n)["a3"] == "left", 20)
    # A mesh without servers: no leader takes these agents' heartbeats, and
    # their /health says so (they could get no run).
    nodes[0].wait_for(
        "health without a leader",
        lambda: nodes[0].http.get("/health").status_code == 503,
        20,
    )
    (issue,) = nodes[0].http.get("/health").json()["issues"]
    assert issue.startswith("no leader reached for")


def test_wrong_key_is_not_admitted_and_rotation_needs_no_downtime(
    agent_factory: Any,
) -> None:
    nodes = start_mesh(agent_factory, 2, "--encrypt", KEY_A)
    outsider = agent_factory(
        "--encrypt",
        KEY_B,
        "--join",
        nodes[0].gossip_addr,
        name="intruder",
        server=False,
        start=False,
    )
    outsider.start(wait=False)
    assert outsider.proc is not None and outsider.proc.wait(30) == 1
    assert "no member answered" in outsider.log()
    assert "cannot decrypt" in outsider.log() and "--encrypt" in outsider.log()
    assert set(statuses(nodes[0])) == {"a1", "a2"}
    # Rotate A -> B on both nodes while they run.
    for step in (("install", KEY_B), ("use", KEY_B), ("remove", KEY_A)):
        for node in nodes:
            result = cli("keyring", step[0], step[1], "--data-dir", str(node.data_dir))
            assert result.returncode == 0, result.stderr
            assert node.proc is not None
            node.proc.send_signal(signal.SIGHUP)
            node.wait_for("reloaded", lambda n=node: "keyring reloaded" in n.log())
    listed = json.loads(
        cli("keyring", "list", "--json", "--data-dir", str(nodes[0].data_dir)).stdout
    )
    assert listed["keys"] == [KEY_B]
    newcomer = agent_factory(
        "--encrypt", KEY_B, "--join", nodes[0].gossip_addr, name="b3", server=False
    )
    newcomer.wait_for(
        "joined with the new key",
        lambda: statuses(newcomer) == {"a1": "alive", "a2": "alive", "b3": "alive"},
        20,
    )


def test_sighup_tag_change_reaches_every_member(
    agent_factory: Any, tmp_path: Path
) -> None:
    config = tmp_path / "a1.json"
    config.write_text(json.dumps({"tags": {"role": "web"}}))
    nodes = start_mesh(agent_factory, 3)
    first = nodes[0]
    assert first.stop() == 0
    first.extra += ["--config", str(config)]
    first.start()
    for node in nodes:
        node.wait_for(
            "role=web", lambda n=node: _tags(n, "a1").get("role") == "web", 20
        )
    config.write_text(json.dumps({"tags": {"role": "worker", "zone": "b"}}))
    assert first.proc is not None
    os.kill(first.proc.pid, signal.SIGHUP)
    for node in nodes:
        node.wait_for(
            "new tags everywhere",
            lambda n=node: (
                (_tags(n, "a1").get("role"), _tags(n, "a1").get("zone"))
                == ("worker", "b")
            ),
            15,
        )


def _tags(node: AgentProcess, name: str) -> dict[str, str]:
    for member in node.http.get("/v1/members").json():
        if member["Name"] == name:
            return dict(member["Tags"])
    return {}


def test_retry_join_gives_up_naming_the_address(agent_factory: Any) -> None:
    dead = f"127.0.0.1:{free_port()}"
    node = agent_factory(
        "--retry-join",
        dead,
        "--retry-interval",
        "0.2",
        "--retry-max",
        "3",
        server=False,
        start=False,
    )
    node.start(wait=False)
    assert node.proc is not None and node.proc.wait(60) == 1
    assert dead in node.log()
