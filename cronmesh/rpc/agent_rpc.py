"""gRPC between agents and servers about executions (protos/agent.proto).

Every node serves `Agent`: the leader asks it to run an execution, any node
may ask for its output or kill it. Servers serve `Executions`: agents send
heartbeats about what they run, and a non-server agent forwards API requests
it cannot answer from state it does not hold.

`ServerLink` is the client side of "talk to the leader" for any node: it
tries the server it believes leads, follows the `leader` hint of a reply,
and falls back to the other servers it knows from the mesh.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from cronmesh.core.commitlog import NotLeaderError
from cronmesh.core.fsm import ApplyResult
from cronmesh.core.output import OutputFollower
from cronmesh.errors import CronmeshError, RunRefusedError, TransportError
from cronmesh.rpc import agent_pb2, agent_pb2_grpc, raft_pb2, raft_pb2_grpc
from cronmesh.rpc.tls import RpcSecurity

__all__ = [
    "SERVER_OPTIONS",
    "AgentClient",
    "AgentService",
    "ExecutionsService",
    "ServerLink",
]

# A staged run is held this long at most (--stage-ahead allows up to 60 s).
MAX_START_IN = 60.0

log = logging.getLogger("cronmesh.rpc")

CALL_TIMEOUT = 5.0
# Output streams: the agent sends an empty chunk after KEEPALIVE seconds
# without output; a follower gives up after FOLLOW_SILENCE without any.
KEEPALIVE = 2.0
FOLLOW_SILENCE = 10.0
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Forwarded API requests (a restore, a backup) can be large.
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]

# Every node's gRPC server. Without so_reuseport=0 gRPC binds with
# SO_REUSEPORT and a second agent on the same port would silently share it;
# the size limit matches the channels' (a forwarded restore can be large).
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


class Channels:
    """One cached channel per address (the one place channels are opened)."""

    def __init__(self, security: RpcSecurity | None = None) -> None:
        self.security = security or RpcSecurity()
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self.security.channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


# -- server side
class AgentService(agent_pb2_grpc.AgentServicer):
    """Runs executions on this node for the leader."""

    def __init__(
        self,
        run: Callable[[dict[str, Any], dict[str, Any], float], Awaitable[str]],
        kill: Callable[[str], bool],
        output: Callable[[str, int], tuple[bytes, int, bool] | None],
    ) -> None:
        self._run = run
        self._kill = kill
        self._output = output

    async def AgentRun(
        self, request: agent_pb2.RunRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RunReply:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            # The leader stopped waiting: it may judge the run by this
            # node's heartbeats now, so a late hand-over must start nothing.
            return agent_pb2.RunReply(
                accepted=False, error="the hand-over arrived after its deadline"
            )
        try:
            job = json.loads(request.job)
            execution = json.loads(request.execution)
            start_in = min(max(0.0, request.start_in), MAX_START_IN)
            state = await self._run(job, execution, start_in)
        except (ValueError, KeyError, TypeError, CronmeshError) as exc:
            return agent_pb2.RunReply(accepted=False, error=str(exc))
        return agent_pb2.RunReply(accepted=True, state=state)

    async def Kill(
        self, request: agent_pb2.KillRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.KillReply:
        return agent_pb2.KillReply(found=self._kill(request.execution_id))

    async def Output(
        self, request: agent_pb2.OutputRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.OutputChunk]:
        # A follower slower than the output misses what the capped live
        # buffer dropped meanwhile: it gets a cut marker in `data` instead,
        # and `offset` keeps counting the job's bytes only.
        follower = OutputFollower(request.offset)
        quiet = 0.0
        while True:
            got = self._output(request.execution_id, follower.offset)
            if got is None:
                yield agent_pb2.OutputChunk(
                    found=False, finished=True, offset=follower.offset
                )
                return
            kept, end, finished = got
            skipped = follower.skipped
            data = follower.take(kept, end, last=finished or not request.follow)
            if follower.skipped > skipped:
                log.debug(
                    "output follower skipped execution=%s bytes=%d",
                    request.execution_id,
                    follower.skipped - skipped,
                )
            # An empty chunk now and then tells the follower this node lives.
            if data or finished or not request.follow or quiet >= KEEPALIVE:
                quiet = 0.0
                yield agent_pb2.OutputChunk(
                    data=data, offset=follower.offset, found=True, finished=finished
                )
            if finished or not request.follow:
                return
            await asyncio.sleep(0.2)
            quiet += 0.2


class ExecutionsService(agent_pb2_grpc.ExecutionsServicer):
    """A server's side of heartbeats and forwarded API requests."""

    def __init__(
        self,
        heartbeat: Callable[[str, list[str]], agent_pb2.HeartbeatReply],
        http: Callable[[agent_pb2.HttpRequest], Awaitable[agent_pb2.HttpReply]],
    ) -> None:
        self._heartbeat = heartbeat
        self._http = http

    async def Heartbeat(
        self, request: agent_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.HeartbeatReply:
        return self._heartbeat(request.node, list(request.running))

    async def Http(
        self, request: agent_pb2.HttpRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.HttpReply:
        return await self._http(request)


# -- client side
class AgentClient:
    """Calls on other agents, by RPC address."""

    def __init__(self, channels: Channels) -> None:
        self.channels = channels

    def _stub(self, address: str) -> agent_pb2_grpc.AgentStub:
        return agent_pb2_grpc.AgentStub(self.channels.get(address))

    async def run(
        self, address: str, job: bytes, execution: bytes, start_in: float = 0.0
    ) -> str:
        """Hand an execution to the agent at `address`: "started", or
        "running"/"done" when an earlier hand-over already started it.
        `start_in`: seconds until the agent starts it (a staged run).

        Raises:
            RunRefusedError: the agent answered that it does not run it.
            TransportError: no connection to the agent.
            CronmeshError: no answer in time (the agent may have it).
        """
        try:
            reply = await self._stub(address).AgentRun(
                agent_pb2.RunRequest(job=job, execution=execution, start_in=start_in),
                timeout=CALL_TIMEOUT,
            )
        except grpc.aio.AioRpcError as exc:
            # UNAVAILABLE: no connection (or it broke), so the request most
            # likely never arrived; any other code, a deadline above all, may
            # come after the agent got it.
            error = (
                TransportError
                if exc.code() == grpc.StatusCode.UNAVAILABLE
                else CronmeshError
            )
            raise error(
                f"agent at {address} unreachable: {exc.code().name} {exc.details()}"
            ) from exc
        if not reply.accepted:
            raise RunRefusedError(f"agent at {address} refused the run: {reply.error}")
        return reply.state or "started"

    async def kill(self, address: str, exec_id: str) -> bool:
        try:
            reply = await self._stub(address).Kill(
                agent_pb2.KillRequest(execution_id=exec_id), timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            raise CronmeshError(
                f"agent at {address} unreachable: {exc.code().name}"
            ) from exc
        return bool(reply.found)

    async def output(
        self, address: str, exec_id: str, *, follow: bool, offset: int = 0
    ) -> AsyncIterator[agent_pb2.OutputChunk]:
        call = self._stub(address).Output(
            agent_pb2.OutputRequest(execution_id=exec_id, follow=follow, offset=offset),
            timeout=None if follow else CALL_TIMEOUT,
        )
        try:
            while True:
                # A following stream hears from a live node every KEEPALIVE.
                try:
                    async with asyncio.timeout(FOLLOW_SILENCE):
                        chunk = await call.read()
                except TimeoutError as exc:
                    raise CronmeshError(
                        f"agent at {address} sent nothing for {FOLLOW_SILENCE:.0f} s"
                    ) from exc
                if chunk is grpc.aio.EOF:
                    return
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise CronmeshError(
                f"agent at {address} unreachable: {exc.code().name}"
            ) from exc
        finally:
            call.cancel()


class ServerLink:
    """Reaches the leader from any node.

    `servers()` gives the servers alive in the mesh ({name: rpc address});
    `leader()` the name this node believes leads (None if it has no idea).
    """

    def __init__(
        self,
        channels: Channels,
        servers: Callable[[], dict[str, str]],
        leader: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.channels = channels
        self.servers = servers
        self.leader = leader
        self.last_leader: str | None = None

    def _order(self) -> list[tuple[str, str]]:
        servers = self.servers()
        first = [n for n in (self.leader(), self.last_leader) if n in servers]
        names = list(dict.fromkeys([*first, *sorted(servers)]))
        return [(n, servers[n]) for n in names]

    async def _call(self, fn: Callable[[str], Awaitable[Any]], what: str) -> Any:
        """Run `fn(address)` on the leader: returns its reply.

        `fn` returns None when the server it asked does not lead (it raises
        _Redirect for a hint). Tries each known server once at most.
        """
        order = self._order()
        if not order:
            raise NotLeaderError("")
        tried: set[str] = set()
        errors: list[str] = []
        queue = list(order)
        servers = dict(order)
        while queue:
            name, address = queue.pop(0)
            if name in tried:
                continue
            tried.add(name)
            try:
                reply = await fn(address)
            except _Redirect as hint:
                if hint.leader in servers and hint.leader not in tried:
                    queue.insert(0, (hint.leader, servers[hint.leader]))
                continue
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{name}: {exc.code().name}")
                continue
            self.last_leader = name
            return reply
        log.debug("no leader answered %s errors=%s", what, errors)
        if errors:
            raise CronmeshError(f"no server took the {what}: {', '.join(errors)}")
        raise NotLeaderError(self.last_leader or "")

    async def propose(self, payload: bytes) -> ApplyResult:
        async def call(address: str) -> ApplyResult:
            stub = raft_pb2_grpc.RaftStub(self.channels.get(address))
            reply = await stub.Propose(
                raft_pb2.ProposeRequest(command=payload), timeout=CALL_TIMEOUT * 2
            )
            if not reply.code:
                raise _Redirect(reply.leader)
            value = json.loads(reply.value) if reply.value else None
            return ApplyResult(code=reply.code, error=reply.error, value=value)

        result: ApplyResult = await self._call(call, "propose")
        return result

    async def heartbeat(self, node: str, running: list[str]) -> list[str]:
        async def call(address: str) -> list[str]:
            stub = agent_pb2_grpc.ExecutionsStub(self.channels.get(address))
            reply = await stub.Heartbeat(
                agent_pb2.HeartbeatRequest(node=node, running=running),
                timeout=CALL_TIMEOUT,
            )
            if not reply.ok:
                raise _Redirect(reply.leader)
            return list(reply.unknown)

        unknown: list[str] = await self._call(call, "heartbeat")
        return unknown

    async def http_at(
        self, address: str, request: agent_pb2.HttpRequest
    ) -> agent_pb2.HttpReply:
        """Run an API request on the server at `address`."""
        stub = agent_pb2_grpc.ExecutionsStub(self.channels.get(address))
        try:
            reply: agent_pb2.HttpReply = await stub.Http(
                request, timeout=CALL_TIMEOUT * 6
            )
        except grpc.aio.AioRpcError as exc:
            raise NotLeaderError("") from exc
        return reply

    async def http(self, request: agent_pb2.HttpRequest) -> agent_pb2.HttpReply:
        """Any server answers (reads come from its state; writes it forwards)."""
        order = self._order()
        if not order:
            raise NotLeaderError("")
        last: Exception | None = None
        for _name, address in order:
            stub = agent_pb2_grpc.ExecutionsStub(self.channels.get(address))
            try:
                reply: agent_pb2.HttpReply = await stub.Http(
                    request, timeout=CALL_TIMEOUT * 6
                )
                return reply
            except grpc.aio.AioRpcError as exc:
                last = exc
        raise NotLeaderError("") from last


class _Redirect(Exception):
    def __init__(self, leader: str) -> None:
        super().__init__(leader)
        self.leader = leader


class RemoteLog:
    """The CommandLog of an agent without --server: every write goes to the
    leader through `ServerLink`."""

    def __init__(self, link: ServerLink) -> None:
        self.link = link

    def is_leader(self) -> bool:
        return False

    async def propose(self, payload: bytes) -> ApplyResult:
        return await self.link.propose(payload)
