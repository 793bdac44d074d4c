"""The agent: one cronmesh node in one asyncio process.

It owns the data dir, the state machine and the log that feeds it, the
runner, and, while it leads, the dispatcher and scheduler; it serves the
HTTP API in the same event loop. `Agent` is also the facade the API calls:
the API validates nothing by itself and writes nothing directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import uvicorn

from cronmesh import __version__
from cronmesh.cluster import Cluster
from cronmesh.core.commitlog import CommandLog, LocalLog
from cronmesh.core.dispatcher import Dispatcher
from cronmesh.core.executors import get_executor
from cronmesh.core.executors.shell import install_pidfd_child_watcher
from cronmesh.core.fsm import ApplyResult, StateMachine, encode_command
from cronmesh.core.model import Execution, Job, format_time
from cronmesh.core.runner import Runner
from cronmesh.core.schedule import load_zone, parse_schedule
from cronmesh.core.scheduler import DEFAULT_CATCH_UP, Scheduler
from cronmesh.errors import (
    ConflictError,
    CronmeshError,
    NotFoundError,
    ValidationError,
)
from cronmesh.metrics import Metrics
from cronmesh.raft.driver import RaftSettings
from cronmesh.storage.env import DataDir
from cronmesh.storage.state import StateStore

__all__ = ["RESERVED_TAGS", "Agent", "AgentConfig", "parse_addr"]

# Tags the agent sets itself; `--tag` may not set them.
RESERVED_TAGS = ("dc", "region", "server", "rpc_addr", "port", "version", "expect")

log = logging.getLogger("cronmesh.agent")


def parse_addr(text: str, default_port: int, field_name: str) -> tuple[str, int]:
    """`host:port`, `:port` or `host` into (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, str(default_port)
    host = host.strip("[]") or "0.0.0.0"
    try:
        port = int(port_text)
    except ValueError as exc:
        raise ValidationError(
            f"{field_name}: {text!r} has no valid port", field_name
        ) from exc
    if not 0 <= port <= 65535:
        raise ValidationError(f"{field_name}: port {port} out of range", field_name)
    return host, port


@dataclass
class AgentConfig:
    """Settings of one agent (Dkron's names where Dkron has one)."""

    node_name: str = field(default_factory=socket.gethostname)
    data_dir: str = "cronmesh.data"
    server: bool = False
    bootstrap_expect: int = 0
    http_addr: str = "127.0.0.1:8080"
    bind_addr: str = "0.0.0.0:8946"
    rpc_port: int = 6868
    tags: dict[str, str] = field(default_factory=dict)
    log_level: str = "info"
    # Ours.
    max_executions: int = 100  # executions kept per job
    max_output: int = 256_000  # bytes of output kept per execution (the end)
    catch_up_window: float = DEFAULT_CATCH_UP  # seconds a missed fire may run late
    shutdown_grace: float = 30.0  # seconds running jobs get on SIGTERM
    region: str = "global"
    datacenter: str = "dc1"
    # Other servers as name -> host:rpc_port, until gossip finds them.
    peers: dict[str, str] = field(default_factory=dict)
    raft_tick: float = 0.05  # seconds; elections time out after 10-20 ticks


class Agent:
    """A running node; also the facade behind the HTTP API."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.node_name = config.node_name
        self.started_at = datetime.now(UTC)
        self.data = DataDir(config.data_dir)
        self.store = StateStore(self.data)
        self.fsm = StateMachine(
            self.store,
            max_executions=config.max_executions,
            max_output=config.max_output,
        )
        self.cluster: Cluster | None = None
        self.log: CommandLog
        if config.server:
            rpc_host, _ = parse_addr(config.bind_addr, 8946, "bind-addr")
            self.cluster = Cluster(
                self.node_name,
                self.data,
                self.fsm,
                (rpc_host, config.rpc_port),
                self.server_peers,
                bootstrap_expect=config.bootstrap_expect,
                settings=RaftSettings(tick=config.raft_tick),
            )
            self.cluster.driver.on_role.append(self._leadership_changed)
            self.log = self.cluster.driver
        else:
            # Limitation: until agents join a cluster (distributed execution),
            # an agent without --server keeps its own unreplicated log.
            self.log = LocalLog(self.fsm)
        self.runner = Runner(self.node_name, self.log, max_output=config.max_output)
        self.dispatcher = Dispatcher(self.node_name, self.store, self.log, self.runner)
        self.dispatcher.node_tags = lambda: self.tags
        self.scheduler = Scheduler(
            self.store, self.dispatcher, catch_up=config.catch_up_window
        )
        self.metrics = Metrics(self)
        self.fsm.listeners += [
            self.scheduler.on_event,
            self.dispatcher.on_event,
            self.metrics.on_event,
        ]
        self.paused = False
        self.http_host, self.http_port = parse_addr(config.http_addr, 8080, "http-addr")
        self._stop = asyncio.Event()
        self._server: uvicorn.Server | None = None
        self._background: set[asyncio.Task[object]] = set()

    # -- identity
    @property
    def tags(self) -> dict[str, str]:
        host, _ = parse_addr(self.config.bind_addr, 8946, "bind-addr")
        # `role` is Dkron's member marker, but users target jobs with it
        # (`"role": "worker:1"`), so a user's value wins; the rest are ours.
        return {
            "role": "dkron",
            **self.config.tags,
            "server": "true" if self.config.server else "false",
            "version": __version__,
            "dc": self.config.datacenter,
            "region": self.config.region,
            "rpc_addr": f"{host}:{self.config.rpc_port}",
            "port": str(self.config.rpc_port),
            "expect": str(self.config.bootstrap_expect),
        }

    def is_leader(self) -> bool:
        return self.log.is_leader()

    def problems(self) -> list[str]:
        """What keeps this node from working, for /health."""
        if self.cluster is not None and self.cluster.driver.broken:
            return [self.cluster.driver.broken]
        return []

    def leader_name(self) -> str | None:
        if self.cluster is None:
            return self.node_name
        return self.node_name if self.is_leader() else self.cluster.driver.leader

    def member(self, name: str | None = None) -> dict[str, Any]:
        """A node in the shape of Dkron's /v1/members entries (default: this one)."""
        host, port = parse_addr(self.config.bind_addr, 8946, "bind-addr")
        if name is not None and name != self.node_name:
            rpc = self.server_peers().get(name, "")
            host = rpc.rpartition(":")[0] or rpc
            tags = {"role": "dkron", "server": "true", "rpc_addr": rpc}
            return {
                "Id": name,
                "Name": name,
                "Addr": host,
                "Port": port,
                "Tags": tags,
                "Status": 1,
                "statusText": "alive",
            }
        return {
            "Id": self.node_name,
            "Name": self.node_name,
            "Addr": host,
            "Port": port,
            "Tags": self.tags,
            "Status": 1,
            "statusText": "alive",
            "ProtocolMin": 1,
            "ProtocolMax": 5,
            "ProtocolCur": 2,
            "DelegateMin": 2,
            "DelegateMax": 5,
            "DelegateCur": 4,
        }

    # -- jobs
    def validate_job(self, data: Any, *, keep_runtime: bool = False) -> Job:
        """Everything that can be checked without the stored state.

        Raises:
            ValidationError: names the field and what is wrong with it.
        """
        job = Job.from_json(data, keep_runtime=keep_runtime)
        if job.timezone:
            load_zone(job.timezone)
        if job.schedule or not job.parent_job:
            if not job.schedule:
                raise ValidationError(
                    "schedule: required (or set parent_job for a dependent job)",
                    "schedule",
                )
            parse_schedule(job.schedule, job.timezone, job.name)
        if not job.executor:
            raise ValidationError('executor: required (e.g. "shell")', "executor")
        get_executor(job.executor).validate(job.executor_config)
        return job

    async def set_job(self, data: Any, *, restore: bool = False) -> tuple[Job, bool]:
        """Validate and store a job; returns (job, created)."""
        job = self.validate_job(data, keep_runtime=restore)
        payload = {k: v for k, v in job.to_json().items()}
        result = await self.log.propose(
            encode_command("set_job", job=payload, restore=restore)
        )
        _raise_for(result)
        return _as_job(result.value), result.code == 201

    async def delete_job(self, name: str) -> Job:
        result = await self.log.propose(encode_command("delete_job", name=name))
        _raise_for(result)
        return _as_job(result.value)

    async def toggle_job(self, name: str) -> Job:
        job = self.get_job(name)
        result = await self.log.propose(
            encode_command("set_disabled", name=name, disabled=not job.disabled)
        )
        _raise_for(result)
        return _as_job(result.value)

    async def run_job(self, name: str) -> Execution | None:
        """Start a manual run; returns as soon as the run is recorded."""
        outcome = await self.dispatcher.fire(name, trigger="manual")
        return outcome.execution

    async def delete_executions(self, name: str) -> Job:
        result = await self.log.propose(encode_command("delete_executions", name=name))
        _raise_for(result)
        return _as_job(result.value)

    def get_job(self, name: str) -> Job:
        job = self.store.get_job(name)
        if job is None:
            raise NotFoundError(f"job {name!r} not found")
        return job

    def next_fire(self, job: Job) -> datetime | None:
        """The instant the job will really fire next (None: not scheduled).

        Fires before `starts_at` or after `expires_at` are skipped, so they
        are not `next` either.
        """
        if not job.schedule or job.disabled:
            return None
        try:
            schedule = parse_schedule(job.schedule, job.timezone, job.name)
        except CronmeshError:
            return None
        now = datetime.now(UTC)
        nxt = self.scheduler.next_fire(job.name) if self.scheduler.running else None
        if nxt is None and not self.scheduler.running:
            nxt = schedule.next_after(now)
        if nxt is not None and job.starts_at is not None and nxt < job.starts_at:
            nxt = schedule.next_after(job.starts_at - timedelta(microseconds=1))
        if nxt is not None and job.expires_at is not None and nxt > job.expires_at:
            return None
        return nxt

    def job_json(self, job: Job) -> dict[str, Any]:
        data = job.to_json()
        data["next"] = format_time(None if job.disabled else self.next_fire(job))
        return data

    def execution_json(
        self, execution: Execution, *, with_output: bool = True
    ) -> dict[str, Any]:
        data = execution.to_json(with_output=with_output)
        if with_output and execution.running:
            live = self.runner.output_of(execution.id)
            if live is not None:
                data["output"] = live
        return data

    def server_peers(self) -> dict[str, str]:
        """The other servers and their RPC addresses."""
        return dict(self.config.peers)

    def _leadership_changed(self, leading: bool) -> None:
        task = asyncio.create_task(self._lead() if leading else self._follow())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _lead(self) -> None:
        self.dispatcher.active = True
        if not self.scheduler.running:
            try:
                self.scheduler.start()
            except Exception:
                log.exception("scheduler failed to start node=%s", self.node_name)

    async def _follow(self) -> None:
        self.dispatcher.active = False
        await self.scheduler.stop()

    # -- life cycle
    async def recover_interrupted(self) -> int:
        """Mark this node's executions that a crash left running as failed.

        Retries until a leader takes the reports, so it may run for a while
        after a restart; runs in the background.
        """
        count = 0
        for execution in self.store.running():
            if (
                execution.node_name != self.node_name
                or execution.id in self.runner.live
            ):
                continue
            execution.finished_at = datetime.now(UTC)
            execution.success = False
            execution.output = (
                f"[cronmesh] interrupted: the agent stopped while this execution "
                f"ran; it restarted at {format_time(self.started_at)}\n"
            )
            await self.runner.report(execution)
            count += 1
        if count:
            log.info("marked interrupted executions failed count=%d", count)
        return count

    async def run(self) -> None:
        """Serve until `stop()` or a signal; then shut down gracefully."""
        loop = asyncio.get_running_loop()
        install_pidfd_child_watcher()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        server_task = await self._start_http()
        if self.cluster is not None:
            await self.cluster.start()
        else:
            self.scheduler.start()
        recovery = asyncio.create_task(self.recover_interrupted())
        self._background.add(recovery)
        recovery.add_done_callback(self._background.discard)
        log.info(
            "agent started node=%s http=%s:%d data_dir=%s pid=%d",
            self.node_name,
            self.http_host,
            self.http_port,
            self.config.data_dir,
            os.getpid(),
        )
        try:
            await self._stop.wait()
        finally:
            await self.shutdown(server_task)

    def _listen_http(self) -> socket.socket:
        """Bind the API's socket ourselves, so a bad address names the flag."""
        where = f"--http-addr {self.config.http_addr}"
        try:
            infos = socket.getaddrinfo(
                self.http_host, self.http_port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise CronmeshError(f"{where}: cannot resolve: {exc.strerror}") from exc
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            sock.listen(512)
        except OSError as exc:
            sock.close()
            raise CronmeshError(f"{where}: cannot listen: {exc.strerror}") from exc
        return sock

    async def _start_http(self) -> asyncio.Task[None]:
        from cronmesh.api.app import create_app

        sock = self._listen_http()
        config = uvicorn.Config(
            create_app(self),
            log_level="warning",
            lifespan="off",
            access_log=False,
        )
        server = _QuietServer(config)
        self._server = server
        task = asyncio.create_task(server.serve(sockets=[sock]), name="http")
        while not server.started:
            if task.done():
                task.result()
                raise CronmeshError(
                    f"HTTP server on {self.config.http_addr} did not start"
                )
            await asyncio.sleep(0.01)
        return task

    def stop(self) -> None:
        self._stop.set()

    async def shutdown(self, server_task: asyncio.Task[None] | None) -> None:
        log.info("agent stopping node=%s", self.node_name)
        await self.scheduler.stop()
        await self.dispatcher.stop()
        if self.runner.live:
            log.info(
                "waiting for running executions count=%d up_to=%.0fs",
                len(self.runner.live),
                self.config.shutdown_grace,
            )
        await self.runner.stop(self.config.shutdown_grace)
        for task in list(self._background):
            task.cancel()
        if self.cluster is not None:
            await self.cluster.stop()
        if self._server is not None:
            self._server.should_exit = True
        if server_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server_task, 5)
        self.data.close()
        log.info("agent stopped node=%s", self.node_name)


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the agent owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _as_job(value: Any) -> Job:
    """A job from a local result (a Job) or a forwarded one (its JSON)."""
    return value if isinstance(value, Job) else Job.from_json(value, keep_runtime=True)


def _raise_for(result: ApplyResult) -> None:
    if result.ok:
        return
    if result.code == 404:
        raise NotFoundError(result.error)
    if result.code == 409:
        raise ConflictError(result.error)
    raise ValidationError(result.error)
