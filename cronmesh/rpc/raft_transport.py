"""Raft messages between servers over gRPC (protos/raft.proto).

Sending never blocks the Raft driver: `send` puts the message on the peer's
queue and a task per peer delivers it with the RPC for its type. Raft
tolerates lost messages, so a full queue or a failed call drops the message
(counted in `dropped`) instead of retrying it; the core resends what
matters on its next heartbeat. Messages to one peer keep their order, which
keeps pipelined AppendEntries from arriving shuffled in the common case.

Received messages are decoded here and handed to `on_message`; a payload
that does not decode is a peer's fault (RemoteError), answered with
INVALID_ARGUMENT and never passed on.

Every request carries the sender's cluster id (`cluster_id`, read when
sending). `admit(sender, cluster_id)` vets each received Raft message
first: a reason it returns refuses the request with FAILED_PRECONDITION
(counted in `refused`), so a server of another cluster never reaches the
Raft core. A forwarded write naming another cluster is refused the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from cronmesh.errors import RemoteError
from cronmesh.raft.messages import (
    AppendEntries,
    InstallSnapshot,
    Message,
    RequestVote,
    TimeoutNow,
    decode,
    encode,
)
from cronmesh.rpc import raft_pb2, raft_pb2_grpc
from cronmesh.rpc.tls import RpcSecurity

__all__ = ["RaftTransport"]

log = logging.getLogger("cronmesh.rpc")

QUEUE_LIMIT = 4096
CALL_TIMEOUT = 5.0
# gRPC backs off up to 2 minutes between reconnects by default, and fails
# calls at once meanwhile; a server that started a few seconds after its
# peers would stay unreachable for that long. Raft wants it back in ~1 s.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

ProposeHandler = Callable[[bytes], Awaitable[raft_pb2.ProposeReply]]


class _Peer:
    def __init__(self, peer_id: str, security: RpcSecurity) -> None:
        self.peer_id = peer_id
        self.security = security
        self.address = ""
        self.channel: grpc.aio.Channel | None = None
        self.stub: raft_pb2_grpc.RaftStub | None = None
        self.queue: asyncio.Queue[Message] = asyncio.Queue(QUEUE_LIMIT)
        self.task: asyncio.Task[None] | None = None
        self.closing: asyncio.Future[None] | None = None

    def connect(self, address: str) -> raft_pb2_grpc.RaftStub:
        if self.stub is None or address != self.address:
            if self.channel is not None:
                self.closing = asyncio.ensure_future(self.channel.close())
            self.address = address
            self.channel = self.security.channel(address, options=CHANNEL_OPTIONS)
            self.stub = raft_pb2_grpc.RaftStub(self.channel)
        return self.stub


class RaftTransport(raft_pb2_grpc.RaftServicer):
    """Both ends of the Raft RPCs of one server."""

    def __init__(
        self,
        node_id: str,
        resolve: Callable[[str], str | None],
        on_message: Callable[[Message], None],
        on_propose: ProposeHandler | None = None,
        security: RpcSecurity | None = None,
    ) -> None:
        self.node_id = node_id
        self.security = security or RpcSecurity()
        self.resolve = resolve
        self.on_message = on_message
        self.on_propose = on_propose
        self._peers: dict[str, _Peer] = {}
        self.dropped = 0
        self.received = 0
        self.cluster_id: Callable[[], str] = lambda: ""
        self.admit: Callable[[str, str], str | None] = lambda sender, cluster: None
        self.refused = 0

    # -- sending
    def send(self, msg: Message) -> None:
        peer = self._peers.get(msg.to)
        if peer is None:
            peer = self._peers[msg.to] = _Peer(msg.to, self.security)
            peer.task = asyncio.create_task(
                self._deliver(peer), name=f"raft-to-{msg.to}"
            )
        try:
            peer.queue.put_nowait(msg)
        except asyncio.QueueFull:
            self.dropped += 1

    async def _deliver(self, peer: _Peer) -> None:
        while True:
            msg = await peer.queue.get()
            address = self.resolve(peer.peer_id)
            if not address:
                self.dropped += 1
                log.debug("no address for raft peer peer=%s", peer.peer_id)
                continue
            stub = peer.connect(address)
            try:
                await self._call(stub, msg)
            except grpc.aio.AioRpcError as exc:
                self.dropped += 1
                log.debug("raft send failed peer=%s code=%s", peer.peer_id, exc.code())

    async def _call(self, stub: raft_pb2_grpc.RaftStub, msg: Message) -> None:
        request = raft_pb2.RaftMessage(
            **{"from": self.node_id, "payload": encode(msg)},
            cluster_id=self.cluster_id(),
        )
        if isinstance(msg, AppendEntries):
            await stub.AppendEntries(request, timeout=CALL_TIMEOUT)
        elif isinstance(msg, RequestVote):
            await stub.RequestVote(request, timeout=CALL_TIMEOUT)
        elif isinstance(msg, TimeoutNow):
            await stub.TimeoutNow(request, timeout=CALL_TIMEOUT)
        elif isinstance(msg, InstallSnapshot):

            async def chunks() -> AsyncIterator[raft_pb2.RaftMessage]:
                yield request

            await stub.InstallSnapshot(chunks(), timeout=CALL_TIMEOUT * 6)
        else:
            await stub.Deliver(request, timeout=CALL_TIMEOUT)

    async def propose_to(self, peer_id: str, command: bytes) -> raft_pb2.ProposeReply:
        """Ask server `peer_id` (the leader) to apply `command`."""
        address = self.resolve(peer_id)
        if not address:
            raise RemoteError(f"no address known for server {peer_id!r}")
        peer = self._peers.get(peer_id) or self._peers.setdefault(
            peer_id, _Peer(peer_id, self.security)
        )
        if peer.task is None:
            peer.task = asyncio.create_task(
                self._deliver(peer), name=f"raft-to-{peer_id}"
            )
        stub = peer.connect(address)
        reply: raft_pb2.ProposeReply = await stub.Propose(
            raft_pb2.ProposeRequest(command=command, cluster_id=self.cluster_id()),
            timeout=CALL_TIMEOUT * 2,
        )
        return reply

    async def close(self) -> None:
        for peer in self._peers.values():
            if peer.task is not None:
                peer.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await peer.task
            if peer.channel is not None:
                await peer.channel.close()
        self._peers.clear()

    # -- receiving
    def _vet(self, sender: str, cluster_id: str) -> None:
        reason = self.admit(sender, cluster_id)
        if reason:
            self.refused += 1
            raise _Refused(reason)

    def _receive(self, request: raft_pb2.RaftMessage) -> None:
        self._vet(getattr(request, "from"), request.cluster_id)
        try:
            msg = decode(request.payload)
        except Exception as exc:  # the codec's own error types vary
            sender = getattr(request, "from")
            raise RemoteError(f"undecodable raft message from {sender!r}") from exc
        if msg.to != self.node_id:
            raise RemoteError(f"raft message for {msg.to!r} reached {self.node_id!r}")
        self.received += 1
        self.on_message(msg)

    async def _handle(
        self, request: raft_pb2.RaftMessage, context: grpc.aio.ServicerContext
    ) -> raft_pb2.Ack:
        try:
            self._receive(request)
        except _Refused as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except RemoteError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return raft_pb2.Ack()

    AppendEntries = _handle
    RequestVote = _handle
    TimeoutNow = _handle
    Deliver = _handle

    async def InstallSnapshot(
        self,
        request_iterator: AsyncIterator[raft_pb2.RaftMessage],
        context: grpc.aio.ServicerContext,
    ) -> raft_pb2.Ack:
        async for request in request_iterator:
            try:
                self._receive(request)
            except _Refused as exc:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            except RemoteError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return raft_pb2.Ack()

    async def Propose(
        self, request: raft_pb2.ProposeRequest, context: grpc.aio.ServicerContext
    ) -> raft_pb2.ProposeReply:
        if self.on_propose is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not a server")
        assert self.on_propose is not None
        mine = self.cluster_id()
        # Agents that are not servers send no id; any cluster takes their writes.
        if request.cluster_id and mine and request.cluster_id != mine:
            self.refused += 1
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"write for cluster {request.cluster_id} sent to a server of "
                f"cluster {mine}",
            )
        return await self.on_propose(request.command)


class _Refused(RemoteError):
    """A request from a server of another cluster (see `RaftTransport.admit`)."""
