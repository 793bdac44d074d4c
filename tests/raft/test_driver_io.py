"""The asyncio driver and the gRPC transport on real LMDB and real sockets.

Three drivers share one event loop and talk through an in-memory network
(or through `RaftTransport` on loopback), each on its own data dir.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import lmdb

from cronmesh.core.fsm import StateMachine, encode_command
from cronmesh.raft.driver import RaftDriver, RaftSettings
from cronmesh.raft.messages import AppendEntries, Message
from cronmesh.rpc import raft_pb2_grpc
from cronmesh.rpc.raft_transport import RaftTransport
from cronmesh.storage.env import DataDir
from cronmesh.storage.raftlog import LmdbRaftStorage
from cronmesh.storage.state import StateStore

NAMES = ["a", "b", "c"]


def run(scenario: Callable[[], Awaitable[None]], timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout))


class Node:
    """One server: data dir, state machine, driver, and a log of its commits."""

    def __init__(self, name: str, path: Path, seed: int) -> None:
        self.data = DataDir(path / name)
        self.fsm = StateMachine(StateStore(self.data))
        self.storage = LmdbRaftStorage(self.data)
        self.driver = RaftDriver(
            name,
            self.storage,
            self.fsm,
            settings=RaftSettings(tick=0.02),
            rng=random.Random(seed),
        )
        # (log last index, applied index) after every write transaction.
        self.commits: list[tuple[int, int]] = []
        real = self.data.write

        def counted(fn: Callable[[lmdb.Transaction], Any]) -> Any:
            result = real(fn)
            self.commits.append(
                (self.storage.log.last_index(), self.fsm.store.applied_index())
            )
            return result

        self.data.write = counted  # type: ignore[method-assign]

    def close(self) -> None:
        self.data.close()


async def leader_of(nodes: dict[str, Node]) -> Node:
    while True:
        leaders = [n for n in nodes.values() if n.driver.is_leader()]
        if len(leaders) == 1:
            return leaders[0]
        await asyncio.sleep(0.01)


async def settle(nodes: dict[str, Node], index: int) -> None:
    while any(n.fsm.store.applied_index() < index for n in nodes.values()):
        await asyncio.sleep(0.01)


def test_followers_apply_in_the_transaction_that_stores_the_next_entry(
    tmp_path: Path,
) -> None:
    nodes = {name: Node(name, tmp_path, seed) for seed, name in enumerate(NAMES)}

    async def scenario() -> None:
        for node in nodes.values():
            node.driver.send = lambda msg: nodes[msg.to].driver.deliver(msg)
            node.driver.bootstrap(set(NAMES))
            node.driver.start()
        leader = await leader_of(nodes)
        for i in range(30):
            result = await leader.driver.propose(encode_command("noop", i=i))
            assert result.ok
        last = leader.storage.log.last_index()
        await settle(nodes, last)
        for node in nodes.values():
            await node.driver.stop()
        for node in nodes.values():
            if node is leader:
                continue
            # Some commit both stored new entries and applied older ones;
            # before, storing and applying were always two commits.
            pairs = [(0, 0), *node.commits]
            both = [
                (old, new)
                for old, new in itertools.pairwise(pairs)
                if new[0] > old[0] and new[1] > old[1]
            ]
            assert both, node.commits

    try:
        run(scenario)
    finally:
        for node in nodes.values():
            node.close()


def test_a_restarted_cluster_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    nodes = {name: Node(name, tmp_path, seed) for seed, name in enumerate(NAMES)}
    acked: list[int] = []

    async def first_life() -> None:
        for node in nodes.values():
            node.driver.send = lambda msg: nodes[msg.to].driver.deliver(msg)
            node.driver.bootstrap(set(NAMES))
            node.driver.start()
        leader = await leader_of(nodes)

        async def proposer(k: int) -> None:
            for i in range(10):
                await leader.driver.propose(encode_command("noop", k=k, i=i))
                acked.append(k * 100 + i)

        await asyncio.gather(*(proposer(k) for k in range(8)))
        for node in nodes.values():
            await node.driver.stop()

    try:
        run(first_life)
    finally:
        for node in nodes.values():
            node.close()
    assert len(acked) == 80
    # Reopen: every server's log holds every acknowledged entry (a majority
    # at least), and each state machine is at most its durable log.
    reopened = {name: Node(name, tmp_path, 9) for name in NAMES}
    try:
        lasts = sorted(n.storage.log.last_index() for n in reopened.values())
        assert lasts[1] >= 80  # 80 proposals plus the config and no-op entries
        for node in reopened.values():
            assert node.fsm.store.applied_index() <= node.storage.log.last_index()
    finally:
        for node in reopened.values():
            node.close()


# -- the transport on loopback


class _Server:
    def __init__(self, transport: RaftTransport) -> None:
        self.transport = transport
        self.server = grpc.aio.server()
        raft_pb2_grpc.add_RaftServicer_to_server(transport, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def __aenter__(self) -> _Server:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.transport.close()
        await self.server.stop(None)


class _Legacy(RaftTransport):
    """A receiver built before Stream existed: it answers UNIMPLEMENTED."""

    Stream = raft_pb2_grpc.RaftServicer.Stream  # type: ignore[assignment]


def appends(n: int) -> list[Message]:
    return [
        AppendEntries(to="b", frm="a", term=1, prev_index=i, prev_term=1, commit=i)
        for i in range(n)
    ]


async def _exchange(receiver_cls: type[RaftTransport], n: int) -> list[Message]:
    """Send n appends from "a" to "b"; what "b" received after the first n."""
    got: list[Message] = []
    receiver = receiver_cls("b", lambda _: None, got.append)
    async with _Server(receiver) as server:
        sender = RaftTransport("a", lambda _: f"127.0.0.1:{server.port}", got.append)
        try:
            # Until a message got through: an older receiver's refusal of
            # the stream costs the first messages (Raft resends them).
            probe = AppendEntries(to="b", frm="a", term=9, prev_index=0, prev_term=0)
            while not got:
                sender.send(probe)
                await asyncio.sleep(0.05)
            while got[-1] != probe:
                await asyncio.sleep(0.01)
            got.clear()
            dropped = sender.dropped
            for msg in appends(n):
                sender.send(msg)
            while len(got) < n:
                await asyncio.sleep(0.01)
            assert sender.dropped == dropped
        finally:
            await sender.close()
    return got


def test_messages_arrive_complete_and_in_order_over_the_stream() -> None:
    async def scenario() -> None:
        got = await _exchange(RaftTransport, 500)
        assert got == appends(500)

    run(scenario)


def test_a_receiver_without_stream_gets_one_call_per_message() -> None:
    async def scenario() -> None:
        got = await _exchange(_Legacy, 20)
        assert got == appends(20)

    run(scenario)


def test_a_closed_receiver_ends_the_streams_that_peers_opened() -> None:
    async def scenario() -> None:
        receiver = RaftTransport("b", lambda _: None, lambda _: None)
        async with _Server(receiver) as server:
            sender = RaftTransport("a", lambda _: f"127.0.0.1:{server.port}", print)
            try:
                sender.send(appends(1)[0])
                while receiver.received < 1:
                    await asyncio.sleep(0.01)
                stream = sender._peers["b"].stream
                assert stream is not None and not stream.done()
                await receiver.close()
                sender.send(appends(2)[1])  # e.g. the next heartbeat
                assert await stream.code() is grpc.StatusCode.UNAVAILABLE
                assert receiver.received == 1
            finally:
                await sender.close()

    run(scenario)
