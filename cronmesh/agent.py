"""The agent: one cronmesh node in one asyncio process.

It owns the data dir, the state machine and the log that feeds it, the
runner, and, while it leads, the dispatcher and scheduler; it serves the
HTTP API in the same event loop. `Agent` is also the facade the API calls:
the API validates nothing by itself and writes nothing directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import uvicorn

from cronmesh import __version__
from cronmesh.api.acl import AccessList
from cronmesh.cluster import Cluster
from cronmesh.core.admission import LoopLag
from cronmesh.core.commitlog import CommandLog, NotLeaderError
from cronmesh.core.dispatcher import Dispatcher
from cronmesh.core.executors import get_executor
from cronmesh.core.executors.shell import dropped_tail, install_pidfd_child_watcher
from cronmesh.core.fsm import ApplyResult, StateMachine, encode_command
from cronmesh.core.liveness import (
    HEARTBEAT_INTERVAL,
    VERDICT_HANDOVER,
    LivenessWatch,
)
from cronmesh.core.model import Execution, Job, format_time, to_ns
from cronmesh.core.notify import Notifier as Notifications
from cronmesh.core.notify import NotifySettings
from cronmesh.core.runner import Runner
from cronmesh.core.schedule import load_zone, parse_schedule
from cronmesh.core.scheduler import DEFAULT_CATCH_UP, STAGE_AHEAD, Scheduler
from cronmesh.core.targets import DRAINING_TAG, Candidate
from cronmesh.errors import (
    ConflictError,
    CronmeshError,
    NotFoundError,
    RunRefusedError,
    TransportError,
    UnavailableError,
    ValidationError,
)
from cronmesh.gossip.config import profile as gossip_profile
from cronmesh.gossip.driver import GossipDriver
from cronmesh.gossip.keyring import KEYRING_FILE, Keyring
from cronmesh.gossip.tags import RESERVED_TAGS as GOSSIP_RESERVED_TAGS
from cronmesh.metrics import Metrics
from cronmesh.raft.driver import RaftSettings
from cronmesh.rpc import agent_pb2, agent_pb2_grpc
from cronmesh.rpc.agent_rpc import (
    SERVER_OPTIONS,
    AgentClient,
    AgentService,
    Channels,
    ExecutionsService,
    RemoteLog,
    ServerLink,
)
from cronmesh.rpc.tls import RpcSecurity
from cronmesh.storage.env import DataDir
from cronmesh.storage.outbox import Outbox
from cronmesh.storage.state import StateStore, split_execution_id
from cronmesh.systemd import Notifier, Phase

__all__ = ["RESERVED_TAGS", "Agent", "AgentConfig", "parse_addr"]

# A non-server agent whose heartbeats no leader took for this long says so in
# /health (three heartbeat periods: an election takes about one second).
LEADER_SILENCE = 3 * HEARTBEAT_INTERVAL

# Tags the agent sets itself; `--tag` may not set them: Dkron's reserved
# tags but `role` (users target jobs with it), and the cluster's id.
RESERVED_TAGS = (*(t for t in GOSSIP_RESERVED_TAGS if t != "role"), "cluster")

# A new leader hands runs committed this recently (seconds, by their start)
# to their agents again (`_hand_over_inherited`).
INHERITED_RECENT = 10.0
INHERITED_PARALLEL = 32  # hand-overs at once
# An agent that does not answer is asked again, after these pauses (s).
INHERITED_PAUSE = 0.5
INHERITED_PAUSE_MAX = 4.0

log = logging.getLogger("cronmesh.agent")
T = TypeVar("T")

# A sweep that wakes this much later than asked was stalled (SIGSTOP, swap).
STALL_SECONDS = 5.0


def _bind_error(host: str, port: int) -> str:
    """Why `host:port` cannot be bound, as ": reason" (gRPC only says no)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, port))
    except OSError as exc:
        return f": {exc.strerror or exc}"
    return ""


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
    stage_ahead: float = STAGE_AHEAD  # seconds before its instant a run is staged
    shutdown_grace: float = 30.0  # seconds running jobs get on SIGTERM
    region: str = "global"
    datacenter: str = "dc1"
    # Other servers as name -> host:rpc_port, besides those gossip finds.
    peers: dict[str, str] = field(default_factory=dict)
    advertise_addr: str = ""  # host[:port] peers should use; default: bind
    join: list[str] = field(default_factory=list)  # join at start (must work)
    retry_join: list[str] = field(default_factory=list)  # join until it works
    retry_interval: float = 30.0  # seconds between retry-join attempts
    retry_max: int = 0  # retry-join attempts before giving up (0: forever)
    encrypt: str = field(default="", repr=False)  # base64 gossip key (16/24/32 B)
    profile: str = "lan"  # gossip timing: lan, wan or local
    serf_reconnect_timeout: float = 86_400.0  # seconds before a failed member is reaped
    notify: NotifySettings = field(default_factory=NotifySettings)  # mail, webhooks
    log_json: bool = False  # log one JSON object per line
    # cronmesh.config.ConfigSources, re-read on SIGHUP; its flags hold secrets.
    sources: Any = field(default=None, repr=False)
    raft_tick: float = 0.05  # seconds; elections time out after 10-20 ticks
    # Security (docs/operations.md). Secrets stay out of repr and logs.
    acl_tokens: list[str] = field(default_factory=list, repr=False)  # N:SCOPE:T
    acl_tokens_file: str = ""  # one NAME:SCOPE:TOKEN a line; re-read on SIGHUP
    tls_cert: str = ""  # HTTPS for the API: PEM certificate (chain) ...
    tls_key: str = ""  # ... and its unencrypted PEM key
    rpc_ca: str = ""  # mutual TLS between nodes: the CA that signs every node,
    rpc_cert: str = ""  # this node's certificate (SAN: its RPC host)
    rpc_key: str = ""  # and key; all three or none
    # Seconds without news of a running execution before it is failed.
    execution_timeout: float = 30.0


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
        self.bind = parse_addr(config.bind_addr, 8946, "bind-addr")
        self.advertise = advertise_address(config.advertise_addr, self.bind)
        self.gossip: GossipDriver | None = None
        self.acl = AccessList.load(config.acl_tokens, config.acl_tokens_file)
        self.rpc_security = RpcSecurity.from_files(
            config.rpc_ca, config.rpc_cert, config.rpc_key
        )
        self.channels = Channels(self.rpc_security)
        self.link = ServerLink(self.channels, self.server_rpc_addrs, self._leader_hint)
        self.agents = AgentClient(self.channels)
        self.outbox = Outbox(self.data)
        self.liveness = LivenessWatch(timeout=config.execution_timeout)
        self._reaping: set[str] = set()
        # Taken before this node can accept runs, so none of these is live.
        self._orphans = [
            e
            for e in self.store.running()
            if e.node_name == self.node_name and e.id not in self.outbox
        ]
        self._sweeper: asyncio.Task[None] | None = None
        self._candidate_cache: tuple[float, list[Candidate]] | None = None
        self._rpc_addrs: tuple[list[Candidate] | None, dict[str, str]] = (None, {})
        # member name -> when the mesh said it failed or left (monotonic)
        self._gone_since: dict[str, float] = {}
        self._server_cache: tuple[float, dict[str, str]] | None = None
        self._rpc_server: grpc.aio.Server | None = None
        self.app: Any = None
        if config.server:
            rpc_host = self.bind[0]
            self.cluster = Cluster(
                self.node_name,
                self.data,
                self.fsm,
                (rpc_host, config.rpc_port),
                self.server_peers,
                bootstrap_expect=config.bootstrap_expect,
                left=self.servers_left,
                identities=self.server_identities,
                on_identity=self._identity_changed,
                settings=RaftSettings(tick=config.raft_tick),
                security=self.rpc_security,
            )
            self.cluster.driver.on_role.append(self._leadership_changed)
            self.log = self.cluster.driver
        else:
            # An agent without --server runs jobs and gossip only; its writes
            # (results, API requests) go to the servers.
            self.log = RemoteLog(self.link)
        self.runner = Runner(
            self.node_name,
            self.log,
            max_output=config.max_output,
            outbox=self.outbox,
        )
        self.dispatcher = Dispatcher(
            self.node_name,
            self.store,
            self.log,
            self.runner,
            region=config.region,
        )
        self.dispatcher.active = False
        self.dispatcher.node_tags = lambda: self.tags
        self.dispatcher.members = self._candidates
        self.dispatcher.send_run = self._send_run
        self.dispatcher.on_unanswered = self._handover_unanswered
        self.scheduler = Scheduler(
            self.store,
            self.dispatcher,
            catch_up=config.catch_up_window,
            stage_ahead=config.stage_ahead,
        )
        self.scheduler.leading = self.is_leader
        # The leader's overload guard (core/admission.py) follows this.
        self.loop_lag = LoopLag(interval=0.05)
        self.loop_lag.listeners.append(self.scheduler.on_lag)
        self.metrics = Metrics(self)
        self.notifications = Notifications(
            self.node_name,
            config.notify,
            store=self.store,
            is_leader=self.is_leader,
            registry=self.metrics.registry,
            webhook_failed=self.metrics.webhook_failed,
        )
        self.dispatcher.observe_fire_lag = self.metrics.observe_fire_lag
        self.runner.observe_start_lag = self.metrics.observe_start_lag
        self.fsm.listeners += [
            self.scheduler.on_event,
            self.dispatcher.on_event,
            self.metrics.on_event,
            self.notifications.on_event,
            self._stop_runs_of_deleted_job,
        ]
        self.paused = False
        # When a leader last took this node's heartbeat (a non-server's /health).
        self._leader_heard = time.monotonic()
        self.http_host, self.http_port = parse_addr(config.http_addr, 8080, "http-addr")
        self._stop = asyncio.Event()
        self._server: uvicorn.Server | None = None
        self._background: set[asyncio.Task[object]] = set()
        self.exit_error = ""
        self.name_conflict = ""  # set when another member holds our name
        self._reaped: set[str] = set()
        # systemd's notify protocol (a no-op when not run by systemd).
        self.notifier = Notifier.from_environ()
        self._left_mesh = False

    # -- identity
    @property
    def tags(self) -> dict[str, str]:
        host = self.advertise[0]
        # `cluster`: the id of a server's Raft cluster (cluster.py), "" while
        # it has none.
        ours = {"cluster": self.cluster.cluster_id} if self.cluster else {}
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
            **ours,
            # A stopping node runs nothing new: leaders do not pick it.
            **({DRAINING_TAG: "true"} if self._stop.is_set() else {}),
        }

    def is_leader(self) -> bool:
        return self.log.is_leader()

    async def consistent_read(self) -> None:
        """Make the next local read linearizable (`?consistent`)."""
        if self.cluster is not None:
            await self.cluster.driver.read_barrier()

    def problems(self) -> list[str]:
        """What keeps this node from working, for /health."""
        found = [self.name_conflict] if self.name_conflict else []
        if self.cluster is not None:
            found += self.cluster.problems()
        else:
            silent = time.monotonic() - self._leader_heard
            if silent > LEADER_SILENCE:
                found.append(
                    f"no leader reached for {silent:.0f}s: this agent gets no runs "
                    "and its results wait in its outbox"
                )
        return found

    def leader_name(self) -> str | None:
        if self.cluster is None:
            return self.node_name
        return self.node_name if self.is_leader() else self.cluster.driver.leader

    def member(self, name: str | None = None) -> dict[str, Any]:
        """A node in the shape of Dkron's /v1/members entries (default: this one)."""
        wanted = name or self.node_name
        for entry in self.members():
            if entry["Name"] == wanted:
                return entry
        raise NotFoundError(f"member {wanted!r} not known")

    def gossip_stats(self) -> dict[str, str]:
        """Mesh statistics for /v1 (serf's section in Dkron)."""
        keyring = self.gossip.keyring if self.gossip is not None else None
        encrypted = "true" if keyring is not None else "false"
        if self.gossip is None or not self.gossip.started:
            return {"members": "1", "encrypted": encrypted}
        stats = {k: str(v) for k, v in self.gossip.stats.as_dict().items()}
        members = str(len(self.gossip.members()))
        return {"members": members, "encrypted": encrypted, **stats}

    def raft_stats(self) -> dict[str, str] | None:
        """Raft's view for /v1 (servers only), strings as serf's stats."""
        node = self.cluster.driver.node if self.cluster is not None else None
        if self.cluster is None or node is None:
            return None
        status = node.status()
        return {
            "state": status.role.name.lower(),
            "term": str(status.term),
            "leader": self.leader_name() or "",
            "commit_index": str(status.commit),
            "applied_index": str(status.applied),
            "last_log_index": str(status.last_index),
        }

    def members(self) -> list[dict[str, Any]]:
        """Every member this node knows, in Dkron's (serf's) shape."""
        found = [m.as_dict() for m in self.gossip.members()] if self.gossip else []
        if not any(m["name"] == self.node_name for m in found):
            host, port = self.advertise
            found.append(
                {
                    "name": self.node_name,
                    "addr": host,
                    "port": port,
                    "tags": self.tags,
                    "status": "alive",
                }
            )
        return [_serf_member(m) for m in sorted(found, key=lambda m: m["name"])]

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

    def job_warnings(self, job: Job) -> list[str]:
        """Things about a valid job that probably surprise its author."""
        warnings = _never_runs(job, datetime.now(UTC))
        tail = dropped_tail(job.executor_config) if job.executor == "shell" else ""
        if tail:
            warnings.append(
                f'executor_config.command: without "shell": "true" it runs only '
                f"up to the first | ; & < > (as in Dkron); this part is not run: "
                f"{tail!r}"
            )
        return warnings

    async def propose(self, payload: bytes) -> ApplyResult:
        """An API write: through the leader, and visible here when it returns.

        A follower server forwards the write; before answering it waits
        (read-index) until its own state has the write, so a client that
        reads from the same server next sees what it wrote.
        """
        forwarded = self.cluster is not None and not self.is_leader()
        result = await self.log.propose(payload)
        if forwarded and result.ok:
            with contextlib.suppress(CronmeshError):
                await self.consistent_read()
        return result

    async def set_job(self, data: Any, *, restore: bool = False) -> tuple[Job, bool]:
        """Validate and store a job; returns (job, created)."""
        job = self.validate_job(data, keep_runtime=restore)
        payload = {k: v for k, v in job.to_json().items()}
        # `at`: when the job's schedule takes effect, if this write starts it
        # (the state machine reads no clock; see Job.schedule_since).
        at = format_time(datetime.now(UTC))
        result = await self.propose(
            encode_command("set_job", job=payload, restore=restore, at=at)
        )
        _raise_for(result)
        return _as_job(result.value), result.code == 201

    async def delete_job(self, name: str) -> Job:
        """Delete a job; its running executions are stopped before the answer,
        so a job re-created under the name does not overlap with them."""
        running = self.store.running(name) if self.cluster is not None else []
        result = await self.propose(encode_command("delete_job", name=name))
        _raise_for(result)
        if running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await asyncio.gather(*(self._kill_quietly(e) for e in running))
        return _as_job(result.value)

    async def toggle_job(self, name: str) -> Job:
        job = self.get_job(name)
        result = await self.propose(
            encode_command(
                "set_disabled",
                name=name,
                disabled=not job.disabled,
                at=format_time(datetime.now(UTC)),
            )
        )
        _raise_for(result)
        return _as_job(result.value)

    async def run_job(self, name: str, *, force: bool = False) -> Execution | None:
        """Start a manual run; returns as soon as the run is recorded.

        Only the leader dispatches: a follower server asks the leader's API
        through gRPC (the same path a non-server agent uses).

        Raises:
            UnavailableError: the agent is stopping.
        """
        if self._stop.is_set():
            raise UnavailableError(
                f"agent {self.node_name} is stopping and starts no new runs"
            )
        if not self.is_leader():
            raise NotLeaderError(self._leader_hint() or "")
        outcome = await self.dispatcher.fire(name, trigger="manual", force=force)
        return outcome.execution

    async def delete_executions(self, name: str) -> Job:
        result = await self.propose(encode_command("delete_executions", name=name))
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
        """The other servers (alive in the mesh, or given by --peer) and
        their RPC addresses."""
        peers = {**self.config.peers, **self._mesh_servers(("alive",))}
        peers.pop(self.node_name, None)
        return peers

    def _mesh_servers(self, statuses: tuple[str, ...]) -> dict[str, str]:
        """Servers of the mesh in one of `statuses` -> their RPC address."""
        if self.gossip is None:
            return {}
        return {
            m.name: m.tags["rpc_addr"]
            for m in self.gossip.members()
            if m.status in statuses
            and m.tags.get("server") == "true"
            and m.tags.get("rpc_addr")
        }

    def server_identities(self) -> dict[str, str]:
        """The other servers alive in the mesh and their cluster ids ("" for
        a server that has none yet)."""
        if self.gossip is None:
            return {}
        return {
            m.name: m.tags.get("cluster", "")
            for m in self.gossip.members()
            if m.name != self.node_name
            and m.status == "alive"
            and m.tags.get("server") == "true"
        }

    def _identity_changed(self, cluster_id: str) -> None:
        if self.gossip is not None and self.gossip.started:
            self.gossip.set_tags(self.tags)

    def servers_left(self) -> set[str]:
        """Servers to remove from Raft: they left the mesh gracefully, or
        stayed failed past the reconnect timeout (reaped)."""
        if self.gossip is None:
            return set(self._reaped)
        return set(self._reaped) | {
            m.name
            for m in self.gossip.members()
            if m.status == "left" and m.tags.get("server") == "true"
        }

    # -- distributed execution
    def _leader_hint(self) -> str | None:
        if self.cluster is None:
            return None
        return self.node_name if self.is_leader() else self.cluster.driver.leader

    def server_rpc_addrs(self) -> dict[str, str]:
        """Every server alive in the mesh (this one included) -> RPC address."""
        now = time.monotonic()
        if self._server_cache is not None and now - self._server_cache[0] < 0.25:
            return self._server_cache[1]
        found = dict(self.config.peers)
        if self.cluster is not None:
            found[self.node_name] = self.tags["rpc_addr"]
        found.update(self._mesh_servers(("alive", "suspect")))
        self._server_cache = (now, found)
        return found

    def _candidates(self) -> list[Candidate]:
        """The members a job may run on, as the dispatcher wants them.

        Kept for a quarter second (or until a member event): a second with
        200 fires would otherwise decode every member's tags 200 times.
        """
        now = time.monotonic()
        if self._candidate_cache is not None and now - self._candidate_cache[0] < 0.25:
            return self._candidate_cache[1]
        found: dict[str, Candidate] = {}
        mine = self.cluster.cluster_id if self.cluster is not None else ""
        if self.gossip is not None:
            for member in self.gossip.members():
                if mine and member.tags.get("cluster", mine) not in ("", mine):
                    continue  # a server of another cluster in the same mesh
                status = "alive" if member.status == "suspect" else member.status
                found[member.name] = Candidate(member.name, dict(member.tags), status)
        found[self.node_name] = Candidate(self.node_name, self.tags, "alive")
        candidates = list(found.values())
        self._candidate_cache = (now, candidates)
        return candidates

    def rpc_address(self, node: str) -> str:
        """The RPC address of `node` from the mesh.

        Raises:
            TransportError: the mesh does not know the node.
        """
        if node == self.node_name:
            return self.tags["rpc_addr"]
        # From the candidates' cache: a hand-over per fire would otherwise
        # decode every member's tags (7 % of a busy leader's time).
        candidates = self._candidates()
        if self._rpc_addrs[0] is not candidates:
            addrs = {c.name: c.tags.get("rpc_addr", "") for c in candidates}
            self._rpc_addrs = (candidates, addrs)
        address = self._rpc_addrs[1].get(node)
        if address:
            return address
        raise TransportError(f"no RPC address known for node {node!r}")

    async def _send_run(
        self, node: str, job: Job, execution: Execution, start_in: float = 0.0
    ) -> str:
        address = self.rpc_address(node)
        state = await self.agents.run(
            address,
            json.dumps(job.to_json()).encode(),
            json.dumps(execution.to_json()).encode(),
            start_in,
        )
        if state != "started":
            log.debug(
                "repeated hand-over answered execution=%s node=%s state=%s",
                execution.id,
                node,
                state,
            )
        return state

    def _handover_unanswered(self, execution: Execution) -> None:
        """Dispatcher: the agent never answered; heartbeats settle the run."""
        self.liveness.handover_unanswered(execution.id, execution.node_name)

    async def _accept_run(
        self, job_doc: dict[str, Any], exec_doc: dict[str, Any], start_in: float = 0.0
    ) -> str:
        """gRPC AgentRun: the leader hands this node an execution, to start
        now or, staged, in `start_in` seconds.

        Idempotent by execution id: a hand-over of a run this node already
        has starts nothing and answers "running" or "done"; otherwise
        "started".

        Raises:
            UnavailableError: this agent is stopping; the leader records the
                run as not run.
        """
        job = Job.from_stored(job_doc)
        execution = Execution.from_json(exec_doc)
        if execution.node_name != self.node_name:
            raise CronmeshError(
                f"execution {execution.id} is for {execution.node_name!r}, "
                f"this node is {self.node_name!r}"
            )
        has = self.runner.has(execution.id)
        if has:
            return has
        if self._stop.is_set():
            # A stopping node announces it (the `draining` tag) and leaders
            # skip it. Limitation: a leader that picked it before the tag
            # reached it still records the run "not run".
            raise UnavailableError(
                f"agent {self.node_name} is stopping and starts no new runs"
            )
        started = await self.runner.accept(job, execution, start_in=start_in)
        if not started:
            return self.runner.has(execution.id) or "running"
        log.debug("execution accepted job=%s execution=%s", job.name, execution.id)
        return "started"

    async def live_output(self, execution: Execution) -> str | None:
        """The output so far of a running execution, from whichever node runs it."""
        if execution.node_name == self.node_name:
            return self.runner.output_of(execution.id)
        try:
            address = self.rpc_address(execution.node_name)
            async with asyncio.timeout(2.0):
                async for chunk in self.agents.output(
                    address, execution.id, follow=False
                ):
                    if chunk.found:
                        return chunk.data.decode(errors="replace")
        except (CronmeshError, TimeoutError) as exc:
            log.debug("no live output execution=%s error=%s", execution.id, exc)
        return None

    async def ask_leader(self, request: agent_pb2.HttpRequest) -> agent_pb2.HttpReply:
        """Run an API request on the leader's API (a follower's manual run).

        Raises:
            NotLeaderError: no leader known, or it cannot be reached.
        """
        leader = self._leader_hint()
        address = self.server_rpc_addrs().get(leader or "")
        if not leader or leader == self.node_name or not address:
            raise NotLeaderError(leader or "")
        # Marked, so a server that lost the lead meanwhile answers 503
        # instead of passing it on again.
        request.headers.append(agent_pb2.Header(name="x-cronmesh-to-leader", value="1"))
        return await self.link.http_at(address, request)

    async def find_execution(self, job: str, exec_id: str) -> Execution:
        """An execution from the state (asked of a server on a non-server).

        Raises:
            NotFoundError: no such job or execution.
        """
        if self.cluster is not None:
            self.get_job(job)
            found = self.store.get_execution(job, exec_id)
        else:
            reply = await self.link.http(
                agent_pb2.HttpRequest(
                    method="GET", path=f"/v1/jobs/{job}/executions/{exec_id}"
                )
            )
            if reply.status == 404:
                raise NotFoundError(json.loads(reply.body).get("error", "not found"))
            if reply.status != 200:
                raise CronmeshError(f"server answered {reply.status}")
            found = Execution.from_json(json.loads(reply.body))
        if found is None:
            raise NotFoundError(f"execution {exec_id!r} of job {job!r} not found")
        return found

    async def follow_output(self, execution: Execution) -> Any:
        """Chunks of an execution's output as it is written, until it ends."""
        if not execution.running:
            yield execution.output.encode()
            return
        streamed = False
        try:
            address = self.rpc_address(execution.node_name)
            chunks = self.agents.output(address, execution.id, follow=True)
            # Ends when this agent stops, so the HTTP server stops with no
            # response cut short (uvicorn logs that as an error).
            async for chunk in _until(self._stop, chunks):
                if chunk.data:
                    streamed = True
                    yield chunk.data
                if not chunk.found:
                    yield await self._output_gone(execution, streamed)
                    break
            else:
                if self._stop.is_set():
                    yield (
                        f"\n[cronmesh] output stream ended: {self.node_name} is "
                        f"stopping; the run goes on on {execution.node_name}\n"
                    ).encode()
        except CronmeshError as exc:
            yield f"\n[cronmesh] output stream ended: {exc}\n".encode()

    async def _output_gone(self, execution: Execution, streamed: bool) -> bytes:
        """What a follower gets when the run's node no longer has it live
        (it ended, and a slow follower read its end too late)."""
        found = await self.find_execution(execution.job_name, execution.id)
        if not streamed and not found.running:
            return found.output.encode()
        return (
            f"\n[cronmesh] output stream ended: {execution.node_name} no longer "
            "has this run live; its stored output has the end\n"
        ).encode()

    async def kill_execution(self, job: str, exec_id: str) -> str:
        """Stop a running execution on whatever node runs it; returns the node.

        Raises:
            NotFoundError: no such execution, or its node no longer runs it.
            ConflictError: the execution has finished (409, with its id).
        """
        execution = await self.find_execution(job, exec_id)
        if not execution.running:
            raise ConflictError(
                f"execution {exec_id!r} of job {job!r} has finished "
                f"({'succeeded' if execution.success else 'failed'}): nothing to kill",
                exec_id,
            )
        node = execution.node_name
        if not await self._kill_on(node, exec_id):
            raise NotFoundError(
                f"execution {exec_id!r} of job {job!r} is not running on {node}"
            )
        return node

    def _on_heartbeat(self, node: str, running: list[str]) -> agent_pb2.HeartbeatReply:
        """Leader: an agent says what it runs ("job/execution id" each)."""
        if self.cluster is None or not self.is_leader():
            return agent_pb2.HeartbeatReply(ok=False, leader=self._leader_hint() or "")
        ids = [entry.partition("/")[2] for entry in running]
        self.liveness.beat(node, ids, time.monotonic())
        finished = []
        for entry in running:
            job, _, exec_id = entry.partition("/")
            state = self.store.execution_state(job, exec_id)
            if state == "finished" and self._verdict_only(job, exec_id):
                continue  # its result may replace the leader's verdict
            if state == "finished" or (state is None and not self.store.has_job(job)):
                # Ended, or its job was deleted: the agent stops it.
                finished.append(entry)
        return agent_pb2.HeartbeatReply(ok=True, unknown=finished)

    def _verdict_only(self, job: str, exec_id: str) -> bool:
        """The execution was failed by a leader's hand-over verdict only."""
        with contextlib.suppress(CronmeshError):
            execution = self.store.get_execution(job, exec_id)
            return execution is not None and execution.verdict == VERDICT_HANDOVER
        return False

    def _running_entries(self) -> list[str]:
        """What this node runs, and results it has not delivered yet (the
        leader must not declare those lost while they are on their way)."""
        entries = [
            f"{live.job.name}/{exec_id}"
            for exec_id, live in list(self.runner.live.items())
            if not live.finished
        ]
        entries += [
            f"{execution.job_name}/{exec_id}"
            for exec_id, execution in list(self.runner.unreported.items())
        ]
        return entries

    async def _heartbeats(self) -> None:
        """Every node: tell the leader what runs here; stop what it ended."""
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            # Sent when empty too: a leader whose hand-over got no answer
            # learns from it that this node never started the run.
            running = self._running_entries()
            try:
                if self.cluster is not None and self.is_leader():
                    reply = self._on_heartbeat(self.node_name, running)
                    finished = list(reply.unknown)
                else:
                    finished = await self.link.heartbeat(self.node_name, running)
            except CronmeshError as exc:
                log.debug("heartbeat not delivered error=%s", exc)
                continue
            self._leader_heard = time.monotonic()
            for entry in finished:
                exec_id = entry.partition("/")[2]
                if self.runner.kill(exec_id):
                    log.warning(
                        "stopped an execution the cluster already ended execution=%s",
                        exec_id,
                    )

    async def _sweep(self) -> None:
        """Leader: fail running executions whose agent went quiet."""
        self.liveness.lead(time.monotonic())
        last = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            stalled, last = now - last > STALL_SECONDS, now
            if stalled:
                # This process was stopped or starved: the silence it measured
                # is its own. Count again from now (it may not even lead).
                log.warning("liveness clocks restarted after a stall")
                self.liveness.lead(now)
                continue
            if not self.is_leader():
                continue
            status = {c.name: c.status for c in self._candidates()}
            self.liveness.heard(self.runner.running_ids(), time.monotonic())
            self.liveness.heard(list(self.runner.unreported), time.monotonic())
            running = self.store.running_refs()
            overdue = self.liveness.overdue(
                running, status, time.monotonic(), self._gone_since
            )
            if overdue:
                # Judge only as a leader a quorum still follows (a paused
                # leader that resumes has been deposed without knowing it).
                try:
                    await self.consistent_read()
                except CronmeshError:
                    continue
                if not self.is_leader():
                    continue
            for ref, reason in overdue:
                if ref.id in self._reaping:
                    continue
                execution = self.store.get_execution(ref.job_name, ref.id)
                if execution is None or not execution.running:
                    continue
                self._reaping.add(execution.id)
                log.warning(
                    "execution lost job=%s execution=%s node=%s reason=%s",
                    execution.job_name,
                    execution.id,
                    execution.node_name,
                    reason,
                )
                execution.finished_at = datetime.now(UTC)
                execution.success = False
                execution.verdict = self.liveness.verdict(execution.id)
                if execution.id in self.dispatcher.handing_over:
                    execution.verdict = VERDICT_HANDOVER
                execution.output = f"{execution.output}[cronmesh] failed: {reason}\n"
                task = asyncio.create_task(self._report_lost(execution))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _report_lost(self, execution: Execution) -> None:
        try:
            await self.runner.report(execution)
        finally:
            self._reaping.discard(execution.id)

    def _stop_runs_of_deleted_job(self, event: Any) -> None:
        """FSM listener (leader): kill what still runs for a deleted job."""
        if event.kind != "job_deleted" or not self.dispatcher.active:
            return
        for execution in event.extra.get("running", []):
            self._spawn(self._kill_quietly(execution))

    async def _kill_on(self, node: str, exec_id: str) -> bool:
        """Kill an execution on `node` (this one or another); False when that
        node does not run it."""
        if node == self.node_name:
            return self.runner.kill(exec_id)
        return await self.agents.kill(self.rpc_address(node), exec_id)

    async def _kill_quietly(self, execution: Execution) -> None:
        try:
            await self._kill_on(execution.node_name, execution.id)
            log.info(
                "stopped a run of a deleted job job=%s execution=%s",
                execution.job_name,
                execution.id,
            )
        except CronmeshError as exc:
            log.warning(
                "cannot stop a run of a deleted job execution=%s: %s", execution.id, exc
            )

    def _register_rpc(self, server: grpc.aio.Server) -> None:
        agent_pb2_grpc.add_AgentServicer_to_server(
            AgentService(self._accept_run, self.runner.kill, self.runner.read_output),
            server,
        )
        if self.cluster is not None:
            agent_pb2_grpc.add_ExecutionsServicer_to_server(
                ExecutionsService(self._on_heartbeat, self._serve_forwarded), server
            )

    async def _serve_forwarded(
        self, request: agent_pb2.HttpRequest
    ) -> agent_pb2.HttpReply:
        from cronmesh.api.proxy import call_app

        if self.app is None:
            return agent_pb2.HttpReply(
                status=503, body=b'{"error": "the server is starting"}'
            )
        return await call_app(self.app, request)

    async def _start_rpc(self) -> None:
        """The gRPC port of an agent without --server (servers: Cluster)."""
        server = grpc.aio.server(options=SERVER_OPTIONS)
        self._register_rpc(server)
        host, port = self.bind[0], self.config.rpc_port
        try:
            bound = self.rpc_security.add_port(server, f"{host}:{port}")
        except RuntimeError as exc:
            why = _bind_error(host, port)
            raise CronmeshError(
                f"--rpc-port {port}: cannot listen on {host}{why}"
            ) from exc
        if bound == 0:
            why = _bind_error(host, port)
            raise CronmeshError(
                f"--rpc-port {port}: cannot listen on {host}:{port}{why}"
            )
        await server.start()
        self._rpc_server = server

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _leadership_changed(self, leading: bool) -> None:
        if self.notifier.phase is Phase.READY:
            self.notifier.status(self._status())
        task = asyncio.create_task(self._lead() if leading else self._follow())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _lead(self) -> None:
        if self._stop.is_set():
            return  # elected again while stopping: schedule nothing here
        self.dispatcher.active = True
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="sweep")
        if not self.scheduler.running:
            try:
                self.scheduler.start()
            except Exception:
                log.exception("scheduler failed to start node=%s", self.node_name)
        self._spawn(self._hand_over_inherited())

    async def _hand_over_inherited(self) -> None:
        """New leader: hand the recent runs its predecessor committed to their
        agents again. It may have died between a run's commit and its
        hand-over (for a staged run, before its instant even came), and
        that run would then wait for the liveness timeout to be failed,
        never having run. An agent answers for an execution id it has
        ("running"/"done") and starts nothing twice, so asking is safe."""
        try:
            await self.consistent_read()  # everything the old leader committed
        except CronmeshError as exc:
            log.debug("inherited runs not handed over again error=%s", exc)
            return
        horizon = to_ns(datetime.now(UTC)) - int(INHERITED_RECENT * 1e9)
        recent = [
            ref
            for ref in self.store.running_refs()
            if split_execution_id(ref.id)[0] >= horizon
        ]
        if not recent:
            return
        gate = asyncio.Semaphore(INHERITED_PARALLEL)

        async def one(job_name: str, exec_id: str) -> None:
            async with gate:
                await self._hand_over_again(job_name, exec_id)

        await asyncio.gather(*(one(ref.job_name, ref.id) for ref in recent))

    async def _hand_over_again(self, job_name: str, exec_id: str) -> None:
        """Ask until the agent answers, the run ends (its report, or the
        liveness watch failing it), or this node stops leading."""
        pause = INHERITED_PAUSE
        deadline = time.monotonic() + self.config.execution_timeout
        while time.monotonic() < deadline:
            if not self.is_leader() or self._stop.is_set():
                return
            execution = self.store.get_execution(job_name, exec_id)
            job = self.store.get_job(job_name)
            if execution is None or not execution.running or job is None:
                return
            start_in = max(0.0, to_ns(execution.started_at) / 1e9 - time.time())
            try:
                if execution.node_name == self.node_name:
                    started = await self.runner.accept(
                        job, execution, start_in=start_in
                    )
                    state = "started" if started else "running"
                else:
                    state = await self._send_run(
                        execution.node_name, job, execution, start_in
                    )
            except RunRefusedError as exc:
                log.debug("inherited run refused execution=%s error=%s", exec_id, exc)
                return  # liveness settles it
            except CronmeshError as exc:
                log.debug(
                    "inherited run not handed over again execution=%s error=%s",
                    exec_id,
                    exc,
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, INHERITED_PAUSE_MAX)
                continue
            if state == "started":
                log.info(
                    "inherited run handed over again: the previous leader "
                    "committed it but its agent did not have it job=%s "
                    "execution=%s node=%s",
                    job_name,
                    exec_id,
                    execution.node_name,
                )
            return

    async def _follow(self) -> None:
        self.dispatcher.active = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await self.scheduler.stop()

    # -- life cycle
    async def recover_interrupted(self) -> int:
        """Report what the outbox kept across a restart, and the executions
        the state holds as running here that never reached the outbox (the
        agent died between the commit and the hand-over). Runs in the
        background: it retries until a leader takes the reports."""
        count = await self.runner.recover(self.started_at)
        for execution in self._orphans:
            execution.finished_at = datetime.now(UTC)
            execution.success = False
            execution.output = (
                f"[cronmesh] interrupted: the agent stopped before this execution "
                f"started; it restarted at {format_time(self.started_at)}\n"
            )
            await self.runner.report(execution)
            count += 1
        return count

    async def run(self) -> None:
        """Serve until `stop()` or a signal; then shut down gracefully."""
        loop = asyncio.get_running_loop()
        install_pidfd_child_watcher()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_signalled)
        self.notifier.start_watchdog()
        self.notifier.status("starting")
        # Bind the API first so a busy port fails at once, but answer only
        # once the node has joined: a client that sees /health must be
        # able to count on the membership it asked for.
        http_socket = self._listen_http()
        try:
            await self._start_gossip()
            if self.cluster is not None:
                await self.cluster.start(extra_services=self._register_rpc)
            else:
                await self._start_rpc()
        except BaseException:
            http_socket.close()
            await self.notifier.close()
            raise
        server_task = await self._start_http(http_socket)
        self._spawn(self.recover_interrupted())
        self._spawn(self._heartbeats())
        self._spawn(self.loop_lag.run())
        log.info(
            "agent started node=%s http=%s:%d data_dir=%s pid=%d",
            self.node_name,
            self.http_host,
            self.http_port,
            self.config.data_dir,
            os.getpid(),
        )
        self.notifier.ready(self._status())
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

    async def _start_http(self, sock: socket.socket) -> asyncio.Task[None]:
        from cronmesh.api.app import create_app

        self.app = create_app(self)
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            log_config=None,  # uvicorn's loggers use ours (text or JSON)
            lifespan="off",
            access_log=False,
            ssl_certfile=self.config.tls_cert or None,
            ssl_keyfile=self.config.tls_key or None,
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

    async def _start_gossip(self) -> None:
        keyring = load_keyring(self.data.path, self.config.encrypt)
        explicit = self.config.advertise_addr or self.bind[0] in ("0.0.0.0", "::", "")
        self.gossip = GossipDriver(
            self.node_name,
            self.bind,
            advertise=self.advertise if explicit else None,
            tags=self.tags,
            keyring=keyring,
            config=dataclasses.replace(
                gossip_profile(self.config.profile),
                reconnect_timeout_ms=int(self.config.serf_reconnect_timeout * 1000),
            ),
        )
        self.gossip.add_event_handler(self._member_event)
        await self.gossip.start()
        bound = self.gossip.bound_address
        if not explicit and bound is not None:
            self.advertise = bound
            self.gossip.set_tags(self.tags)
        if self.config.join:
            joined = await self.gossip.join(self.config.join)
            if self.name_conflict:
                raise CronmeshError(self.name_conflict)
            if not joined:
                raise CronmeshError(
                    f"--join: no member answered: "
                    f"{self.gossip.join_failure(self.config.join)}"
                )
        known = self._remembered_members()
        if known:
            # Like serf's snapshot: a restarted node finds its cluster again
            # even when it was the seed that others joined.
            task = asyncio.create_task(self._rejoin(known))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        if self.config.retry_join:
            task = asyncio.create_task(self._retry_join())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _retry_join(self) -> None:
        assert self.gossip is not None
        try:
            await self.gossip.retry_join(
                self.config.retry_join,
                self.config.retry_interval,
                self.config.retry_max,
            )
        except CronmeshError as exc:
            log.error("giving up joining: %s", exc)
            self.exit_error = str(exc)
            self.stop()

    def _remembered_members(self) -> list[str]:
        try:
            data = json.loads((self.data.path / MEMBERS_FILE).read_text())
        except (OSError, ValueError):
            return []
        return [a for a in data if isinstance(a, str)] if isinstance(data, list) else []

    async def _rejoin(self, addresses: list[str]) -> None:
        assert self.gossip is not None
        for _ in range(30):
            if await self.gossip.join(addresses):
                return
            await asyncio.sleep(2.0)
        log.warning("could not rejoin remembered members %s", ", ".join(addresses))

    def _remember_members(self) -> None:
        if self.gossip is None:
            return
        addresses = sorted(
            f"{m.addr}:{m.port}"
            for m in self.gossip.members()
            if m.name != self.node_name and m.status in ("alive", "suspect")
        )
        if not addresses:
            return
        path = self.data.path / MEMBERS_FILE
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(addresses))
            tmp.replace(path)
        except OSError as exc:
            log.warning("cannot remember members path=%s error=%s", path, exc)

    def _member_event(self, kind: str, member: Any) -> None:
        self._candidate_cache = self._server_cache = None
        if kind in ("failed", "leave"):
            # Liveness: a new leader counts a dead agent's silence from here.
            self._gone_since.setdefault(member.name, time.monotonic())
        elif kind == "join":
            self._gone_since.pop(member.name, None)
        if kind == "conflict":
            self._name_taken(member)
            return
        if kind in ("join", "update"):
            self._remember_members()
        if kind == "reap" and member.tags.get("server") == "true":
            # Failed for longer than the reconnect timeout: gone for good.
            self._reaped.add(member.name)
        level = (
            logging.INFO
            if kind in ("join", "leave", "failed", "reap")
            else logging.DEBUG
        )
        log.log(
            level,
            "member %s node=%s addr=%s:%s",
            kind,
            member.name,
            member.addr,
            member.port,
        )

    def _name_taken(self, member: Any) -> None:
        """Joining, we met a live member with our name: we give way."""
        self.name_conflict = (
            f"--node-name {self.node_name}: a live member of the mesh at "
            f"{member.addr}:{member.port} already has this name; every agent "
            f"needs its own name"
        )
        log.error("refusing to run: %s", self.name_conflict)
        self.exit_error = self.name_conflict
        self.stop()

    def _status(self) -> str:
        """One line for `systemctl status`."""
        where = f"serving on {self.http_host}:{self.http_port}"
        if self.cluster is None:
            return where
        return f"{where}; raft {'leader' if self.is_leader() else 'follower'}"

    def _reload_signalled(self) -> None:
        """SIGHUP: reload, with systemd told when it begins and ends."""
        self.notifier.reloading()
        problem = self.reload()
        status = self._status()
        if problem:
            status = f"{status}; reload failed, old settings kept: {problem}"
        self.notifier.reloaded(status)

    def reload(self) -> str:
        """Re-read tags, log level and notification settings from the sources
        the agent started with; re-announce tags; re-read the API tokens file
        (a broken one keeps the old tokens); reload the keyring.

        Returns "" when the settings were applied, else why not (the old
        settings stay).
        """
        from cronmesh.config import apply_reload

        problem = apply_reload(self.config)
        if not problem:
            self.notifications.configure(self.config.notify)
        try:
            self.acl.reload(self.config.acl_tokens)
        except CronmeshError as exc:
            log.error("api tokens not reloaded, keeping the old ones: %s", exc)
        self._reload_keyring()
        if self.gossip is not None:
            self.gossip.set_tags(self.tags)
        return problem

    def _reload_keyring(self) -> None:
        """Bring the live keyring in line with keyring.json (rotation)."""
        if self.gossip is None or self.gossip.keyring is None:
            return
        try:
            fresh = Keyring.load(self.data.path)
        except CronmeshError as exc:
            log.error("keyring not reloaded: %s", exc)
            return
        live = self.gossip.keyring
        for key in fresh.keys:
            live.install(key)
        live.use(fresh.primary_key)
        for key in live.keys:
            if key not in fresh.keys:
                live.remove(key)
        log.info("keyring reloaded keys=%d", len(fresh.keys))

    def stop(self) -> None:
        self._stop.set()

    async def shutdown(self, server_task: asyncio.Task[None] | None) -> None:
        """Stop gracefully; the steps run in this order:

        1. Start nothing new: the scheduler stops, follow-up runs are
           dropped, manual runs get 503, executions another leader hands
           over are refused. Fires missed meanwhile run on the next leader
           (catch-up window), so nothing is lost by doing this first, and
           no run starts here that the shutdown must wait for.
        2. An agent leaves the gossip mesh, so the leader stops picking it
           (its heartbeats keep its running executions alive); a server
           hands Raft leadership to another voter, which then schedules.
        3. Wait up to --shutdown-grace for running executions, reporting
           their results; kill what still runs then (recorded as failed).
        4. A server leaves the mesh only now: its leaving makes the leader
           remove it from Raft, after which it could lose track of the
           leader and no longer report the results of step 3.
        5. Stop Raft, gossip and HTTP; `run` returns (exit code 0).
        """
        log.info("agent stopping node=%s", self.node_name)
        self.notifier.stopping("stopping: no new runs")
        self._announce_draining()
        await self.scheduler.stop()
        await self.dispatcher.stop()
        if self.cluster is None:
            await self._leave_mesh()
        else:
            await self.cluster.hand_over_leadership()
        running = len(self.runner.running_ids())
        if running:
            log.info(
                "waiting for running executions count=%d up_to=%.0fs",
                running,
                self.config.shutdown_grace,
            )
            self.notifier.status(
                f"stopping: waiting for {running} running executions "
                f"(up to {self.config.shutdown_grace:g}s)"
            )
        await self.runner.stop(self.config.shutdown_grace)
        await self._leave_mesh()
        self.notifier.status("stopping: closing")
        await self.notifications.close()
        for task in list(self._background):
            task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.cluster is not None:
            await self.cluster.stop()
        if self._rpc_server is not None:
            await self._rpc_server.stop(1)
        await self.channels.close()
        if self.gossip is not None:
            await self.gossip.stop()
        if self._server is not None:
            self._server.should_exit = True
        if server_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server_task, 5)
        self.outbox.close()
        self.data.close()
        await self.notifier.close()
        log.info("agent stopped node=%s", self.node_name)

    def _announce_draining(self) -> None:
        """Gossip the `draining` tag (self.tags adds it once stopping)."""
        if self.gossip is None or self._left_mesh:
            return
        self._candidate_cache = None
        try:
            self.gossip.set_tags(self.tags)
        except CronmeshError as exc:
            log.warning("cannot announce draining error=%s", exc)

    async def _leave_mesh(self) -> None:
        """Leave the gossip mesh gracefully (once)."""
        if self.gossip is None or self._left_mesh:
            return
        self._left_mesh = True
        # After a name conflict a "left" under our name would be taken as
        # news about the member that owns the name: say nothing.
        if not self.name_conflict:
            await self.gossip.leave(timeout=3.0)


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the agent owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


