"""Fixtures that start real agents as separate processes on loopback."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_GIVEN: set[int] = set()
_PICK = random.Random(os.getpid())


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for TCP and UDP on `host`, below the ephemeral range.

    A port the kernel hands out for bind(0) comes from the range it also
    takes outgoing connections' local ports from; with dozens of gRPC and
    HTTP connections opening, one of them took such a port between the pick
    and the agent's bind ("Address already in use"). Ports below the range
    are never taken that way; each is handed out once per test session.
    """
    top = _ephemeral_low() - 1
    for _ in range(500):
        port = _PICK.randint(10_000, top)
        if port in _GIVEN:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                tcp.bind((host, port))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.bind((host, port))
        except OSError:
            continue
        _GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port below {top + 1} on {host}")


def cases_dir() -> Path:
    override = os.environ.get("CRONMESH_CASES_DIR")
    return Path(override) if override else REPO.parent / "shared" / "cases"


class AgentProcess:
    """A `cronmesh agent` child process with its own data dir and port."""

    def __init__(
        self,
        data_dir: Path,
        *extra: str,
        name: str = "node1",
        server: bool = True,
        env: dict[str, str] | None = None,
    ) -> None:
        self.server = server
        self.env = env  # extra environment variables of the agent
        self.data_dir = data_dir
        self.name = name
        self.extra = list(extra)
        self.port = free_port()
        self.rpc_port = free_port()
        self.gossip_port = free_port()
        self.gossip_addr = f"127.0.0.1:{self.gossip_port}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"{name}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def start(self, wait: bool = True) -> AgentProcess:
        cmd = [
            sys.executable,
            "-m",
            "cronmesh",
            "agent",
            *(["--server"] if self.server else []),
            "--data-dir",
            str(self.data_dir),
            "--node-name",
            self.name,
            "--http-addr",
            f"127.0.0.1:{self.port}",
            "--bind-addr",
            f"127.0.0.1:{self.gossip_port}",
            "--profile",
            "local",
            "--rpc-port",
            str(self.rpc_port),
            *self.extra,
        ]
        log = self.log_path.open("ab")
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=REPO, env=env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited: {self.log()}")
            try:
                # A lone server can take writes once it has elected itself;
                # an agent without --server serves once it has joined.
                path = "/v1/leader" if self.server else "/health"
                if self.http.get(path).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"agent not ready: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)

    # -- HTTP helpers
    def post_job(self, job: dict[str, Any], **params: str) -> httpx.Response:
        return self.http.post("/v1/jobs", json=job, params=params)

    def executions(self, job: str) -> list[dict[str, Any]]:
        response = self.http.get(f"/v1/jobs/{job}/executions")
        assert response.status_code == 200, response.text
        return list(response.json())

    def wait_for(self, what: str, predicate: Any, timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(0.1)
        raise AssertionError(
            f"timed out waiting for {what}; last={last!r}\n{self.log()}"
        )

    def finished(
        self, job: str, count: int = 1, timeout: float = 20
    ) -> list[dict[str, Any]]:
        def done() -> list[dict[str, Any]] | None:
            found = [e for e in self.executions(job) if e["finished_at"]]
            return found if len(found) >= count else None

        return list(
            self.wait_for(f"{count} finished executions of {job}", done, timeout)
        )


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[AgentProcess] = []

    def make(
        *extra: str,
        name: str = "node1",
        data_dir: Path | None = None,
        start: bool = True,
        server: bool = True,
        env: dict[str, str] | None = None,
    ) -> AgentProcess:
        node = AgentProcess(
            data_dir or tmp_path / f"data-{name}",
            *extra,
            name=name,
            server=server,
            env=env,
        )
        started.append(node)
        return node.start() if start else node

    yield make
    for node in started:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(5)


@pytest.fixture
def agent(agent_factory: Any) -> AgentProcess:
    return agent_factory()  # type: ignore[no-any-return]


def shell_job(
    name: str, command: str, schedule: str = "@manually", **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "schedule": schedule,
        "executor": "shell",
        "executor_config": {"command": command, **extra.pop("config", {})},
        **extra,
    }


def start_run(node: AgentProcess, name: str, script: str, node_tag: str) -> str:
    """Create job `name` running `script` through the shell on the agent whose
    `id` tag is `node_tag`, run it now through `node`; its execution id."""
    job = shell_job(name, script, tags={"id": node_tag}, config={"shell": "true"})
    assert node.post_job(job).status_code == 201
    run = node.http.post(f"/v1/jobs/{name}/run")
    assert run.status_code == 202, run.text
    return str(run.headers["X-Execution-Id"])
