"""The gossip driver end to end: real runner processes on loopback.

A few in-process tests drive the :class:`GossipDriver` API directly. One
encrypted five-member cluster (127.0.0.2 .. 127.0.0.6, ``local``
profile) is shared by the module; each test first waits until the members
still running agree, then changes one thing and polls the status files the
runners write until every survivor shows the change or a deadline computed
from the profile passes. Outsiders (wrong key, dead seed) use 127.0.0.1.
Nothing is sent anywhere but 127.0.0.x.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port as conftest_free_port

from cronmesh.errors import TransportError, ValidationError
from cronmesh.gossip import Keyring, encode_message, encode_packet, generate_key
from cronmesh.gossip.config import profile
from cronmesh.gossip.driver import GossipDriver, MemberInfo, parse_address
from cronmesh.gossip.messages import Alive
from cronmesh.gossip.sim import detection_bound_ms

PROFILE = "local"
CONFIG = profile(PROFILE)
HOSTS = [f"127.0.0.{i}" for i in range(2, 7)]
OUTSIDER = "127.0.0.1"
# Process start (imports on a busy machine), one retry-join interval and a
# few gossip rounds; generous because CI cores are shared.
CONVERGE_S = 20.0
# A tag change rides on the next gossip rounds (100 ms apart in `local`).
TAGS_S = 5.0
# Extra time for scheduling noise on two busy cores, on top of any bound.
SLACK_S = 3.0


def free_port(host: str) -> int:
    """A port free for both TCP and UDP on ``host`` (tests/conftest.py)."""
    return conftest_free_port(host)


def wait_until(
    check: Callable[[], bool], timeout: float, what: Callable[[], str]
) -> float:
    """Poll ``check`` until true; return the seconds it took or fail."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout:.1f}s: {what()}")
        time.sleep(0.05)


class Node:
    """One ``python -m cronmesh.gossip.run`` process."""

    def __init__(self, tmp: Path, name: str, host: str) -> None:
        self.name = name
        self.host = host
        self.port = free_port(host)
        self.addr = f"{host}:{self.port}"
        self.status_path = tmp / f"{name}.json"
        self.tags_path = tmp / f"{name}-tags.json"
        self.log_path = tmp / f"{name}.log"
        self.tags_path.write_text("{}")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> Node:
        cmd = [
            sys.executable,
            "-m",
            "cronmesh.gossip.run",
            "--name",
            self.name,
            "--bind",
            self.addr,
            "--profile",
            PROFILE,
            "--status-file",
            str(self.status_path),
            "--tags-file",
            str(self.tags_path),
            *extra,
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status_path.read_text()))
        except (OSError, ValueError):
            return {}

    def view(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in self.status().get("members", [])}

    def states(self) -> dict[str, str]:
        return {name: m["status"] for name, m in self.view().items()}

    def dropped(self) -> int:
        return int(self.status().get("stats", {}).get("dropped", 0))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@dataclasses.dataclass
class Cluster:
    nodes: list[Node]
    key: str

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.running]

    def views(self) -> str:
        return "; ".join(f"{n.name}: {n.states()}" for n in self.live())

    def converged(self) -> bool:
        live = self.live()
        names = {n.name for n in live}
        for node in live:
            states = node.states()
            if any(states.get(name) != "alive" for name in names):
                return False
        return True

    def wait_converged(self, timeout: float = CONVERGE_S) -> float:
        return wait_until(self.converged, timeout, self.views)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("gossip")
    key = generate_key()
    nodes = [Node(tmp, f"n{i}", host) for i, host in enumerate(HOSTS)]
    seed = nodes[0].addr
    common = ("--encrypt", key, "--retry-interval", "0.2")
    nodes[0].start(*common)
    for node in nodes[1:]:
        node.start(*common, "--join", seed)
    yield Cluster(nodes, key)
    for node in nodes:
        if node.running:
            assert node.proc is not None
            node.proc.kill()
            node.proc.wait()


def healthy_detection_bound_s(n: int) -> float:
    """Crash-to-everyone-knows bound of ``sim.detection_bound_ms`` for a
    prober whose Lifeguard health multiplier stays 1: on loopback nothing
    is lost, helpers' nacks arrive, so no probe is stretched."""
    cfg = dataclasses.replace(CONFIG, awareness_max_multiplier=1)
    first_suspect, then_everyone = detection_bound_ms(cfg, n)
    return (first_suspect + then_everyone) / 1000


def test_five_members_see_each_other_alive(cluster: Cluster) -> None:
    took = cluster.wait_converged()
    assert len(cluster.live()) == len(HOSTS)
    print(f"5 members converged {took:.2f}s after the check began")