# Addresses of the other members, rewritten as they join, read at start.
MEMBERS_FILE = "members.json"

SERF_STATUS = {"alive": 1, "leaving": 2, "left": 3, "failed": 4, "suspect": 1}


def _serf_member(member: dict[str, Any]) -> dict[str, Any]:
    """A gossip member as Dkron's /v1/members shows serf members."""
    return {
        "Id": member["name"],
        "Name": member["name"],
        "Addr": member["addr"],
        "Port": member["port"],
        "Tags": member["tags"],
        "Status": SERF_STATUS.get(member["status"], 0),
        "statusText": member["status"],
        "ProtocolMin": 1,
        "ProtocolMax": 5,
        "ProtocolCur": 2,
        "DelegateMin": 2,
        "DelegateMax": 5,
        "DelegateCur": 4,
    }


def advertise_address(text: str, bind: tuple[str, int]) -> tuple[str, int]:
    """Where peers should reach us: --advertise-addr, else the bind address,
    else (for a wildcard bind) this host's first non-loopback IPv4 address."""
    if text:
        return parse_addr(text, bind[1], "advertise-addr")
    host, port = bind
    if host not in ("0.0.0.0", "::", ""):
        return host, port
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except OSError:
        infos = []
    for info in infos:
        address = str(info[4][0])
        if not address.startswith("127."):
            return address, port
    log.warning("no non-loopback address found; advertising 127.0.0.1")
    return "127.0.0.1", port


