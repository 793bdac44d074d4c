"""Raft messages between servers over gRPC (protos/raft.proto).

Sending never blocks the Raft driver: `send` puts the message on the peer's
queue and a task per peer writes it to one long-lived `Stream` call to that
peer, together with whatever else queued up meanwhile (one stream item
carries them all, oldest first). A stream costs a unary call's set-up once
instead of per message; the receiver hands each message to `on_message` in
order. Snapshot chunks still go through `InstallSnapshot`, and a peer that
answers UNIMPLEMENTED to `Stream` (an older build) gets one unary call per
message, as before.

Raft tolerates lost messages, so a full queue or a failed write drops the
messages (counted in `dropped`) instead of retrying them; the stream is
opened again for the next message and the core resends what matters on its
next heartbeat. Messages to one peer keep their order, which keeps
pipelined AppendEntries from arriving shuffled in the common case.

Received messages are decoded here and handed to `on_message`; a payload
that does not decode is a peer's fault (RemoteError), answered with
INVALID_ARGUMENT and never passed on.

Wire versions: every request says which version of the message codec the
sender decodes (`wire`, cronmesh/raft/messages.py). A peer gets version 1
(JSON, what every build reads) until a request from it has said it reads
version 2 (binary, much cheaper); after a failed send it gets version 1
again until it says so anew, so a peer downgraded to an older build is
not sent what it cannot read for longer than that.

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
    WIRE_VERSION,
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
# Bytes of encoded messages put into one stream item at most (a message
# larger than this goes alone); gRPC's default receive limit is 4 MiB.
BATCH_BYTES = 1 << 20
# gRPC backs off up to 2 minutes between reconnects by default, and fails
# calls at once meanwhile; a server that started a few seconds after its
# peers would stay unreachable for that long. Raft wants it back in ~1 s.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

ProposeHandler = Callable[[bytes], Awaitable[raft_pb2.ProposeReply]]
StreamCall = grpc.aio.StreamUnaryCall[raft_pb2.RaftBatch, raft_pb2.Ack]


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
        self.stream: StreamCall | None = None
        # The peer has no Stream (an older build). Limitation: kept until its
        # address changes, so an upgraded peer gets unary calls until then.
        self.unary_only = False
        # The newest wire version the peer said it decodes (1 until it has).
        self.wire = 1

    def connect(self, address: str) -> raft_pb2_grpc.RaftStub:
        if self.stub is None or address != self.address:
            if self.stub is not None:  # moved: maybe another build now
                self.wire = 1
            self.drop_stream()
            if self.channel is not None:
                self.closing = asyncio.ensure_future(self.channel.close())
            self.address = address
            self.unary_only = False
            self.channel = self.security.channel(address, options=CHANNEL_OPTIONS)
            self.stub = raft_pb2_grpc.RaftStub(self.channel)
        return self.stub

    def drop_stream(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
            self.stream = None

    def take_batch(self, first: Message) -> list[Message]:
        """``first`` and whatever else is queued, oldest first."""
        batch = [first]
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return batch


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
        # Wire version each sender said it decodes, for peers not yet in
        # `_peers` (a server that hears from a peer before sending to it).
        self._wire: dict[str, int] = {}
        self._closed = False
        # The contexts of the `Stream` calls peers have open to this server.
        self._incoming: set[grpc.aio.ServicerContext] = set()
        self.dropped = 0
        self.received = 0
        self.cluster_id: Callable[[], str] = lambda: ""
        self.admit: Callable[[str, str], str | None] = lambda sender, cluster: None
        self.refused = 0

    # -- sending
    def send(self, msg: Message) -> None:
        peer = self._peers.get(msg.to)
        if peer is None:
            peer = self._peers[msg.to] = self._new_peer(msg.to)
            peer.task = asyncio.create_task(
                self._deliver(peer), name=f"raft-to-{msg.to}"
            )
        try:
            peer.queue.put_nowait(msg)
        except asyncio.QueueFull:
            self.dropped += 1

    def _new_peer(self, peer_id: str) -> _Peer:
        peer = _Peer(peer_id, self.security)
        peer.wire = self._wire.get(peer_id, 1)
        return peer

    async def _deliver(self, peer: _Peer) -> None:
        while True:
            batch = peer.take_batch(await peer.queue.get())
            address = self.resolve(peer.peer_id)
            if not address:
                self.dropped += len(batch)
                log.debug("no address for raft peer peer=%s", peer.peer_id)
                continue
            stub = peer.connect(address)
            # Snapshot chunks go alone through InstallSnapshot; each run of
            # other messages is one stream write.
            start = 0
            for end in range(len(batch) + 1):
                if end < len(batch) and not isinstance(batch[end], InstallSnapshot):
                    continue
                if start < end:
                    await self._send_run(peer, stub, batch[start:end])
                if end < len(batch):
                    await self._send_run(peer, stub, [batch[end]])
                start = end + 1

    async def _send_run(
        self, peer: _Peer, stub: raft_pb2_grpc.RaftStub, run: list[Message]
    ) -> None:
        try:
            if isinstance(run[0], InstallSnapshot) or peer.unary_only:
                for msg in run:
                    await self._call(peer, stub, msg)
            elif not await self._write(peer, stub, run):
                self.dropped += len(run)
                peer.wire = 1
        except grpc.aio.AioRpcError as exc:
            self.dropped += len(run)
            peer.wire = 1
            log.debug("raft send failed peer=%s code=%s", peer.peer_id, exc.code())
        except TimeoutError:
            peer.drop_stream()
            self.dropped += len(run)
            peer.wire = 1
            log.debug("raft stream stalled peer=%s", peer.peer_id)

    async def _open_stream(
        self, peer: _Peer, stub: raft_pb2_grpc.RaftStub
    ) -> StreamCall | None:
        """The peer's stream, a new one if the last has ended; None when the
        peer has no Stream (then every message goes by a unary call)."""
        if peer.stream is not None and peer.stream.done():
            code = await peer.stream.code()
            peer.stream = None
            if code is grpc.StatusCode.UNIMPLEMENTED:
                log.info(
                    "raft peer has no stream; one call a message peer=%s", peer.peer_id
                )
                peer.unary_only = True
                return None
        if peer.stream is None:
            peer.stream = stub.Stream()
        return peer.stream

    async def _write(
        self, peer: _Peer, stub: raft_pb2_grpc.RaftStub, batch: list[Message]
    ) -> bool:
        """Write ``batch`` to the peer's stream; False if it was not written
        (the stream had ended: it is opened again for the next batch).

        Raises:
            grpc.aio.AioRpcError: the stream failed.
            TimeoutError: the peer took no data for CALL_TIMEOUT.
        """
        payloads = [encode(msg, peer.wire) for msg in batch]
        items: list[list[bytes]] = [[]]
        size = 0
        for payload in payloads:
            if items[-1] and size + len(payload) > BATCH_BYTES:
                items.append([])
                size = 0
            items[-1].append(payload)
            size += len(payload)
        async with asyncio.timeout(CALL_TIMEOUT):
            for item in items:
                stream = await self._open_stream(peer, stub)
                if stream is None:
                    return False
                try:
                    await stream.write(
                        raft_pb2.RaftBatch(
                            **{"from": self.node_id, "payloads": item},
                            cluster_id=self.cluster_id(),
                            wire=WIRE_VERSION,
                        )
                    )
                except asyncio.InvalidStateError:  # it ended before this write
                    return False
        return True

    async def _call(
        self, peer: _Peer, stub: raft_pb2_grpc.RaftStub, msg: Message
    ) -> None:
        request = raft_pb2.RaftMessage(
            **{"from": self.node_id, "payload": encode(msg, peer.wire)},
            cluster_id=self.cluster_id(),
            wire=WIRE_VERSION,
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
            peer_id, self._new_peer(peer_id)
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
        """Close the streams this server opened and end those peers opened
        to it, so stopping the gRPC server finds no call still running."""
        self._closed = True
        for context in list(self._incoming):
            # A peer that is not the leader may send nothing for as long as
            # it lives: its stream would last until gRPC cancels it at the
            # end of the stop's grace period, and gRPC warns "Aborting method
            # ... due to server stop" when it does. Ended here, the handler
            # wakes from its read with this abort and returns quietly.
            with contextlib.suppress(grpc.aio.BaseError):
                await context.abort(grpc.StatusCode.UNAVAILABLE, "server stopping")
        for peer in self._peers.values():
            peer.drop_stream()
            if peer.task is not None:
                peer.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await peer.task
            if peer.channel is not None:
                await peer.channel.close()
        self._peers.clear()

    # -- receiving
    def _vet(self, sender: str, cluster_id: str, wire: int) -> None:
        reason = self.admit(sender, cluster_id)
        if reason:
            self.refused += 1
            raise _Refused(reason)
        if wire > 1:
            self._learn_wire(sender, wire)

    def _learn_wire(self, sender: str, wire: int) -> None:
        """Note that `sender` decodes wire versions up to `wire`."""
        version = min(wire, WIRE_VERSION)
        peer = self._peers.get(sender)
        if peer is not None:
            peer.wire = version
        if self._wire.get(sender) != version:
            self._wire[sender] = version
            log.debug("raft peer wire version peer=%s version=%d", sender, version)

    def _receive(self, request: raft_pb2.RaftMessage) -> None:
        self._vet(getattr(request, "from"), request.cluster_id, request.wire)
        self._receive_payload(getattr(request, "from"), request.payload)

    def _receive_payload(self, sender: str, payload: bytes) -> None:
        try:
            msg = decode(payload)
        except Exception as exc:  # the codec's own error types vary
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

    async def Stream(
        self,
        request_iterator: AsyncIterator[raft_pb2.RaftBatch],
        context: grpc.aio.ServicerContext,
    ) -> raft_pb2.Ack:
        if self._closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server stopping")
        self._incoming.add(context)
        try:
            return await self._stream(request_iterator, context)
        finally:
            self._incoming.discard(context)

    async def _stream(
        self,
        request_iterator: AsyncIterator[raft_pb2.RaftBatch],
        context: grpc.aio.ServicerContext,
    ) -> raft_pb2.Ack:
        async for batch in request_iterator:
            if self._closed:  # a batch read as close() ran: not taken
                await context.abort(grpc.StatusCode.UNAVAILABLE, "server stopping")
            sender = getattr(batch, "from")
            try:
                self._vet(sender, batch.cluster_id, batch.wire)
            except _Refused as exc:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            for payload in batch.payloads:
                try:
                    self._receive_payload(sender, payload)
                except RemoteError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return raft_pb2.Ack()

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
