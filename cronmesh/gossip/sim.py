"""Deterministic simulator: many :class:`GossipCore` over a fake network.

Theory of operation: a single event heap orders everything by simulated
millisecond (ties by insertion order), so one seed always replays the same
run. Events are node ticks (scheduled at each core's ``next_deadline_ms``,
never on a fixed grid), datagram deliveries (dropped with probability
``loss``, delayed uniformly in ``delay_ms``, blocked across partitions) and
stream exchanges (TCP: each lost segment costs a retransmission timeout,
1 s doubling for the handshake and 200 ms doubling for data; an exchange
fails after ``tcp_timeout_ms`` when the target is down, across a partition
or too slow). Members can crash (stop
answering, no goodbye), leave gracefully, or join late. Every member event
is recorded with its time so properties can be checked afterwards.

``run_*_scenario`` functions each build a cluster, drive one story and
return a :class:`ScenarioResult`; the tests and ``scripts/simulate-gossip``
call them with different sizes and seeds.
"""

from __future__ import annotations

import heapq
import itertools
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from cronmesh.errors import InvariantViolation
from cronmesh.gossip.broadcast import retransmit_limit
from cronmesh.gossip.config import GossipConfig, profile
from cronmesh.gossip.core import GossipCore
from cronmesh.gossip.keyring import Keyring
from cronmesh.gossip.messages import MemberState
from cronmesh.gossip.outputs import Batch, EventKind, PingRequest, PushPullRequest
from cronmesh.gossip.suspicion import suspicion_timeout_ms

__all__ = [
    "ScenarioResult",
    "SimNode",
    "Simulator",
    "detection_bound_ms",
    "run_crash_scenario",
    "run_join_scenario",
    "run_leave_scenario",
    "run_loss_scenario",
    "run_partition_scenario",
    "run_restart_scenario",
    "watch_first_probe",
]

_PORT = 7946
_LEFT = MemberState.LEFT
_TICK, _PACKET, _STREAM, _STREAM_DONE, _CALL = range(5)


@dataclass(slots=True)
class SimNode:
    """A simulated member: its core plus what the harness knows about it."""

    name: str
    host: str
    core: GossipCore
    up: bool = True  # False once crashed or stopped after leaving
    left: bool = False  # left gracefully (then stopped)
    tick_at: int | None = None  # time of the live tick event, if any
    joined: bool = False  # a join push-pull succeeded (retried until then)
    bytes_sent: int = 0


@dataclass(frozen=True, slots=True)
class Observation:
    """A member event as one observer reported it."""

    time_ms: int
    observer: str
    kind: EventKind
    subject: str


