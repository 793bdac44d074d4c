"""The asyncio driver and the gRPC transport on real LMDB and real sockets.

Three drivers share one event loop and talk through an in-memory network
(or through `RaftTransport` on loopback), each on its own data dir.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import lmdb
import pytest

from cronmesh.core.fsm import StateMachine, encode_command
from cronmesh.raft.driver import RaftDriver, RaftSettings
from cronmesh.raft.messages import (
    AppendEntries,
    AppendEntriesResp,
    Message,
    TimeoutNow,
    encode,
)
from cronmesh.rpc import raft_pb2, raft_pb2_grpc
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


def test_a_lone_proposal_goes_out_at_once_and_its_apply_is_synced_on_a_tick(
    tmp_path: Path,
) -> None:
    nodes = {name: Node(name, tmp_path, seed) for seed, name in enumerate(NAMES)}
    gathers = {name: 0 for name in NAMES}
    for name, node in nodes.items():
        real = node.driver._gather

        async def counted(loop: Any, name: str = name, real: Any = real) -> None:
            gathers[name] += 1
            await real(loop)

        node.driver._gather = counted  # type: ignore[method-assign]

    async def scenario() -> None:
        for node in nodes.values():
            node.driver.send = lambda msg: nodes[msg.to].driver.deliver(msg)
            node.driver.bootstrap(set(NAMES))
            node.driver.start()
        leader = await leader_of(nodes)
        name = leader.driver.node_id
        for i in range(20):
            assert (await leader.driver.propose(encode_command("noop", i=i))).ok
            # Answered after an apply whose meta page is not fsynced yet.
            assert leader.data.unsynced_writes > 0
        assert gathers[name] == 0
        # The next tick makes every server's applies durable.
        await settle(nodes, leader.storage.log.last_index())
        while any(n.data.unsynced_writes for n in nodes.values()):
            await asyncio.sleep(0.01)
        # Proposals that come while another waits for its commit are gathered:
        # hold the leader's messages so that the first one stays uncommitted.
        held: list[Message] = []
        leader.driver.send = held.append
        first = asyncio.ensure_future(leader.driver.propose(encode_command("noop")))
        while not held:
            await asyncio.sleep(0.001)
        more = [
            asyncio.ensure_future(leader.driver.propose(encode_command("noop", k=k)))
            for k in range(8)
        ]
        while gathers[name] == 0:
            await asyncio.sleep(0.001)
        leader.driver.send = lambda msg: nodes[msg.to].driver.deliver(msg)
        for msg in held:
            leader.driver.send(msg)
        results = await asyncio.gather(first, *more)
        assert all(r.ok for r in results)
        assert gathers[name] > 0
        for node in nodes.values():
            await node.driver.stop()

    try:
        run(scenario)
    finally:
        for node in nodes.values():
            node.close()


def test_a_single_voter_gathers_even_sequential_proposals(tmp_path: Path) -> None:
    # Its commits finish within the turn, so "something is pending" never
    # tells it a burst is under way: it keeps waiting for company.
    node = Node("a", tmp_path, 1)
    gathers = 0
    real = node.driver._gather

    async def counted(loop: Any) -> None:
        nonlocal gathers
        gathers += 1
        await real(loop)

    node.driver._gather = counted  # type: ignore[method-assign]

    async def scenario() -> None:
        node.driver.bootstrap({"a"})
        node.driver.start()
        await leader_of({"a": node})
        for i in range(5):
            assert (await node.driver.propose(encode_command("noop", i=i))).ok
        assert gathers == 5
        await node.driver.stop()

    try:
        run(scenario)
    finally:
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


def test_a_closed_receiver_ends_the_streams_that_peers_opened(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At once, even an idle one: a peer that is not the leader may send
    nothing for as long as it lives, and its stream would run until gRPC
    cancels it at the end of the stop's grace period, warning "Aborting
    method ... due to server stop". Nothing received after close() is taken."""

    async def scenario() -> None:
        receiver = RaftTransport("b", lambda _: None, lambda _: None)
        server = grpc.aio.server()
        raft_pb2_grpc.add_RaftServicer_to_server(receiver, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        sender = RaftTransport("a", lambda _: f"127.0.0.1:{port}", print)
        try:
            sender.send(appends(1)[0])
            while receiver.received < 1:
                await asyncio.sleep(0.01)
            stream = sender._peers["b"].stream
            assert stream is not None
            await receiver.close()  # nothing more is sent on the stream
            code = await asyncio.wait_for(stream.code(), 10)
            assert code is grpc.StatusCode.UNAVAILABLE
            sender.send(appends(2)[1])  # the next heartbeat opens a new stream
            while sender._peers["b"].stream in (stream, None):
                await asyncio.sleep(0.01)
            again = sender._peers["b"].stream
            assert again is not None
            code = await asyncio.wait_for(again.code(), 10)
            assert code is grpc.StatusCode.UNAVAILABLE
            assert receiver.received == 1
            with caplog.at_level(logging.DEBUG, logger="grpc"):
                await server.stop(30)
        finally:
            await sender.close()

    run(scenario)
    noise = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert noise == [], [r.getMessage() for r in noise]


class _Recording(RaftTransport):
    """Notes the wire version of every payload it receives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.versions: list[int] = []

    def _receive_payload(self, sender: str, payload: bytes) -> None:
        self.versions.append(payload[2])
        super()._receive_payload(sender, payload)


def test_a_peer_is_sent_binary_messages_once_it_said_it_reads_them() -> None:
    async def scenario() -> None:
        got: dict[str, list[Message]] = {"a": [], "b": []}
        ports: dict[str, int] = {}
        a = _Recording("a", lambda peer: f"127.0.0.1:{ports[peer]}", got["a"].append)
        b = _Recording("b", lambda peer: f"127.0.0.1:{ports[peer]}", got["b"].append)
        async with _Server(a) as server_a, _Server(b) as server_b:
            ports.update(a=server_a.port, b=server_b.port)

            async def a_to_b(msg: Message) -> None:
                a.send(msg)
                while not got["b"] or got["b"][-1] != msg:
                    await asyncio.sleep(0.01)

            # b has said nothing yet: a writes version 1, which every build reads.
            first, second = appends(2)
            await a_to_b(first)
            assert b.versions == [1]
            # b answers; its stream says it reads version 2.
            answer = AppendEntriesResp(to="a", frm="b", term=1, success=True)
            b.send(answer)
            while got["a"] != [answer]:
                await asyncio.sleep(0.01)
            await a_to_b(second)
            assert b.versions == [1, 2]
            assert got["b"] == [first, second]
            # A sender that states no version (an older build) changes nothing.
            a._receive(
                raft_pb2.RaftMessage(
                    **{"from": "b", "payload": _timeout_now("a", 1)}, cluster_id=""
                )
            )
            assert a._peers["b"].wire == 2

    run(scenario)


def _timeout_now(to: str, version: int) -> bytes:
    return encode(TimeoutNow(to=to, frm="b" if to == "a" else "a", term=1), version)


def test_a_malformed_payload_ends_the_stream_and_reaches_nobody() -> None:
    async def scenario() -> None:
        got: list[Message] = []
        receiver = RaftTransport("b", lambda _: None, got.append)
        async with _Server(receiver) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stream = raft_pb2_grpc.RaftStub(ch).Stream()
                good = _timeout_now("b", 2)
                bad = b"RF\x02\x07" + b"\x00\x05ab"  # a string cut short
                await stream.write(
                    raft_pb2.RaftBatch(**{"from": "a", "payloads": [bad, good]})
                )
                assert await stream.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert "undecodable raft message" in (await stream.details() or "")
        assert got == [] and receiver.received == 0

    run(scenario)


# -- kill -9 of a server whose applies are not fsynced on their own

CRASHING_SERVER = """
import asyncio, json, os, sys
from cronmesh.core.fsm import StateMachine, encode_command
from cronmesh.raft.driver import RaftDriver, RaftSettings
from cronmesh.storage.env import DataDir
from cronmesh.storage.raftlog import LmdbRaftStorage
from cronmesh.storage.state import StateStore

async def main() -> None:
    path, life, report = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    data = DataDir(path)
    fsm = StateMachine(StateStore(data))
    settings = RaftSettings(tick=0.01)
    driver = RaftDriver("n1", LmdbRaftStorage(data), fsm, settings=settings)
    if not driver.has_state():
        driver.bootstrap({"n1"})
    driver.start()
    while not driver.is_leader() or fsm.store.applied_index() < driver.node.commit:
        await asyncio.sleep(0.005)
    out = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    jobs = sorted(j.name for j in fsm.store.list_jobs())
    os.write(out, (json.dumps(["ready", jobs]) + "\\n").encode())
    sys.stdout.write("ready\\n")
    sys.stdout.flush()
    for i in range(100000):
        name = f"life{life}-{i}"
        job = {"name": name, "schedule": "@every 1m", "executor": "shell",
               "executor_config": {"command": "true"}}
        result = await driver.propose(encode_command("set_job", job=job))
        # Acknowledged: the proposer's answer has been given. How many
        # applies since the last fsync of the meta page goes with it.
        line = ["acked", name, result.code or 0, data.unsynced_writes]
        os.write(out, (json.dumps(line) + "\\n").encode())

asyncio.run(main())
"""


def wait_for_lines(path: Path, count: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") > count:
            return
        time.sleep(0.002)


def test_kill_9_keeps_every_acknowledged_write_applied(tmp_path: Path) -> None:
    """A single server acknowledges each write after an apply committed
    without its own fsync; kill -9 at random moments, restart, and every
    acknowledged write is in the state (replayed from the log if needed)."""
    rng = random.Random(20261204)
    path = tmp_path / "server"
    acked: set[str] = set()
    unsynced_at_ack = 0
    for life in range(5):
        report = tmp_path / f"life-{life}.out"
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASHING_SERVER, str(path), str(life), str(report)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        proc.stdout.readline()  # "ready", or nothing if the child failed
        # Kill after some acknowledged writes (however loaded the machine
        # is), at a random moment of the next ones.
        wait_for_lines(report, rng.randint(5, 60), proc)
        time.sleep(rng.uniform(0.0, 0.01))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
        text = report.read_text().splitlines()
        lines = [json.loads(x) for x in text if x.endswith("]")]  # not cut short
        assert lines and lines[0][0] == "ready", (life, lines[:1])
        # Everything acknowledged in earlier lives is there after a restart.
        assert acked <= set(lines[0][1]), sorted(acked - set(lines[0][1]))[:5]
        for word, name, code, unsynced in lines[1:]:
            assert (word, code) == ("acked", 201), (name, code)
            acked.add(name)
            unsynced_at_ack += unsynced > 0
        # Reopened cold: state and applied index agree, never ahead of the log.
        data = DataDir(path)
        try:
            storage, store = LmdbRaftStorage(data), StateStore(data)
            assert store.applied_index() <= storage.log.last_index()
        finally:
            data.close()
    print(f"acknowledged {len(acked)}, {unsynced_at_ack} before the meta fsync")
    assert len(acked) >= 5 * 5, len(acked)
    # The answers really were given before the apply's meta fsync.
    assert unsynced_at_ack > len(acked) // 2, (unsynced_at_ack, len(acked))
