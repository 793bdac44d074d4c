"""A server's place in the Raft group: transport, bootstrap, membership.

`Cluster` puts a `RaftDriver` on the agent's gRPC port, finds the other
servers through a peer source (who they are and their RPC address), and
keeps the Raft configuration in line with them:

- Identity. Every cluster has an id, made at random when it is
  bootstrapped and stored with the Raft state; servers show it in their
  `cluster` gossip tag and send it with every Raft RPC. A server refuses
  messages of another cluster at the transport, never sends to one, and
  never adds one to its configuration: two clusters whose servers meet in
  one gossip mesh stay two clusters.
- Bootstrap. A fresh server (no Raft state, no id) that sees a server of
  an existing cluster in the mesh joins that cluster: it waits, without
  state, until that cluster's leader adds it, and takes its id from the
  first message it accepts. Only when `bootstrap_expect` fresh servers see
  each other (itself included) and no cluster exists does the first of
  them by name bootstrap a new one, with those servers as voters; the
  others join it like any new server. With `bootstrap_expect` <= 1 a
  server alone bootstraps itself.
- Growth. The leader adds a known server of its cluster (or a fresh one)
  that is not in the configuration as a non-voter, and promotes it once
  its log has caught up.
- Shrinking. A server that left gracefully is removed by the leader; a
  failed one stays until `raft remove-peer` (a failure may be temporary)
  or until the mesh reaps it. `raft remove-peer` refuses a server that is
  alive in the mesh (it would be added back at once): stop it first.

The peer source is a callable returning {server name: rpc address}, and
`identities` one returning {server name: its cluster id, "" for none} for
the servers alive in the mesh; the gossip mesh provides both, and tests may
give fixed maps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc

from cronmesh.core.commitlog import NotLeaderError
from cronmesh.core.fsm import ApplyResult, StateMachine, encode_command
from cronmesh.errors import (
    ConflictError,
    CronmeshError,
    NotFoundError,
    StorageError,
    UnavailableError,
    ValidationError,
)
from cronmesh.raft.driver import RaftDriver, RaftSettings
from cronmesh.raft.errors import ProposalDropped, RaftError
from cronmesh.raft.types import ConfChange, ConfChangeOp
from cronmesh.rpc import raft_pb2, raft_pb2_grpc
from cronmesh.rpc.agent_rpc import SERVER_OPTIONS
from cronmesh.rpc.raft_transport import RaftTransport
from cronmesh.rpc.tls import RpcSecurity
from cronmesh.storage.env import DataDir
from cronmesh.storage.raftlog import LmdbRaftStorage

__all__ = ["Cluster", "error_code", "value_json"]

log = logging.getLogger("cronmesh.cluster")

RECONCILE_INTERVAL = 1.0
# The id a server with Raft state from before cluster ids existed goes by.
# Limitation: every such cluster has this same id, so two of them in one
# mesh are not kept apart (a cluster bootstrapped since always has its own).
LEGACY_CLUSTER_ID = "legacy"
# `raft remove-peer` sent to a follower travels to the leader as a Propose
# of this command, which the leader carries out instead of applying it.
REMOVE_PEER_OP = "raft_remove_peer"
_REMOVE_PREFIX = encode_command(REMOVE_PEER_OP)[:-1]


def value_json(value: Any) -> bytes:
    """The JSON of an ApplyResult's value, for a forwarded write's reply."""
    if value is None:
        return b""
    if hasattr(value, "to_json"):
        value = value.to_json()
    elif isinstance(value, list):
        value = [v.to_json() if hasattr(v, "to_json") else v for v in value]
    return json.dumps(value).encode()


def error_code(exc: CronmeshError) -> int:
    """The HTTP-like status of a refusal raised while proposing, as the
    API would answer it; the forwarding server raises the same kind."""
    if isinstance(exc, ValidationError):
        return 400
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, ConflictError):
        return 409
    if isinstance(exc, (StorageError, UnavailableError, NotLeaderError, RaftError)):
        return 503
    return 500


class Cluster:
    """The Raft side of a server agent."""

    def __init__(
        self,
        name: str,
        data: DataDir,
        fsm: StateMachine,
        rpc_bind: tuple[str, int],
        peers: Callable[[], dict[str, str]],
        *,
        bootstrap_expect: int = 1,
        left: Callable[[], set[str]] = set,
        identities: Callable[[], dict[str, str]] = dict,
        on_identity: Callable[[str], None] | None = None,
        settings: RaftSettings | None = None,
        security: RpcSecurity | None = None,
    ) -> None:
        self.name = name
        self.security = security or RpcSecurity()
        self._refused: dict[str, str] = {}  # server -> why it was not added
        self.peers = peers
        self.left = left
        self._identities = identities
        self._identities_cache: tuple[float, dict[str, str]] = (-1.0, {})
        self.on_identity = on_identity
        self._warned: set[tuple[str, str, str]] = set()
        self.waiting = ""  # why this server is not in a cluster yet, if so
        self.bootstrap_expect = max(bootstrap_expect, 1)
        self.rpc_bind = rpc_bind
        self.storage = LmdbRaftStorage(data)
        self.driver = RaftDriver(name, self.storage, fsm, settings=settings)
        self.transport = RaftTransport(
            name,
            self._resolve,
            self.driver.deliver,
            self._on_propose,
            security=self.security,
        )
        self.transport.cluster_id = lambda: self.cluster_id
        self.transport.admit = self.admit
        self.driver.send = self.transport.send
        self.driver.forward = self.transport.propose_to
        self.driver.waiting = lambda: self.waiting
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.rpc_port = rpc_bind[1]

    # -- identity
    @property
    def cluster_id(self) -> str:
        """The id of this server's cluster; "" while it belongs to none."""
        stored = self.storage.stable.cluster_id()
        if stored:
            return stored
        return LEGACY_CLUSTER_ID if self.driver.has_state() else ""

    def identities(self) -> dict[str, str]:
        """{server alive in the mesh: its cluster id}, re-read every 0.2 s
        (it is consulted for every message sent)."""
        now = time.monotonic()
        at, cached = self._identities_cache
        if now - at > 0.2:
            cached = self._identities()
            self._identities_cache = (now, cached)
        return cached

    def _warn_once(self, what: str, peer: str, other: str, text: str) -> None:
        """Log `text` the first time `what` happens with `peer` of `other`."""
        if (what, peer, other) not in self._warned:
            self._warned.add((what, peer, other))
            log.warning(text)

    def admit(self, sender: str, their: str) -> str | None:
        """Whether a Raft request from `sender` of cluster `their` may reach
        the core: None if so, else the reason it is refused. A fresh server
        joins the cluster of the first request it admits."""
        mine = self.cluster_id
        if mine and their == mine:
            return None
        if mine == LEGACY_CLUSTER_ID and not their:
            return None  # a server of our cluster still on a build without ids
        if mine:
            reason = (
                f"server {sender or '?'} belongs to cluster {their or '(none)'}, "
                f"this server ({self.name}) to cluster {mine}"
            )
        elif not their:
            reason = f"server {sender or '?'} sent no cluster id"
        elif (seen := {v for v in self.identities().values() if v}) and (
            their not in seen
        ):
            reason = (
                f"server {sender or '?'} belongs to cluster {their}, which no "
                f"server in the mesh shows (seen: {', '.join(sorted(seen))})"
            )
        else:
            self._adopt(their, sender)
            return None
        self._warn_once(
            "refused",
            sender,
            their,
            f"refused raft messages from another cluster: {reason}; the two "
            f"clusters stay apart (see docs/operations.md)",
        )
        return reason

    def foreign_messages(self) -> int:
        """Raft messages of other clusters refused (transport) or dropped
        (core) since start, for metrics."""
        node = self.driver.node
        return self.transport.refused + (node.dropped_unknown if node else 0)

    def _adopt(self, cluster_id: str, via: str) -> None:
        self.storage.stable.save_cluster_id(cluster_id)
        self.waiting = ""
        log.info(
            "joined cluster node=%s cluster_id=%s via=%s", self.name, cluster_id, via
        )
        if self.on_identity is not None:
            self.on_identity(cluster_id)

    def _resolve(self, name: str) -> str | None:
        their = self.identities().get(name, "")
        mine = self.cluster_id
        if their and mine and their != mine:
            self._warn_once(
                "not sent",
                name,
                their,
                f"not sending raft messages to {name}: it belongs to cluster "
                f"{their}, this server to {mine}",
            )
            return None
        return self.peers().get(name)

    async def _on_propose(self, command: bytes) -> raft_pb2.ProposeReply:
        if command.startswith(_REMOVE_PREFIX):
            return await self._remove_for_peer(command)
        if not self.driver.is_leader():
            return raft_pb2.ProposeReply(leader=self.driver.leader or "")
        try:
            result: ApplyResult = await self.driver.propose(command)
        except (NotLeaderError, ProposalDropped) as exc:
            # Lost the lead meanwhile, or the entry was replaced by a new
            # leader's: not applied, so the caller may try the leader now.
            return raft_pb2.ProposeReply(
                leader=self.driver.leader or "", error=str(exc)
            )
        except CronmeshError as exc:
            # Any other refusal is an answer of its kind (a command too large
            # is a 400), not a redirect: the caller would go round the
            # servers with it and report "not the leader" at the end.
            return raft_pb2.ProposeReply(code=error_code(exc), error=str(exc))
        return raft_pb2.ProposeReply(
            code=result.code, error=result.error, value=value_json(result.value)
        )

    # -- life cycle
    async def start(
        self, extra_services: Callable[[grpc.aio.Server], None] | None = None
    ) -> None:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        raft_pb2_grpc.add_RaftServicer_to_server(self.transport, server)
        if extra_services is not None:
            extra_services(server)
        host, port = self.rpc_bind
        try:
            bound = self.security.add_port(server, f"{host}:{port}")
        except RuntimeError as exc:
            raise CronmeshError(f"--rpc-port {port}: cannot listen on {host}") from exc
        if bound == 0:
            raise CronmeshError(f"--rpc-port {port}: cannot listen on {host}:{port}")
        self.rpc_port = bound
        await server.start()
        self._server = server
        self._tasks.append(
            asyncio.create_task(self._bootstrap_then_run(), name="cluster")
        )

    async def _bootstrap_then_run(self) -> None:
        try:
            if not self.driver.has_state():
                if self.driver.fsm.store.applied_index() > 0:
                    raise CronmeshError(
                        "the data dir holds state but no Raft log (written by a "
                        "build before Raft); use a new data dir and restore a backup"
                    )
                await self._wait_for_founders()
            self.driver.start()
        except Exception as exc:
            log.exception("raft could not start node=%s", self.name)
            self.driver.broken = f"raft could not start: {exc}"
            return
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL)
            if self.driver.is_leader():
                await self._reconcile()

    async def _wait_for_founders(self) -> None:
        """Return once this fresh server bootstrapped a new cluster or found
        one to join (it then starts without state and waits to be added)."""
        said = ""
        while not self.cluster_id:
            step = self._founding_step()
            if step is None:
                return
            if step != said:
                log.info("%s node=%s", step, self.name)
                said = step
            self.waiting = step
            await asyncio.sleep(0.2)
        self.waiting = ""

    def _founding_step(self) -> str | None:
        """One look at the mesh: None when done, else what we wait for."""
        ids = self.identities()
        clusters = sorted({v for v in ids.values() if v})
        if clusters:
            if len(clusters) > 1:
                log.warning(
                    "the mesh holds servers of %d clusters (%s); this new "
                    "server joins the first whose leader adds it",
                    len(clusters),
                    ", ".join(clusters),
                )
            log.info(
                "joining an existing cluster node=%s cluster_id=%s",
                self.name,
                ", ".join(clusters),
            )
            self.waiting = "waiting to be added to the cluster by its leader"
            return None
        # Limitation: "no cluster seen" may only mean the gossip join has not
        # happened yet (--retry-join runs in the background); with
        # bootstrap_expect 1 such a server founds a cluster of its own.
        fresh = set(self.peers()) | {self.name}
        if len(fresh) < self.bootstrap_expect:
            return (
                f"waiting for servers to bootstrap: {len(fresh)} of "
                f"{self.bootstrap_expect} seen"
            )
        founders = sorted(fresh)[: self.bootstrap_expect]
        if founders[0] != self.name:
            return f"waiting for {founders[0]} to bootstrap the cluster"
        self.driver.bootstrap(set(founders), uuid.uuid4().hex)
        self.waiting = ""
        if self.on_identity is not None:
            self.on_identity(self.cluster_id)
        return None

    async def _reconcile(self) -> None:
        """Leader: add new servers as non-voters, promote caught-up ones,
        remove those that left; never touch servers of another cluster."""
        membership = self.driver.membership
        mine = self.cluster_id
        foreign = {n for n, v in self.identities().items() if v and v != mine}
        for name in sorted(foreign - membership.members):
            self._warn_once(
                "not added",
                name,
                self.identities()[name],
                f"server {name} in the mesh belongs to cluster "
                f"{self.identities()[name]}, not {mine}: it is not added",
            )
        known = (set(self.peers()) - foreign) | {self.name}
        gone = self.left() & membership.members - {self.name}
        # A fresh server added as a non-voter that then joined another
        # cluster (it was added by both) will never catch up here.
        strays = membership.learners & foreign
        change: ConfChange | None = None
        if gone or strays:
            change = ConfChange(ConfChangeOp.REMOVE, sorted(gone | strays)[0])
        else:
            change = await self._addition(known - membership.members)
        if change is None and not gone:
            for learner in sorted(membership.learners):
                if self._caught_up(learner):
                    change = ConfChange(ConfChangeOp.PROMOTE, learner)
                    break
        if change is None:
            return
        try:
            await self.driver.change_membership(change)
            log.info(
                "raft membership changed op=%s node=%s", change.op.value, change.node
            )
        except (RaftError, CronmeshError) as exc:
            log.debug("membership change deferred op=%s error=%s", change.op.value, exc)

    async def _addition(self, new: set[str]) -> ConfChange | None:
        """The first new server that may join, as a learner."""
        for node_id in sorted(new):
            if await self._admissible(node_id):
                return ConfChange(ConfChangeOp.ADD_LEARNER, node_id)
        return None

    async def _admissible(self, node_id: str) -> bool:
        """With mutual TLS: whether a new server passes the handshake both
        ways, so one without a certificate from our CA never enters the Raft
        configuration (it would count as a member it cannot be)."""
        if not self.security.enabled:
            return True
        address = self._resolve(node_id)
        reason = await self.security.check(address) if address else "no RPC address"
        if reason is None:
            self._refused.pop(node_id, None)
            return True
        if self._refused.get(node_id) != reason:
            log.warning(
                "server not added to raft: rpc connection failed node=%s addr=%s "
                "reason=%s",
                node_id,
                address,
                reason,
            )
            self._refused[node_id] = reason
        return False

    def _caught_up(self, node_id: str) -> bool:
        node = self.driver.node
        if node is None:
            return False
        progress = node.progress.get(node_id)
        return progress is not None and progress.match >= node.commit

    def peers_table(self) -> list[dict[str, Any]]:
        """Every server of the configuration, for `raft list-peers`.

        Raises:
            UnavailableError: this server has no configuration yet.
        """
        if self.driver.node is None:
            raise UnavailableError(
                f"no raft configuration yet: {self.waiting or 'raft is starting'}"
            )
        membership = self.driver.membership
        addresses = self.peers()
        rows = []
        for node_id in sorted(membership.members):
            leader = node_id == (
                self.name if self.driver.is_leader() else self.driver.leader
            )
            rows.append(
                {
                    "Node": node_id,
                    "ID": node_id,
                    "Address": addresses.get(node_id, "")
                    if node_id != self.name
                    else f"{self.rpc_bind[0]}:{self.rpc_port}",
                    "State": "leader" if leader else "follower",
                    "Voter": node_id in membership.voters,
                }
            )
        return rows

    async def remove_peer(self, node_id: str) -> list[dict[str, Any]]:
        """`raft remove-peer` on any server: the leader removes `node_id`
        (a follower passes the request on); returns the leader's peers table.

        Raises:
            NotFoundError: `node_id` is not in the configuration.
            ConflictError: `node_id` is alive in the mesh (stop it first).
            NotLeaderError: no leader could be reached.
        """
        for _ in range(3):
            if self.driver.is_leader():
                await self._remove_here(node_id)
                return self.peers_table()
            leader = self.driver.leader
            if not leader:
                raise NotLeaderError("")
            command = encode_command(REMOVE_PEER_OP, node=node_id)
            try:
                reply = await self.transport.propose_to(leader, command)
            except (grpc.aio.AioRpcError, CronmeshError) as exc:
                raise NotLeaderError(leader) from exc
            if reply.leader and not reply.code:
                await asyncio.sleep(0.2)  # leadership moved; ask the new one
                continue
            if reply.code == 404:
                raise NotFoundError(reply.error)
            if reply.code == 409:
                raise ConflictError(reply.error)
            if reply.code != 200:
                raise NotLeaderError(leader) from CronmeshError(reply.error)
            return list(json.loads(reply.value))
        raise NotLeaderError(self.driver.leader or "")

    async def _remove_for_peer(self, command: bytes) -> raft_pb2.ProposeReply:
        """The leader's side of a forwarded `remove_peer`."""
        if not self.driver.is_leader():
            return raft_pb2.ProposeReply(leader=self.driver.leader or "")
        node_id = str(json.loads(command).get("node", ""))
        try:
            await self._remove_here(node_id)
        except NotFoundError as exc:
            return raft_pb2.ProposeReply(code=404, error=str(exc))
        except ConflictError as exc:
            return raft_pb2.ProposeReply(code=409, error=str(exc))
        except (RaftError, CronmeshError) as exc:
            return raft_pb2.ProposeReply(code=503, error=str(exc))
        return raft_pb2.ProposeReply(code=200, value=value_json(self.peers_table()))

    async def _remove_here(self, node_id: str) -> None:
        if node_id not in self.driver.membership.members:
            raise NotFoundError(
                f"{node_id!r} is not a member of the Raft configuration"
            )
        if node_id == self.name or node_id in self.identities():
            # Reconcile would add a live server back within a second; the
            # way out for a live one is to stop it or make it leave.
            raise ConflictError(
                f"{node_id!r} is alive in the mesh; remove-peer is for failed "
                f"servers: stop it, or run `cronmesh leave` on it (a server "
                f"that leaves is removed by the leader)"
            )
        result = await self.driver.change_membership(
            ConfChange(ConfChangeOp.REMOVE, node_id)
        )
        if not result.ok:
            raise CronmeshError(result.error)
        log.info("raft peer removed node=%s by=remove-peer", node_id)

    def problems(self) -> list[str]:
        """Why this server cannot serve writes now, for /health."""
        if self.driver.broken:
            return [self.driver.broken]
        if self.waiting:
            return [self.waiting]
        if self.driver.node is None:
            return ["raft is starting"]
        if not self.driver.is_leader() and not self.driver.leader:
            return ["no raft leader known: a majority of the servers may be down"]
        return []

    async def hand_over_leadership(self) -> None:
        """If this server leads, hand leadership to another voter (waits up
        to 3 s; a voter that is not caught up lets the transfer lapse)."""
        if not self.driver.is_leader():
            return
        voters = sorted(self.driver.membership.voters - {self.name})
        if not voters:
            return
        self.driver.transfer_leadership(voters[0])
        for _ in range(30):
            await asyncio.sleep(0.1)
            if not self.driver.is_leader():
                log.info("leadership handed over to=%s", self.driver.leader)
                return
        log.warning("leadership not handed over to=%s", voters[0])

    async def stop(self, *, transfer: bool = True) -> None:
        if transfer:
            await self.hand_over_leadership()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.driver.stop()
        await self.transport.close()
        if self._server is not None:
            await self._server.stop(1)
