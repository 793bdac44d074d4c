"""A server's place in the Raft group: transport, bootstrap, membership.

`Cluster` puts a `RaftDriver` on the agent's gRPC port, finds the other
servers through a peer source (who they are and their RPC address), and
keeps the Raft configuration in line with them:

- Bootstrap. A server with no Raft state waits until `bootstrap_expect`
  servers are known (itself included); then every founder writes the same
  first configuration, the sorted names of those servers. With
  `bootstrap_expect` <= 1 a server alone bootstraps itself.
- Growth. The leader adds a known server that is not in the configuration
  as a non-voter, and promotes it once its log has caught up.
- Shrinking. A server that left gracefully is removed by the leader; a
  failed one stays until `raft remove-peer` (a failure may be temporary).

The peer source is a callable returning {server name: rpc address}; the
gossip mesh will provide it, and tests may give a fixed map.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import grpc

from cronmesh.core.fsm import ApplyResult, StateMachine
from cronmesh.errors import CronmeshError
from cronmesh.raft.driver import RaftDriver, RaftSettings
from cronmesh.raft.errors import RaftError
from cronmesh.raft.types import ConfChange, ConfChangeOp
from cronmesh.rpc import raft_pb2, raft_pb2_grpc
from cronmesh.rpc.agent_rpc import SERVER_OPTIONS
from cronmesh.rpc.raft_transport import RaftTransport
from cronmesh.rpc.tls import RpcSecurity
from cronmesh.storage.env import DataDir
from cronmesh.storage.raftlog import LmdbRaftStorage

__all__ = ["Cluster", "value_json"]

log = logging.getLogger("cronmesh.cluster")

RECONCILE_INTERVAL = 1.0


def value_json(value: Any) -> bytes:
    """The JSON of an ApplyResult's value, for a forwarded write's reply."""
    if value is None:
        return b""
    if hasattr(value, "to_json"):
        value = value.to_json()
    elif isinstance(value, list):
        value = [v.to_json() if hasattr(v, "to_json") else v for v in value]
    return json.dumps(value).encode()


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
        settings: RaftSettings | None = None,
        security: RpcSecurity | None = None,
    ) -> None:
        self.name = name
        self.security = security or RpcSecurity()
        self._refused: dict[str, str] = {}  # server -> why it was not added
        self.peers = peers
        self.left = left
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
        self.driver.send = self.transport.send
        self.driver.forward = self.transport.propose_to
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.rpc_port = rpc_bind[1]

    def _resolve(self, name: str) -> str | None:
        return self.peers().get(name)

    async def _on_propose(self, command: bytes) -> raft_pb2.ProposeReply:
        if not self.driver.is_leader():
            return raft_pb2.ProposeReply(leader=self.driver.leader or "")
        try:
            result: ApplyResult = await self.driver.propose(command)
        except CronmeshError as exc:
            return raft_pb2.ProposeReply(
                leader=self.driver.leader or "", error=str(exc)
            )
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
        announced = False
        while True:
            known = set(self.peers()) | {self.name}
            if len(known) >= self.bootstrap_expect:
                founders = set(sorted(known)[: self.bootstrap_expect])
                if self.name in founders:
                    self.driver.bootstrap(founders)
                else:
                    log.info("joining an existing cluster node=%s", self.name)
                return
            if not announced:
                log.info(
                    "waiting for servers to bootstrap known=%d expect=%d",
                    len(known),
                    self.bootstrap_expect,
                )
                announced = True
            await asyncio.sleep(0.2)

    async def _reconcile(self) -> None:
        """Leader: add new servers as non-voters, promote caught-up ones."""
        membership = self.driver.membership
        known = set(self.peers()) | {self.name}
        gone = self.left() & membership.members - {self.name}
        change: ConfChange | None = None
        if gone:
            change = ConfChange(ConfChangeOp.REMOVE, sorted(gone)[0])
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
        """Every server of the configuration, for `raft list-peers`."""
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

    async def remove_peer(self, node_id: str) -> ApplyResult:
        if node_id not in self.driver.membership.members:
            raise CronmeshError(
                f"{node_id!r} is not a member of the Raft configuration"
            )
        return await self.driver.change_membership(
            ConfChange(ConfChangeOp.REMOVE, node_id)
        )

    async def stop(self, *, transfer: bool = True) -> None:
        if transfer and self.driver.is_leader():
            voters = sorted(self.driver.membership.voters - {self.name})
            if voters:
                self.driver.transfer_leadership(voters[0])
                for _ in range(30):
                    await asyncio.sleep(0.1)
                    if not self.driver.is_leader():
                        log.info("leadership handed over to=%s", self.driver.leader)
                        break
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.driver.stop()
        await self.transport.close()
        if self._server is not None:
            await self._server.stop(1)
