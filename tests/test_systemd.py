"""systemd's notify protocol and the agent's signals, on real agent processes.

The test plays systemd: it binds a unix datagram socket in tmp_path and
passes it as NOTIFY_SOCKET, the way a `Type=notify` unit does.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import json
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, AgentProcess, shell_job

from cronmesh.agent import AgentConfig
from cronmesh.systemd import (
    NOTIFY_VARIABLES,
    Notifier,
    Phase,
    monotonic_usec,
    notify_address,
)

UNIT = REPO / "contrib" / "systemd" / "cronmesh.service"


class NotifySocket:
    """systemd's end: a thread reads the agent's datagrams at once, as
    systemd does, and queues them with the sender's pid."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.received: queue.Queue[tuple[int, dict[str, str]]] = queue.Queue()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.received.put((pid, fields))

    def wait_for(self, key: str, timeout: float = 20) -> tuple[int, dict[str, str]]:
        """The next datagram that carries `key` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                got = self.received.get(timeout=left)
            except queue.Empty:
                break
            if key in got[1]:
                return got
        raise AssertionError(f"no {key} from the agent within {timeout}s")

    def drain(self, quiet: float = 0.5) -> list[dict[str, str]]:
        """Every datagram until none came for `quiet` seconds."""
        seen = []
        with contextlib.suppress(queue.Empty):
            while True:
                seen.append(self.received.get(timeout=quiet)[1])
        return seen

    def close(self) -> None:
        self._closed.set()
        self._reader.join()
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A NOTIFY_SOCKET that agents started by the test inherit."""
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "unix socket paths are limited to 107 bytes"
    listener = NotifySocket(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield listener
    listener.close()


# -- the protocol in-process


def test_notify_address_forms() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@cronmesh-test") == "\0cronmesh-test"
    assert notify_address("vsock:2:1234") is None
    assert notify_address("relative/path") is None


def test_variables_leave_the_environment_and_a_foreign_watchdog_is_ignored() -> None:
    env = {
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "1",  # not us
        "PATH": "/usr/bin",
    }
    notifier = Notifier.from_environ(env)
    assert env == {"PATH": "/usr/bin"}
    assert notifier.address == "/run/systemd/notify"
    assert notifier.watchdog_usec == 0
    assert Notifier.from_environ({"WATCHDOG_USEC": "30000000"}).watchdog_usec == 0


def test_abstract_socket_and_the_phases_in_order() -> None:
    name = f"cronmesh-test-{time.monotonic_ns()}"
    listener = NotifySocket("\0" + name)
    env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "80000"}
    notifier = Notifier.from_environ(env)
    try:
        assert notifier.watchdog_usec == 80000
        notifier.reloaded("too early")  # ignored: no reload began
        notifier.reloading()  # ignored: not ready yet
        notifier.ready("serving")
        notifier.ready("again")  # ignored
        notifier.reloading()
        notifier.reloaded("serving; reloaded")
        notifier.stopping()
        notifier.ready("late")  # ignored: stopping
        seen = listener.drain()
        assert [sorted(m) for m in seen] == [
            ["READY", "STATUS"],
            ["MONOTONIC_USEC", "RELOADING", "STATUS"],
            ["READY", "STATUS"],
            ["STATUS", "STOPPING"],
        ]
        assert seen[2]["STATUS"] == "serving; reloaded"
        assert notifier.phase is Phase.STOPPING
    finally:
        asyncio.run(notifier.close())
        listener.close()


# -- real agents