def test_tag_change_with_sighup_reaches_everyone(cluster: Cluster) -> None:
    cluster.wait_converged()
    node = cluster.live()[1]
    tags = {"role": "worker", "zone": f"z{random.randrange(1000)}"}
    node.tags_path.write_text(json.dumps(tags))
    node.signal(signal.SIGHUP)

    def everywhere() -> bool:
        return all(
            n.view().get(node.name, {}).get("tags") == tags for n in cluster.live()
        )

    def seen() -> str:
        views = {n.name: n.view().get(node.name, {}) for n in cluster.live()}
        return f"{node.name} {tags} as seen: {views}\n{node.log()}"

    took = wait_until(everywhere, TAGS_S, seen)
    print(f"tag change seen everywhere after {took:.2f}s")


def _garbage(rng: random.Random) -> list[bytes]:
    other = Keyring([generate_key()])
    alive = encode_message(Alive(1, "evil", OUTSIDER, 1, b""))
    datagrams = [
        b"",
        b"\x01",
        b"\x02",
        b"\x02" + bytes(27),
        encode_packet([alive], None),  # plaintext to an encrypted cluster
        encode_packet([alive], other),  # sealed with a key nobody holds
    ]
    datagrams += [rng.randbytes(rng.randrange(1, 1400)) for _ in range(40)]
    datagrams += [b"\x02" + rng.randbytes(rng.randrange(28, 200)) for _ in range(14)]
    return datagrams


def test_garbage_datagrams_are_dropped_and_counted(cluster: Cluster) -> None:
    cluster.wait_converged()
    target = cluster.live()[2]
    before = target.dropped()
    datagrams = _garbage(random.Random(7))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((OUTSIDER, 0))
        for data in datagrams:
            sock.sendto(data, (target.host, target.port))
    # Two bad TCP exchanges too: junk, and a frame header announcing 4 GiB.
    for junk in (b"\x00\x00\x00\x08" + b"\xff" * 8, b"\xff\xff\xff\xff"):
        with socket.create_connection(
            (target.host, target.port), timeout=5, source_address=(OUTSIDER, 0)
        ) as conn:
            conn.sendall(junk)
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(16) == b""  # closed without an answer
    expected = before + len(datagrams) + 2
    wait_until(
        lambda: target.dropped() >= expected,
        5.0,
        lambda: f"dropped {target.dropped()} < {expected}\n{target.log()}",
    )
    assert target.running
    assert "evil" not in target.view()
    # Still healthy: it keeps probing, and everyone still sees everyone alive.
    probes = int(target.status()["stats"]["probes"])
    wait_until(
        lambda: int(target.status().get("stats", {}).get("probes", 0)) >= probes + 2,
        3 * CONFIG.probe_interval_ms / 1000 + SLACK_S,
        lambda: f"{target.name} stopped probing\n{target.log()}",
    )
    assert cluster.converged(), cluster.views()


def test_wrong_key_member_is_not_admitted(cluster: Cluster, tmp_path: Path) -> None:
    cluster.wait_converged()
    seed = cluster.live()[0]
    before = seed.dropped()
    intruder = Node(tmp_path, "intruder", OUTSIDER)
    intruder.start(
        "--encrypt",
        generate_key(),
        "--join",
        seed.addr,
        "--retry-max",
        "3",
        "--retry-interval",
        "0.3",
    )
    code = intruder.wait(timeout=30)
    assert code != 0, intruder.log()
    assert seed.addr in intruder.log()
    assert set(intruder.states()) == {"intruder"}
    wait_until(
        lambda: seed.dropped() >= before + 3,
        5.0,
        lambda: f"seed dropped {seed.dropped()}, before {before}",
    )
    for node in cluster.live():
        assert "intruder" not in node.view(), node.name


def test_killed_member_is_marked_failed_within_bound(cluster: Cluster) -> None:
    cluster.wait_converged()
    live = cluster.live()
    assert len(live) >= 3
    victim, rest = live[-1], live[:-1]
    bound = healthy_detection_bound_s(len(live)) + SLACK_S
    assert victim.proc is not None
    victim.proc.kill()
    start = time.monotonic()
    victim.proc.wait()
    seen: dict[str, float] = {}

    def all_failed() -> bool:
        for node in rest:
            if node.name not in seen and node.states().get(victim.name) == "failed":
                seen[node.name] = time.monotonic() - start
        return len(seen) == len(rest)

    wait_until(all_failed, bound, lambda: f"bound {bound:.1f}s; {cluster.views()}")
    # No collateral: the survivors still see each other alive.
    assert cluster.converged(), cluster.views()
    times = ", ".join(f"{k} {v:.2f}s" for k, v in sorted(seen.items()))
    print(f"kill -9 of {victim.name} detected: {times} (bound {bound:.1f}s)")


def test_sigterm_member_shows_left_everywhere(cluster: Cluster) -> None:
    cluster.wait_converged()
    live = cluster.live()
    assert len(live) >= 2
    victim, rest = live[-1], live[:-1]
    victim.signal(signal.SIGTERM)
    assert victim.wait(timeout=10) == 0, victim.log()

    def all_left() -> bool:
        return all(n.states().get(victim.name) == "left" for n in rest)

    took = wait_until(all_left, TAGS_S, cluster.views)
    assert victim.states().get(victim.name) == "left"
    print(f"SIGTERM of {victim.name}: left everywhere {took:.2f}s after exit")