def load_keyring(data_dir: Path, key: str) -> Keyring | None:
    """The gossip keyring kept in the data dir, with --encrypt's key in it.

    On first start --encrypt's key becomes the ring; later the file wins (a
    rotation may have moved the primary key on) and --encrypt's key is only
    kept installed.
    """
    path = data_dir / KEYRING_FILE
    if not path.exists():
        if not key:
            return None
        ring = Keyring([key])
    else:
        ring = Keyring.load(data_dir)
        if key:
            ring.install(key)
    ring.save(data_dir)
    return ring


def _as_job(value: Any) -> Job:
    """A job from a local result (a Job) or a forwarded one (its JSON)."""
    return value if isinstance(value, Job) else Job.from_json(value, keep_runtime=True)


async def _until(stop: asyncio.Event, items: AsyncIterator[T]) -> AsyncIterator[T]:
    """The items of `items` until it ends or `stop` is set; an item being
    awaited then is cancelled (and `items` closed, if it is a generator)."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while True:
            step = asyncio.ensure_future(_next_of(items))
            await asyncio.wait({step, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await step
                return
            item = step.result()
            if item is None:
                return
            yield item
    finally:
        stopped.cancel()
        if isinstance(items, AsyncGenerator):
            await items.aclose()


async def _next_of(items: AsyncIterator[T]) -> T | None:
    """The next item of `items`, or None at its end."""
    try:
        return await anext(items)
    except StopAsyncIteration:
        return None


def _never_runs(job: Job, now: datetime) -> list[str]:
    """Why `job` will never run on its schedule, for a time already past."""
    if job.expires_at is not None and job.expires_at <= now:
        return [
            f"expires_at: {format_time(job.expires_at)} is in the past: the job "
            "will never run on its schedule (only when run by hand)"
        ]
    if not job.schedule:
        return []  # a dependent job
    try:
        schedule = parse_schedule(job.schedule, job.timezone, job.name)
    except CronmeshError:
        return []  # validate_job refused it already
    if getattr(schedule, "once", False) and schedule.next_after(now) is None:
        return [
            f"schedule: {job.schedule!r} is in the past: the job will never run "
            "on its schedule (only when run by hand)"
        ]
    return []


def _raise_for(result: ApplyResult) -> None:
    """Raise the error of the kind `result.code` says (the API answers it
    with that code again), if it is one."""
    if result.ok:
        return
    if result.code == 404:
        raise NotFoundError(result.error)
    if result.code == 409:
        raise ConflictError(result.error)
    if result.code == 503:
        raise UnavailableError(result.error)
    if result.code >= 500:
        raise CronmeshError(result.error)
    raise ValidationError(result.error)