def test_ready_reload_watchdog_and_stop_of_a_real_agent(
    agent_factory: Any,
    notify_socket: NotifySocket,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"tags": {"team": "a"}}))
    node = agent_factory("--config", str(config), start=False)
    node.start(wait=False)
    pid, ready = notify_socket.wait_for("READY")
    # The API answers (503 until a leader is known: READY does not wait for
    # one, or a server waiting for its peers would never start).
    assert node.http.get("/health").json()["status"] in ("healthy", "unhealthy")
    assert pid == node.proc.pid  # the main process: NotifyAccess=main takes it
    assert ready["STATUS"].startswith("serving on 127.0.0.1:")

    # Reload applied: RELOADING=1 stamped with CLOCK_MONOTONIC, then READY=1.
    config.write_text(json.dumps({"tags": {"team": "b"}}))
    before = monotonic_usec()
    node.proc.send_signal(signal.SIGHUP)
    _, reloading = notify_socket.wait_for("RELOADING")
    assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
    _, reloaded = notify_socket.wait_for("READY")
    assert "reload failed" not in reloaded["STATUS"]
    assert node.http.get("/v1/members").json()[0]["Tags"]["team"] == "b"

    # Reload refused: systemd still hears READY=1, the status says why.
    config.write_text("{not json")
    node.proc.send_signal(signal.SIGHUP)
    notify_socket.wait_for("RELOADING")
    _, refused = notify_socket.wait_for("READY")
    assert "reload failed, old settings kept" in refused["STATUS"]
    assert node.http.get("/v1/members").json()[0]["Tags"]["team"] == "b"

    # Jobs see neither the socket nor the watchdog.
    node.wait_ready()
    node.post_job(shell_job("show-env", "env"))
    assert node.http.post("/v1/jobs/show-env/run").status_code == 202
    output = node.finished("show-env")[0]["output"]
    assert "CRONMESH_JOB_NAME=show-env" in output
    for name in NOTIFY_VARIABLES:
        assert f"{name}=" not in output

    pings = [notify_socket.wait_for("WATCHDOG", timeout=5) for _ in range(3)]
    assert {pid for pid, _ in pings} == {node.proc.pid}

    assert node.stop() == 0
    pid, stopping = notify_socket.wait_for("STOPPING", timeout=1)
    assert pid == node.proc.pid and stopping["STATUS"].startswith("stopping")


def test_sigterm_kills_a_job_at_the_grace_and_records_it_failed(
    agent_factory: Any,
) -> None:
    node = agent_factory("--shutdown-grace", "3")
    node.post_job(shell_job("long", "sleep 60"))
    node.http.post("/v1/jobs/long/run")
    node.wait_for("running", lambda: node.http.get("/v1/busy").json())
    node.proc.send_signal(signal.SIGTERM)
    node.wait_for("shutdown begun", lambda: "agent stopping" in node.log())
    refused = node.http.post("/v1/jobs/long/run")
    assert refused.status_code == 503
    assert "stopping" in refused.json()["error"]
    assert node.proc.wait(60) == 0
    node.start()
    runs = node.executions("long")
    assert len(runs) == 1 and runs[0]["success"] is False
    assert "shutdown grace of 3s ran out" in runs[0]["output"]


def _servers(agent_factory: Any, count: int, *extra: str) -> list[AgentProcess]:
    """`count` servers, each tagged box=<its name>, all joining the first."""
    nodes = []
    for i in range(1, count + 1):
        name = f"s{i}"
        node = agent_factory(
            "--bootstrap-expect",
            str(count),
            "--tag",
            f"box={name}",
            *extra,
            name=name,
            start=False,
        )
        if nodes:
            node.extra += [
                "--retry-join",
                nodes[0].gossip_addr,
                "--retry-interval",
                "0.5",
            ]
        nodes.append(node)
    for node in nodes:
        node.start(wait=False)
    for node in nodes:
        node.wait_ready(timeout=60)
    return nodes


def _leader(nodes: list[AgentProcess]) -> AgentProcess:
    def find() -> AgentProcess | None:
        return next(
            (n for n in nodes if n.http.get("/v1/isleader").status_code == 200), None
        )

    return nodes[0].wait_for("a leader", find)  # type: ignore[no-any-return]