def test_retry_join_to_dead_address_exits_nonzero(tmp_path: Path) -> None:
    dead = f"{OUTSIDER}:{free_port(OUTSIDER)}"
    node = Node(tmp_path, "lonely", OUTSIDER)
    node.start("--join", dead, "--retry-max", "3", "--retry-interval", "0.2")
    code = node.wait(timeout=30)
    assert code == 1
    log = node.log()
    assert dead in log
    assert "after 3 attempts" in log
    assert os.path.exists(node.status_path)


# --- in-process: the API an embedding agent uses ------------------------------


def test_parse_address() -> None:
    assert parse_address("10.0.0.1", 7946) == ("10.0.0.1", 7946)
    assert parse_address("node-1:8946", 7946) == ("node-1", 8946)
    assert parse_address("[::1]:9", 7946) == ("::1", 9)
    assert parse_address("[fe80::1]", 7946) == ("fe80::1", 7946)
    assert parse_address("h:0", 7946, allow_zero=True) == ("h", 0)
    for bad in ("", ":80", "h:0", "h:x", "h:65536", "[::1", "[::1]x"):
        with pytest.raises(ValidationError):
            parse_address(bad, 7946)


def test_wildcard_bind_needs_advertise() -> None:
    with pytest.raises(ValidationError):
        GossipDriver("a", ("0.0.0.0", 0))
    GossipDriver("a", ("0.0.0.0", 0), advertise=("127.0.0.2", 7946))


def test_driver_api_events_tags_leave_fail_retry() -> None:
    asyncio.run(asyncio.wait_for(_api_scenario(), 60))


async def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, f"not within {timeout:.1f}s: {what}"
        await asyncio.sleep(0.02)


async def _api_scenario() -> None:
    seen: list[tuple[str, str]] = []
    async_seen: list[str] = []

    def record(kind: str, member: MemberInfo) -> None:
        seen.append((kind, member.name))

    def broken(kind: str, member: MemberInfo) -> None:
        raise RuntimeError("handler bug")

    async def slow(kind: str, member: MemberInfo) -> None:
        await asyncio.sleep(0)
        async_seen.append(kind)

    a = GossipDriver("a", (OUTSIDER, 0), tags={"role": "x"}, profile=PROFILE)
    a.add_event_handler(record)
    a.add_event_handler(broken)
    a.add_event_handler(slow)
    b = GossipDriver("b", ("127.0.0.3", 0), profile=PROFILE, rng=random.Random(1))
    c = GossipDriver("c", ("127.0.0.4", 0), profile=PROFILE)
    assert a.members() == []
    for driver in (a, b, c):
        await driver.start()
    assert a.bound_address is not None
    port = a.bound_address[1]
    dead = f"{OUTSIDER}:{free_port(OUTSIDER)}"
    # A host name, resolved when joining (localhost is 127.0.0.1 for AF_INET).
    assert await b.join([f"localhost:{port}"]) == 1
    assert await c.join([f"{OUTSIDER}:{port}", dead]) == 1

    def alive_everywhere(names: set[str]) -> bool:
        return all(
            {m.name for m in d.members() if m.status == "alive"} == names
            for d in (a, b, c)
            if d.name in names
        )

    await _until(lambda: alive_everywhere({"a", "b", "c"}), 10, "join")
    info = next(m for m in b.members() if m.name == "a")
    assert (info.addr, info.port, info.tags) == (OUTSIDER, port, {"role": "x"})
    assert (info.status, info.incarnation) == ("alive", 1)
    assert {("join", "b"), ("join", "c")} <= set(seen)
    assert "join" in async_seen  # coroutine handlers run; a raising one is ignored

    b.set_tags({"role": "y"})

    def b_tags_at_a() -> bool:
        return any(m.name == "b" and m.tags == {"role": "y"} for m in a.members())

    await _until(b_tags_at_a, TAGS_S, "tag update")
    assert ("update", "b") in seen

    await c.leave(2.0)
    await c.stop()
    await _until(lambda: ("leave", "c") in seen, 5, "leave event")
    assert {m.name: m.status for m in b.members()}["c"] == "left"

    await b.stop()  # no goodbye: a must detect it
    bound = healthy_detection_bound_s(2) + SLACK_S
    await _until(lambda: ("failed", "b") in seen, bound, "failure detection")

    with pytest.raises(TransportError, match=dead):
        await a.retry_join([dead], interval=0.05, max_attempts=2)
    stats = a.stats
    assert stats.packets_in > 0 and stats.packets_out > 0
    assert stats.probe_failures >= 1 and stats.dropped == 0
    await a.stop()
    await a.stop()  # idempotent
    assert {m.name: m.status for m in a.members()} == {
        "a": "alive",
        "b": "failed",
        "c": "left",
    }