class Simulator:
    """A seeded cluster over a fake network; see the module docstring."""

    def __init__(
        self,
        *,
        seed: int,
        config: GossipConfig | None = None,
        loss: float = 0.0,
        delay_ms: tuple[int, int] = (1, 10),
        keyring: Keyring | None = None,
    ) -> None:
        self.seed = seed
        self.config = config or profile("lan")
        self.loss = loss
        self.delay_ms = delay_ms
        self.keyring = keyring
        self.now = 0
        self.nodes: dict[str, SimNode] = {}
        self.observations: list[Observation] = []
        self._rng = random.Random(f"net-{seed}")
        self._heap: list[tuple[int, int, int, tuple[object, ...]]] = []
        self._counter = itertools.count()
        self._by_addr: dict[tuple[str, int], SimNode] = {}
        self._groups: dict[str, int] = {}
        self._on_batch: list[Callable[[SimNode, Batch], None]] = []

    # --- building the cluster ---------------------------------------------

    def add_node(self, name: str, seeds: list[str] | None = None) -> SimNode:
        """Start a member now; it joins through ``seeds`` (member names)."""
        index = len(self.nodes)
        host = f"10.{index // 65536}.{index // 256 % 256}.{index % 256}"
        node = SimNode(name, host, self._new_core(name, host), joined=not seeds)
        self.nodes[name] = node
        self._by_addr[(host, _PORT)] = node
        self._join(node, seeds)
        return node

    def restart(self, name: str, seeds: list[str]) -> None:
        """Bring a crashed member back as a fresh process (incarnation 1)."""
        node = self.nodes[name]
        node.core = self._new_core(name, node.host, f"-{self.now}")
        node.up, node.left, node.joined, node.tick_at = True, False, False, None
        self._join(node, seeds)

    def watch(self, hook: Callable[[SimNode, Batch], None]) -> None:
        """Call ``hook`` with every batch any member produces."""
        self._on_batch.append(hook)

    def _new_core(self, name: str, host: str, salt: str = "") -> GossipCore:
        return GossipCore(
            name,
            host,
            _PORT,
            config=self.config,
            rng=random.Random(f"core-{self.seed}-{name}{salt}"),
            keyring=self.keyring,
            now_ms=self.now,
        )

    def _join(self, node: SimNode, seeds: list[str] | None) -> None:
        addrs = [(self.nodes[s].host, _PORT) for s in seeds or []]
        self._apply(node, node.core.join(self.now, addrs))

    def start_cluster(self, n: int, gap_ms: int = 100) -> None:
        """Add ``n`` members about ``gap_ms`` apart, each joining a random
        earlier one, then run until every member sees all ``n`` alive.

        Raises:
            InvariantViolation: no convergence within 5 simulated minutes.
        """
        self.add_node("m0")
        for i in range(1, n):
            self.run_until(self.now + self._rng.randint(gap_ms // 2, gap_ms * 3 // 2))
            seed = f"m{self._rng.randrange(i)}"
            self.add_node(f"m{i}", [seed])
        if not self.run_until_converged(self.now + 300_000):
            raise InvariantViolation(f"seed {self.seed}: {n} members never converged")

    def inject(self, name: str, data: bytes, sender: str) -> None:
        """Hand member ``name`` a datagram now, as if ``sender`` sent it.

        For stories where only one member heard something, such as a
        refutation the sender got out just before it crashed.
        """
        src = (self.nodes[sender].host, _PORT)
        self._deliver_packet(name, data, src)

    # --- faults -------------------------------------------------------------

    def crash(self, name: str) -> None:
        """Stop a member without a goodbye (process or host failure)."""
        self.nodes[name].up = False

    def leave(self, name: str, linger_ms: int = 5_000) -> None:
        """Leave gracefully, keep running up to ``linger_ms``, then stop."""
        node = self.nodes[name]
        node.left = True
        self._apply(node, node.core.leave(self.now))
        self._schedule(self.now + linger_ms, _CALL, (self._stop_left, name))

    def _stop_left(self, name: str) -> None:
        self.nodes[name].up = False

    # Limitation: partitions are symmetric and total; one-way loss and
    # flapping links are not modelled, nor TCP congestion beyond fixed RTOs.
    def partition(self, *groups: set[str]) -> None:
        """Split the network; members in no group form one more group."""
        self._groups = {name: i + 1 for i, g in enumerate(groups) for name in g}

    def heal(self) -> None:
        """Remove every partition."""
        self._groups = {}

    def reachable(self, a: str, b: str) -> bool:
        """Whether ``a`` and ``b`` are on the same side of any partition."""
        return self._groups.get(a, 0) == self._groups.get(b, 0)

    # --- running ------------------------------------------------------------

    def run_until(self, end_ms: int, stop: Callable[[], bool] | None = None) -> bool:
        """Process events up to ``end_ms``; True if ``stop()`` became true."""
        heap = self._heap
        while heap and heap[0][0] <= end_ms:
            time_ms, _, kind, args = heapq.heappop(heap)
            self.now = time_ms
            self._handle(kind, args)
            if stop is not None and stop():
                return True
        self.now = max(self.now, end_ms)
        return stop is not None and stop()

    def run_until_converged(self, end_ms: int) -> bool:
        """Run until :meth:`converged` or ``end_ms``; True if converged."""
        return self.run_until_true(end_ms, self.converged)

    def run_until_true(
        self, end_ms: int, cond: Callable[[], bool], step_ms: int = 250
    ) -> bool:
        """Run in ``step_ms`` slices until ``cond()`` holds or ``end_ms``."""
        while self.now < end_ms:
            self.run_until(min(self.now + step_ms, end_ms))
            if cond():
                return True
        return False

    def all_see(self, subject: str, state: MemberState) -> bool:
        """Every live member (but ``subject``) holds ``subject`` in ``state``."""
        return all(
            node.core.state_of(subject) == state
            for node in self.live()
            if node.name != subject
        )

    def _handle(self, kind: int, args: tuple[object, ...]) -> None:
        if kind == _TICK:
            node = self.nodes[str(args[0])]
            if node.up and node.tick_at == self.now:
                node.tick_at = None
                self._apply(node, node.core.tick(self.now))
        elif kind == _PACKET:
            self._deliver_packet(*args)  # type: ignore[arg-type]
        elif kind == _STREAM:
            self._deliver_stream(*args)  # type: ignore[arg-type]
        elif kind == _STREAM_DONE:
            self._stream_done(*args)  # type: ignore[arg-type]
        else:
            func, arg = args
            func(arg)  # type: ignore[operator]

    def _schedule(self, time_ms: int, kind: int, args: tuple[object, ...]) -> None:
        heapq.heappush(self._heap, (time_ms, next(self._counter), kind, args))

    def _apply(self, node: SimNode, batch: Batch) -> None:
        """Carry out one batch, the way a real driver would."""
        for packet in batch.packets:
            node.bytes_sent += len(packet.data)
            self._send_packet(node, (packet.host, packet.port), packet.data)
        for request in batch.tcp_requests:
            self._start_stream(node, request)
        for event in batch.events:
            self.observations.append(
                Observation(self.now, node.name, event.kind, event.member.name)
            )
        for hook in self._on_batch:
            hook(node, batch)
        self._reschedule(node)

    def _reschedule(self, node: SimNode) -> None:
        if not node.up:
            return
        due = max(node.core.next_deadline_ms(), self.now)
        if node.tick_at is None or due < node.tick_at or node.tick_at < self.now:
            node.tick_at = due
            self._schedule(due, _TICK, (node.name,))

    def _delay(self) -> int:
        low, high = self.delay_ms
        return self._rng.randint(low, high)

    def _send_packet(self, src: SimNode, addr: tuple[str, int], data: bytes) -> None:
        dst = self._by_addr.get(addr)
        if dst is None or not self.reachable(src.name, dst.name):
            return
        if self.loss and self._rng.random() < self.loss:
            return
        args = (dst.name, data, (src.host, _PORT))
        self._schedule(self.now + self._delay(), _PACKET, args)

    def _deliver_packet(self, name: str, data: bytes, src: tuple[str, int]) -> None:
        node = self.nodes[name]
        if node.up:
            self._apply(node, node.core.receive_packet(self.now, data, src))

    def _tcp_leg(self, rto_ms: int) -> int:
        """One TCP segment's latency: lost copies cost a doubling RTO each."""
        latency = self._delay()
        while self.loss and self._rng.random() < self.loss:
            latency += rto_ms
            rto_ms *= 2
        return latency

    def _start_stream(self, src: SimNode, request: object) -> None:
        host, port = request.host, request.port  # type: ignore[attr-defined]
        dst = self._by_addr.get((host, port))
        ok = dst is not None and dst.up and self.reachable(src.name, dst.name)
        if not ok or dst is None:
            timeout = self.config.tcp_timeout_ms
            args = (src.name, request, None)
            self._schedule(self.now + timeout, _STREAM_DONE, args)
            return
        # SYN and SYN-ACK (initial RTO 1 s), then the request (RTO 200 ms).
        setup = self._tcp_leg(1_000) + self._tcp_leg(1_000) + self._tcp_leg(200)
        if setup > self.config.tcp_timeout_ms:
            args = (src.name, request, None)
            self._schedule(self.now + self.config.tcp_timeout_ms, _STREAM_DONE, args)
            return
        self._schedule(self.now + setup, _STREAM, (src.name, dst.name, request))

    def _deliver_stream(self, src: str, dst: str, request: object) -> None:
        node = self.nodes[dst]
        if not node.up or not self.reachable(src, dst):
            args = (src, request, None)
            self._schedule(self.now + self.config.tcp_timeout_ms, _STREAM_DONE, args)
            return
        payload = request.payload  # type: ignore[attr-defined]
        batch = node.core.receive_stream(self.now, payload)
        reply = batch.reply
        self._apply(node, batch)
        done = self.now + self._tcp_leg(200)
        self._schedule(done, _STREAM_DONE, (src, request, reply))

    def _stream_done(self, src: str, request: object, reply: bytes | None) -> None:
        node = self.nodes[src]
        if not node.up:
            return
        if isinstance(request, PingRequest) and self.now > request.deadline_ms:
            reply = None
        request_id = request.request_id  # type: ignore[attr-defined]
        self._apply(node, node.core.tcp_result(self.now, request_id, reply))
        if isinstance(request, PushPullRequest) and request.join:
            node.joined = node.joined or reply is not None
            if not node.joined:
                # Like the agent's retry-join: try the same seed in 1 s.
                addr = (request.host, request.port)
                self._schedule(self.now + 1_000, _CALL, (self._rejoin, (src, addr)))

    def _rejoin(self, target: tuple[str, tuple[str, int]]) -> None:
        node = self.nodes[target[0]]
        if node.up and not node.joined:
            self._apply(node, node.core.join(self.now, [target[1]]))

    # --- views ----------------------------------------------------------------

    def live(self) -> list[SimNode]:
        """Members that run and have not left."""
        return [n for n in self.nodes.values() if n.up and not n.left]

    def state_of(self, observer: str, subject: str) -> MemberState | None:
        """What ``observer`` believes about ``subject`` (None: unknown)."""
        return self.nodes[observer].core.state_of(subject)

    def converged(self) -> bool:
        """Every live member sees every live member alive."""
        live = self.live()
        for observer in live:
            core = observer.core
            for subject in live:
                if core.state_of(subject.name) != MemberState.ALIVE:
                    return False
        return True

    def first_observation(
        self, kind: EventKind, subject: str, observer: str, after_ms: int = 0
    ) -> int | None:
        """Time ``observer`` first reported ``kind`` about ``subject``."""
        for obs in self.observations:
            if (obs.kind, obs.subject, obs.observer) == (kind, subject, observer):
                if obs.time_ms >= after_ms:
                    return obs.time_ms
        return None

    def false_failures(self) -> list[Observation]:
        """FAILED reports about members that were running at the end."""
        running = {n.name for n in self.nodes.values() if n.up and not n.left}
        return [
            o
            for o in self.observations
            if o.kind == EventKind.FAILED and o.subject in running
        ]


# --- scenarios -----------------------------------------------------------------


@dataclass(slots=True)
class ScenarioResult:
    """Outcome of one scenario run."""

    name: str
    seed: int
    ok: bool
    detail: str = ""
    detection_ms: list[int] = field(default_factory=list)  # per observer
    # Crash until some member starts probing the victim (round-robin wait).
    first_probe_ms: int | None = None
    false_positives: int = 0
    bytes_per_member_s: float = 0.0


def detection_bound_ms(config: GossipConfig, n: int) -> tuple[int, int]:
    """Upper bounds for detecting a crashed member in an ``n``-member cluster.

    Returns ``(first_suspect, then_everyone)``:

    * ``first_suspect``: SWIM's round-robin guarantee (section 4.3). Each
      prober reaches the crashed member within two rounds of ``n - 1``
      probes; a probe period may be stretched by the health multiplier;
      one more period for the failing probe itself.
    * ``then_everyone``: Lifeguard's bound, measured from the first
      suspicion. The first suspecter's timer fires at the latest after the
      maximum suspicion timeout ``suspicion_max_timeout_mult *
      suspicion_mult * max(1, log10 n) * probe_interval`` (confirmations
      only shorten it); its dead message then spreads by gossip, allowed
      two full transmit limits of gossip rounds.
    """
    period = config.probe_interval_ms * config.awareness_max_multiplier
    first_suspect = (2 * (n - 1) + 1) * period
    low = suspicion_timeout_ms(config.suspicion_mult, n, config.probe_interval_ms)
    high = config.suspicion_max_timeout_mult * low
    spread = 2 * retransmit_limit(config.retransmit_mult, n) * config.gossip_interval_ms
    return first_suspect, high + spread


def _bytes_rate(sim: Simulator, start_ms: int, start_bytes: int) -> float:
    seconds = max(sim.now - start_ms, 1) / 1000
    sent = sum(n.bytes_sent for n in sim.nodes.values()) - start_bytes
    return sent / max(len(sim.nodes), 1) / seconds


def run_loss_scenario(
    n: int, loss: float, minutes: float, seed: int, config: GossipConfig | None = None
) -> ScenarioResult:
    """``n`` members under packet loss: no live member may ever be failed."""
    sim = Simulator(seed=seed, loss=loss, config=config)
    sim.start_cluster(n)
    start, start_bytes = sim.now, sum(x.bytes_sent for x in sim.nodes.values())
    sim.run_until(sim.now + int(minutes * 60_000))
    wrong = sim.false_failures()
    detail = ", ".join(f"{o.observer} failed {o.subject}@{o.time_ms}" for o in wrong)
    return ScenarioResult(
        "loss",
        seed,
        not wrong,
        detail[:500],
        false_positives=len(wrong),
        bytes_per_member_s=_bytes_rate(sim, start, start_bytes),
    )


def run_crash_scenario(
    n: int, seed: int, loss: float = 0.0, config: GossipConfig | None = None
) -> ScenarioResult:
    """Crash one member; every other member must fail it within the bound."""
    sim = Simulator(seed=seed, loss=loss, config=config)
    sim.start_cluster(n)
    victim = f"m{sim._rng.randrange(n)}"
    sim.run_until(sim.now + sim._rng.randrange(sim.config.probe_interval_ms))
    crashed_at = sim.now
    sim.crash(victim)
    probed = watch_first_probe(sim, victim)
    first_bound, rest_bound = detection_bound_ms(sim.config, n)
    first_suspect = _watch_first_suspect(sim, victim, crashed_at + first_bound)
    if first_suspect is None:
        return ScenarioResult("crash", seed, False, f"{victim} never suspected")
    deadline = first_suspect + rest_bound
    sim.run_until_true(deadline + 1, lambda: sim.all_see(victim, MemberState.DEAD))
    times, missing = [], []
    for observer in sim.live():
        when = sim.first_observation(
            EventKind.FAILED, victim, observer.name, crashed_at
        )
        if when is None:
            missing.append(observer.name)
        else:
            times.append(when - crashed_at)
    wrong = sim.false_failures()
    ok = not missing and not wrong
    detail = (
        f"victim {victim} crashed@{crashed_at} first suspect@{first_suspect}"
        f" bound@{deadline} missing={missing[:5]} false={len(wrong)}"
    )
    first_probe = probed[0] - crashed_at if probed else None
    return ScenarioResult("crash", seed, ok, detail, times, first_probe, len(wrong))


def watch_first_probe(sim: Simulator, victim: str) -> list[int]:
    """From now on, note when some member first starts probing ``victim``.

    Returns a list that receives that time once it happens.
    """
    seen: list[int] = []

    def hook(node: SimNode, batch: Batch) -> None:
        if not seen and node.core.probe_target == victim:
            seen.append(sim.now)

    sim.watch(hook)
    return seen


def _watch_first_suspect(sim: Simulator, victim: str, until_ms: int) -> int | None:
    """Step in 50 ms slices until some member suspects (or fails) ``victim``."""
    while sim.now < until_ms:
        sim.run_until(sim.now + 50)
        for node in sim.live():
            if sim.state_of(node.name, victim) != MemberState.ALIVE:
                return sim.now
    return None


def run_join_scenario(
    n: int, seed: int, config: GossipConfig | None = None
) -> ScenarioResult:
    """A late joiner must be known to every member within 10 probe intervals."""
    sim = Simulator(seed=seed, config=config)
    sim.start_cluster(n)
    sim.run_until(sim.now + sim._rng.randrange(5_000))
    joined_at = sim.now
    seed_name = f"m{sim._rng.randrange(n)}"
    sim.add_node("late", [seed_name])
    bound = 10 * sim.config.probe_interval_ms
    sim.run_until(joined_at + bound)
    missing = [
        node.name
        for node in sim.live()
        if node.name != "late"
        and sim.first_observation(EventKind.JOIN, "late", node.name, joined_at) is None
    ]
    knows_all = all(
        sim.state_of("late", node.name) == MemberState.ALIVE for node in sim.live()
    )
    times = [
        t - joined_at
        for node in sim.live()
        if (t := sim.first_observation(EventKind.JOIN, "late", node.name, joined_at))
    ]
    ok = not missing and knows_all
    detail = f"via {seed_name}; missing={missing[:5]} joiner_knows_all={knows_all}"
    return ScenarioResult("join", seed, ok, detail, times)


def run_leave_scenario(
    n: int, seed: int, config: GossipConfig | None = None
) -> ScenarioResult:
    """A member leaves: all others report LEAVE, never FAILED.

    Most hear the left message at once; in small clusters the transmit limit
    is low (4 below 10 members) and one may miss it. That member learns when
    it next probes the departed one: its suspicion is answered with the left
    message (stale-rumour correction). So the bound is the linger time plus
    the round-robin part of :func:`detection_bound_ms` plus gossip spread.
    """
    sim = Simulator(seed=seed, config=config)
    sim.start_cluster(n)
    sim.run_until(sim.now + sim._rng.randrange(5_000))
    leaver = f"m{sim._rng.randrange(n)}"
    left_at = sim.now
    linger = 5_000
    sim.leave(leaver, linger)
    cfg = sim.config
    spread = 2 * retransmit_limit(cfg.retransmit_mult, n) * cfg.gossip_interval_ms
    bound = linger + detection_bound_ms(cfg, n)[0] + spread
    sim.run_until_true(left_at + bound + 1, lambda: sim.all_see(leaver, _LEFT))
    times, late = [], []
    for node in sim.live():
        when = sim.first_observation(EventKind.LEAVE, leaver, node.name, left_at)
        if when is None or when - left_at > bound:
            late.append(node.name)
        else:
            times.append(when - left_at)
    failed = [o for o in sim.observations if o.subject == leaver and o.kind == "failed"]
    ok = not late and not failed and not sim.false_failures()
    detail = f"{leaver} left@{left_at} late={late[:5]} failed={len(failed)}"
    return ScenarioResult("leave", seed, ok, detail, times)


def run_restart_scenario(
    n: int, seed: int, config: GossipConfig | None = None
) -> ScenarioResult:
    """A member crashes, is declared dead, and restarts with incarnation 1.

    Everyone holds it dead at a higher incarnation, so its fresh alive
    message is ignored until it learns (from the join push-pull) that it is
    considered dead and refutes; then all must see it alive again within
    one minute.
    """
    sim = Simulator(seed=seed, config=config)
    sim.start_cluster(n)
    victim = f"m{sim._rng.randrange(1, n)}"
    sim.crash(victim)
    dead = sim.run_until_true(
        sim.now + 120_000, lambda: sim.all_see(victim, MemberState.DEAD)
    )
    back_at = sim.now
    others = [name for name in sorted(sim.nodes) if name != victim]
    sim.restart(victim, [others[sim._rng.randrange(len(others))]])
    merged = sim.run_until_converged(back_at + 60_000)
    inc = sim.nodes[victim].core.local_member.incarnation
    took = sim.now - back_at
    detail = f"{victim} dead={dead} merged={merged} after={took}ms inc={inc}"
    return ScenarioResult("restart", seed, dead and merged, detail, [took])


def run_partition_scenario(
    n: int,
    seed: int,
    split_ms: int = 60_000,
    heal_bound_ms: int = 180_000,
    config: GossipConfig | None = None,
) -> ScenarioResult:
    """Split the cluster in two, heal it, and require a full re-merge."""
    sim = Simulator(seed=seed, config=config)
    sim.start_cluster(n)
    names = sorted(sim.nodes)
    sim._rng.shuffle(names)
    side = set(names[: n // 2])
    sim.partition(side)
    sim.run_until(sim.now + split_ms)
    split_seen = all(
        sim.state_of(a, b) in (MemberState.DEAD, MemberState.SUSPECT)
        for a in side
        for b in names
        if b not in side
    )
    sim.heal()
    healed_at = sim.now
    merged = sim.run_until_converged(healed_at + heal_bound_ms)
    detail = f"split_seen={split_seen} merged={merged} after={sim.now - healed_at}ms"
    return ScenarioResult("partition", seed, merged, detail, [sim.now - healed_at])


def summarize(values: list[int]) -> tuple[float, float]:
    """Median and 99th percentile of ``values`` (0, 0 when empty)."""
    if not values:
        return 0.0, 0.0
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return statistics.median(ordered), float(p99)