def test_a_stopping_leader_hands_over_then_reports_its_run(agent_factory: Any) -> None:
    nodes = _servers(agent_factory, 3)
    leader = _leader(nodes)
    job = shell_job("here", "sleep 2; echo done", config={"shell": "true"})
    leader.post_job({**job, "tags": {"box": leader.name}})
    assert leader.http.post("/v1/jobs/here/run").status_code == 202
    leader.wait_for("running", lambda: leader.http.get("/v1/busy").json())
    assert leader.stop() == 0
    # Handed over first, then waited for the run, then left the mesh.
    log = leader.log()
    handed_over = log.index("leadership handed over")
    assert handed_over < log.index("waiting for running executions")
    assert log.index("waiting for running executions") < log.index("gossip left")
    survivor = next(n for n in nodes if n is not leader)
    runs = survivor.finished("here")
    assert runs[0]["success"] is True and runs[0]["node_name"] == leader.name
    assert "done" in runs[0]["output"]


def test_a_stopping_agent_leaves_the_mesh_first_and_still_reports_its_run(
    agent_factory: Any, tmp_path: Path
) -> None:
    server = agent_factory(name="s1")
    worker = agent_factory(
        "--tag", "box=w1", "--retry-join", server.gossip_addr, "--retry-interval",
        "0.5", name="w1", server=False,
    )  # fmt: skip

    def status_of_w1() -> str:
        members = server.http.get("/v1/members").json()
        return next((m["statusText"] for m in members if m["Name"] == "w1"), "")

    server.wait_for("w1 in the mesh", lambda: status_of_w1() == "alive")
    began = tmp_path / "began"
    job = shell_job(
        "on-worker", f"touch {began}; sleep 5; echo done", config={"shell": "true"}
    )
    server.post_job({**job, "tags": {"box": "w1"}})
    assert server.http.post("/v1/jobs/on-worker/run").status_code == 202
    server.wait_for("the job running on w1", began.exists)
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGTERM)
    server.wait_for(
        "w1 left while its run goes on",
        lambda: (
            status_of_w1() == "left"
            and not server.executions("on-worker")[0]["finished_at"]
        ),
    )
    assert worker.proc.wait(60) == 0
    runs = server.finished("on-worker")
    assert runs[0]["success"] is True and runs[0]["node_name"] == "w1"
    assert "done" in runs[0]["output"]


def test_sigterm_does_not_wait_the_grace_for_a_result_no_leader_takes(
    agent_factory: Any,
) -> None:
    first, second = _servers(agent_factory, 2, "--shutdown-grace", "600")
    created = first.post_job(shell_job("orphan", "true", tags={"box": first.name}))
    assert created.status_code == 201, created.text
    # Committed by the leader, maybe not applied here yet.
    first.wait_for("the job", lambda: first.http.get("/v1/jobs/orphan").is_success)
    started = first.http.post("/v1/jobs/orphan/run")
    assert started.status_code == 202, started.text
    second.kill9()  # no quorum: nobody commits the result
    first.wait_for("a failed report", lambda: "cannot report" in first.log())
    assert first.proc is not None
    first.proc.send_signal(signal.SIGTERM)
    # Waiting for the grace would take 600 s.
    assert first.proc.wait(60) == 0
    assert "not reported before stopping" in first.log()


def test_unit_file_stops_after_the_grace_and_spares_jobs_the_sigterm() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT)
    service = unit["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    # Only the agent gets SIGTERM; its jobs get the grace, then SIGKILL.
    assert service["KillMode"] == "mixed"
    stop_timeout = int(service["TimeoutStopSec"].rstrip("s"))
    assert stop_timeout > AgentConfig().shutdown_grace + 25
    assert "WatchdogSec" in service


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # Checked as installed: ExecStart= must name an executable that exists.
    cronmesh = Path(sys.executable).parent / "cronmesh"
    unit = tmp_path / "cronmesh.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/cronmesh", str(cronmesh)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stderr, result.stderr
