"""A deterministic simulator for the Raft core: many servers, one fake world.

Theory of operation
-------------------
``Cluster`` wires RaftNodes together the way a driver would (persist the
Ready, then send, then apply, then advance) but through a fake network that
can lose, delay, reorder and duplicate messages and cut links, and with a fake
clock (``tick``).  A crash throws a RaftNode away and keeps only its in-memory
stores (its "disk"); a crash may even hit between ``ready()`` and persisting,
so unpersisted Ready content is lost.  Every random choice comes from one
``random.Random(seed)``, so a seed replays exactly.

``Checker`` watches every Ready and raises ``SafetyViolation`` as soon as one
of the safety properties of Raft (thesis §3.6.3, figure 3.2) breaks:

* election safety: at most one leader per term;
* log matching: an (index, term) pair names one entry, whose predecessor has
  one term, everywhere (checked when entries are persisted);
* leader completeness: an entry committed in term T is in the log of every
  leader of a term > T;
* state machine safety: no two servers apply different entries at one index
  (a hash chain over applied entries, also compared for snapshots);
* durable acknowledgements: a server never drops, in the same term, an entry
  it told the leader it stores (the leader counted it towards a majority);
* linearizable reads: a read is confirmed at an index covering every write
  acknowledged before it was asked.

``run_seed`` drives a random workload (proposals, reads, membership changes,
transfers, compaction) under random faults, then heals everything and checks
that every acknowledged proposal is applied on every member.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cronmesh.errors import InvariantViolation
from cronmesh.raft.errors import ConfigChangeInProgress, RaftError
from cronmesh.raft.messages import (
    AppendEntriesResp,
    Message,
    RequestVoteResp,
    decode,
    encode,
)
from cronmesh.raft.node import RaftConfig, RaftNode
from cronmesh.raft.ready import Ready, Role
from cronmesh.raft.storage import (
    MemoryLogStore,
    MemoryStableStore,
    bootstrap,
    persist_ready,
)
from cronmesh.raft.types import (
    ConfChange,
    ConfChangeOp,
    Entry,
    EntryKind,
    Membership,
    Snapshot,
    decode_config_entry,
)

__all__ = [
    "Checker",
    "Cluster",
    "NetConfig",
    "SafetyViolation",
    "SimFailure",
    "SimResult",
    "StateMachine",
    "run_seed",
]


class SafetyViolation(InvariantViolation):
    """A Raft safety property broke in a simulated run."""


class SimFailure(AssertionError):
    """A run ended without the expected outcome (liveness, lost write)."""


# ----------------------------------------------------------------------
# Application state machine
# ----------------------------------------------------------------------


@dataclass
class StateMachine:
    """A toy application: applied commands, the configuration, a hash chain."""

    index: int = 0  # last applied log index
    digest: str = ""  # hash chain over every applied entry, hex
    items: set[str] = field(default_factory=set)
    membership: Membership = field(default_factory=Membership)  # last applied

    def apply(self, entry: Entry) -> None:
        if entry.index != self.index + 1:
            raise SafetyViolation(f"apply gap: index {entry.index} after {self.index}")
        chain = f"{self.digest}|{entry.index}|{entry.term}|{entry.kind}|"
        self.digest = hashlib.blake2b(
            chain.encode() + entry.data, digest_size=12
        ).hexdigest()
        self.index = entry.index
        if entry.kind is EntryKind.NORMAL:
            self.items.add(entry.data.decode())
        elif entry.kind is EntryKind.CONFIG:
            self.membership = decode_config_entry(entry.data)

    def snapshot(self) -> bytes:
        doc = {
            "index": self.index,
            "digest": self.digest,
            "items": sorted(self.items),
            "voters": sorted(self.membership.voters),
            "learners": sorted(self.membership.learners),
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def restore(cls, data: bytes) -> StateMachine:
        doc = json.loads(data)
        membership = Membership(frozenset(doc["voters"]), frozenset(doc["learners"]))
        return cls(doc["index"], doc["digest"], set(doc["items"]), membership)

    def check_snapshot(self, node_id: str, snap: Snapshot) -> None:
        """A snapshot carries the configuration in force at its index."""
        if snap.meta.membership != self.membership:
            raise SafetyViolation(
                f"{node_id}: snapshot at {snap.meta.index} carries "
                f"{snap.meta.membership}, state machine has {self.membership}"
            )


# ----------------------------------------------------------------------
# Safety checker
# ----------------------------------------------------------------------


@dataclass
class Checker:
    """Global bookkeeping across servers; raises SafetyViolation on a break."""

    leaders: dict[int, str] = field(default_factory=dict)
    entries: dict[tuple[int, int], tuple[int, bytes, int | None]] = field(
        default_factory=dict
    )
    applied: dict[int, str] = field(default_factory=dict)  # index -> digest
    committed: dict[int, tuple[int, int]] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)  # payload -> index
    # server -> (term, highest index it acknowledged to that term's leader)
    promised: dict[str, tuple[int, int]] = field(default_factory=dict)

    def on_leader(self, core: RaftNode) -> None:
        """``core`` just reported itself leader of ``core.term``."""
        other = self.leaders.setdefault(core.term, core.id)
        if other != core.id:
            raise SafetyViolation(
                f"two leaders in term {core.term}: {other} and {core.id}"
            )
        for index, (entry_term, commit_term) in self.committed.items():
            if commit_term >= core.term or index <= core.log.snap_index:
                continue
            if core.log.term(index) != entry_term:
                raise SafetyViolation(
                    f"leader {core.id} of term {core.term} lacks entry {index} "
                    f"(term {entry_term}) committed in term {commit_term}; "
                    f"has term {core.log.term(index)}"
                )

    def on_persist(self, core: RaftNode, entries: Iterable[Entry]) -> None:
        """Log matching, checked on every entry a server persists."""
        for entry in entries:
            value = (int(entry.kind), entry.data, core.log.term(entry.index - 1))
            seen = self.entries.setdefault((entry.index, entry.term), value)
            if seen != value:
                raise SafetyViolation(
                    f"log matching: {core.id} has index {entry.index} term "
                    f"{entry.term} as {value!r}, elsewhere {seen!r}"
                )

    def on_ready(self, core: RaftNode, ready: Ready) -> None:
        """An acknowledged entry is never dropped again in the same term."""
        term, acked = self.promised.get(core.id, (0, 0))
        if term == core.term:
            cut = ready.truncate_from
            if ready.snapshot is not None:
                cut = ready.snapshot.meta.index + 1
            if cut is not None and cut <= acked:
                raise SafetyViolation(
                    f"{core.id} drops entries from {cut} in term {term} after "
                    f"acknowledging up to {acked}"
                )
        for msg in ready.messages:
            if isinstance(msg, AppendEntriesResp) and msg.success:
                if msg.term != term:
                    term, acked = msg.term, 0
                acked = max(acked, msg.match_index)
        self.promised[core.id] = (term, acked)

    def on_commit(self, core: RaftNode, old: int, new: int) -> None:
        """A leader moved its commit index from ``old`` to ``new``."""
        # Limitation: new leaders append a no-op at once, so random runs
        # almost never commit an old-term entry by counting (Figure 8);
        # test_figure8_paper_sequence drives that case by hand.
        for index in range(max(old, core.log.snap_index) + 1, new + 1):
            term = core.log.term(index)
            assert term is not None
            self.committed.setdefault(index, (term, core.term))

    def on_applied(self, node_id: str, sm: StateMachine) -> None:
        """State machine safety: one history per index."""
        seen = self.applied.setdefault(sm.index, sm.digest)
        if seen != sm.digest:
            raise SafetyViolation(
                f"state machine safety: {node_id} applied a different history "
                f"at index {sm.index}"
            )


# ----------------------------------------------------------------------
# Network and cluster
# ----------------------------------------------------------------------


@dataclass
class NetConfig:
    """Fault rates of the fake network (probabilities per message)."""

    loss: float = 0.0
    duplicate: float = 0.0
    max_delay: int = 0  # ticks; a delay is uniform in [0, max_delay]
    codec: float = 0.0  # share of messages sent through encode/decode


@dataclass
class SimNode:
    """One simulated server: its disk survives crashes, its core does not."""

    id: str
    log_store: MemoryLogStore
    stable: MemoryStableStore
    core: RaftNode | None = None
    sm: StateMachine = field(default_factory=StateMachine)
    pending: dict[tuple[int, int], str] = field(default_factory=dict)
    reads: dict[bytes, int] = field(default_factory=dict)  # ctx -> index needed
    last_commit: int = 0


class Cluster:
    """N servers on a fake network with a fake clock; see the module docstring."""

    def __init__(
        self,
        ids: list[str],
        seed: int = 0,
        voters: Iterable[str] | None = None,
        net: NetConfig | None = None,
        make_config: Callable[[str], RaftConfig] | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.net = net or NetConfig()
        self.make_config = make_config or (lambda i: RaftConfig(node_id=i))
        self.now = 0
        self.checker = Checker()
        self.nodes: dict[str, SimNode] = {}
        self.cut: set[frozenset[str]] = set()
        # Chance, per Ready, of a crash before persisting it (and, again, of a
        # crash after persisting but before sending and applying).
        self.crash_unpersisted = 0.0
        # Chance, per Ready, of a reboot right after it was fully handled
        # (volatile state lost, disk kept); ten times higher right after
        # granting a vote, to catch a vote that was not made durable.
        self.reboot = 0.0
        self.stats: Counter[str] = Counter()  # what happened, for tuning runs
        # Test hook: sees each message at delivery; returns it, a replacement
        # (e.g. an AppendEntries with fewer entries) or None to drop it.
        self.intercept: Callable[[Message], Message | None] | None = None
        # Receives one line per fault and role change, for replaying a seed.
        self.trace: Callable[[str], None] | None = None
        self.served_reads: list[tuple[str, bytes, int]] = []  # (node, ctx, index)
        self.failed_reads: list[tuple[str, bytes]] = []  # (node, ctx)
        self._queue: list[tuple[int, int, Message]] = []
        self._counter = 0
        founders = set(ids if voters is None else voters)
        for node_id in ids:
            node = SimNode(node_id, MemoryLogStore(), MemoryStableStore())
            if node_id in founders:
                bootstrap(node.log_store, node.stable, founders)
            self.nodes[node_id] = node
            self._start(node)

    # -- lifecycle -----------------------------------------------------

    def _start(self, node: SimNode) -> None:
        snap = node.stable.snapshot()
        node.sm = StateMachine.restore(snap.data) if snap else StateMachine()
        node.pending, node.reads = {}, {}
        rng = random.Random(self.rng.getrandbits(64))
        node.core = RaftNode(
            self.make_config(node.id), node.log_store, node.stable, rng
        )
        node.last_commit = node.core.commit

    def note(self, event: str) -> None:
        """Report ``event`` to ``trace``, stamped with the current tick."""
        if self.trace is not None:
            self.trace(f"t={self.now} {event}")

    def crash(self, node_id: str) -> None:
        """Stop a server; only what it persisted survives."""
        self.stats["crash"] += 1
        self.note(f"crash {node_id}")
        self.nodes[node_id].core = None

    def restart(self, node_id: str) -> None:
        """Start a crashed server again from its stores."""
        node = self.nodes[node_id]
        if node.core is None:
            self.note(f"restart {node_id}")
            self._start(node)

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.core is not None]

    def core(self, node_id: str) -> RaftNode:
        core = self.nodes[node_id].core
        if core is None:
            raise SimFailure(f"{node_id} is down")
        return core

    # -- network -------------------------------------------------------

    def isolate(self, node_id: str) -> None:
        """Cut every link of ``node_id``."""
        self.note(f"isolate {node_id}")
        for other in self.nodes:
            if other != node_id:
                self.cut.add(frozenset((node_id, other)))

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every link between different groups (others keep their links)."""
        sets = [set(g) for g in groups]
        self.note(f"partition {' | '.join(','.join(sorted(g)) for g in sets)}")
        for i, a in enumerate(sets):
            for b in sets[i + 1 :]:
                self.cut.update(frozenset((x, y)) for x in a for y in b)

    def heal(self) -> None:
        """Restore every link."""
        if self.cut:
            self.note("heal")
        self.cut.clear()

    def _send(self, msg: Message) -> None:
        net, rng = self.net, self.rng
        self.stats[type(msg).__name__] += 1
        if net.loss and rng.random() < net.loss:
            return
        if net.codec and rng.random() < net.codec:
            decoded = decode(encode(msg))
            if decoded != msg:
                raise SafetyViolation(f"codec round trip changed {msg!r}")
            msg = decoded
        copies = 2 if net.duplicate and rng.random() < net.duplicate else 1
        for _ in range(copies):
            delay = rng.randint(0, net.max_delay) if net.max_delay else 0
            self._counter += 1
            heapq.heappush(self._queue, (self.now + delay, self._counter, msg))

    def deliver(self) -> None:
        """Deliver every message due now, including replies sent meanwhile."""
        budget = 100_000
        while self._queue and self._queue[0][0] <= self.now:
            budget -= 1
            if budget == 0:
                raise SimFailure("message storm: delivery did not settle")
            _, _, msg = heapq.heappop(self._queue)
            node = self.nodes.get(msg.to)
            if node is None or node.core is None:
                continue
            if frozenset((msg.frm, msg.to)) in self.cut:
                continue
            if self.intercept is not None:
                replaced = self.intercept(msg)
                if replaced is None:
                    continue
                msg = replaced
            node.core.step(msg)
            self.process(node)

    def drop_in_flight(self) -> None:
        self._queue.clear()

    # -- driving -------------------------------------------------------

    def process(self, node: SimNode) -> None:
        """Run the driver loop for ``node``: ready, persist, send, apply, advance."""
        core = node.core
        for _ in range(1000):
            if core is None or not core.has_ready():
                return
            ready = core.ready()
            if self.crash_unpersisted and self.rng.random() < self.crash_unpersisted:
                self.stats["crash_unpersisted"] += 1
                self.crash(node.id)
                return
            if not self._handle_ready(node, core, ready):
                return
            core.advance(ready)
        raise SimFailure(f"{node.id}: has_ready() never settles")

    def _handle_ready(self, node: SimNode, core: RaftNode, ready: Ready) -> bool:
        """Persist, send, apply; False if the server crashed on the way."""
        check = self.checker
        if ready.soft_state is not None:
            soft = ready.soft_state
            self.note(
                f"{node.id} {soft.role.value} term={soft.term} leader={soft.leader}"
            )
            if soft.role is Role.LEADER:
                check.on_leader(core)
        check.on_persist(core, ready.entries)
        check.on_ready(core, ready)
        persist_ready(ready, node.log_store, node.stable)
        if ready.hard_state is not None:
            if core.role is Role.LEADER and ready.hard_state.commit > node.last_commit:
                check.on_commit(core, node.last_commit, ready.hard_state.commit)
            node.last_commit = ready.hard_state.commit
        if self.crash_unpersisted and self.rng.random() < self.crash_unpersisted:
            # Persisted, but the messages never left and nothing was applied.
            self.stats["crash_after_persist"] += 1
            self.crash(node.id)
            return False
        for msg in ready.messages:
            self._send(msg)
        if ready.snapshot is not None:
            self.stats["snapshot_installed"] += 1
            self._install(node, ready.snapshot)
        if ready.compacted is not None:
            self.stats["compacted"] += 1
            node.sm.check_snapshot(node.id, ready.compacted)
        for entry in ready.committed_entries:
            self._apply(node, entry)
        self.stats["read_failed"] += len(ready.failed_reads)
        self.stats["read_served"] += len(ready.read_states)
        for read in ready.read_states:
            self._check_read(node, read.ctx, read.index)
        for ctx in ready.failed_reads:
            if node.reads.pop(ctx, None) is not None:
                self.failed_reads.append((node.id, ctx))
        return not self._maybe_reboot(node, ready)

    def _maybe_reboot(self, node: SimNode, ready: Ready) -> bool:
        if not self.reboot:
            return False
        voted = any(
            isinstance(m, RequestVoteResp) and m.granted and not m.pre_vote
            for m in ready.messages
        )
        if self.rng.random() >= self.reboot * (10 if voted else 1):
            return False
        self.stats["reboot"] += 1
        self.crash(node.id)
        self.restart(node.id)
        return True

    def _install(self, node: SimNode, snap: Snapshot) -> None:
        node.sm = StateMachine.restore(snap.data)
        node.sm.check_snapshot(node.id, snap)
        if node.sm.index != snap.meta.index:
            raise SafetyViolation(
                f"{node.id}: snapshot data at {node.sm.index}, meta {snap.meta.index}"
            )
        self.checker.on_applied(node.id, node.sm)

    def _apply(self, node: SimNode, entry: Entry) -> None:
        node.sm.apply(entry)
        if entry.kind is EntryKind.CONFIG:
            self.stats["config_applied"] += 1
        self.checker.on_applied(node.id, node.sm)
        payload = node.pending.pop((entry.index, entry.term), None)
        if payload is not None:
            self.checker.acked[payload] = entry.index

    def _check_read(self, node: SimNode, ctx: bytes, index: int) -> None:
        need = node.reads.pop(ctx, None)
        if need is None:
            return
        self.served_reads.append((node.id, ctx, index))
        if index < need or node.sm.index < index:
            raise SafetyViolation(
                f"{node.id}: read confirmed at {index}, needed {need}, "
                f"applied {node.sm.index}"
            )

    def tick(self) -> None:
        """One unit of time: every live server ticks, then messages flow."""
        self.now += 1
        for node in self.live():
            assert node.core is not None
            node.core.tick()
            self.process(node)
        self.deliver()

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            self.tick()

    def run_until(self, done: Callable[[], bool], max_ticks: int) -> bool:
        for _ in range(max_ticks):
            if done():
                return True
            self.tick()
        return done()

    # -- client actions ------------------------------------------------

    def leader(self) -> str | None:
        """The live leader of the highest term, if any."""
        best: RaftNode | None = None
        for node in self.live():
            core = node.core
            assert core is not None
            if core.role is Role.LEADER and (best is None or core.term > best.term):
                best = core
        return best.id if best else None

    def wait_leader(self, max_ticks: int = 500) -> str:
        if not self.run_until(lambda: self.leader() is not None, max_ticks):
            raise SimFailure(f"no leader within {max_ticks} ticks")
        leader = self.leader()
        assert leader is not None
        return leader

    def act(self, node_id: str, action: Callable[[RaftNode], object]) -> object:
        """Give one input to a live server and run its driver loop."""
        node = self.nodes[node_id]
        result = action(self.core(node_id))
        self.process(node)
        return result

    def propose(self, node_id: str, payload: str) -> tuple[int, int]:
        """Propose ``payload`` at ``node_id``; it is acked once applied there."""
        core = self.core(node_id)
        key = core.propose(payload.encode())
        self.nodes[node_id].pending[key] = payload
        self.process(self.nodes[node_id])
        return key

    def read(self, node_id: str, ctx: bytes) -> None:
        """Ask for a linearizable read; checked when it is confirmed."""
        need = max(self.checker.acked.values(), default=0)
        self.nodes[node_id].reads[ctx] = need
        try:
            self.act(node_id, lambda c: c.read_index(ctx))
        except RaftError:
            self.nodes[node_id].reads.pop(ctx, None)
            raise

    def compact(self, node_id: str) -> None:
        node = self.nodes[node_id]
        data = node.sm.snapshot()
        self.act(node_id, lambda c: c.compact(node.sm.index, data))

    def applied_everywhere(self, payload: str, ids: Iterable[str]) -> bool:
        return all(payload in self.nodes[i].sm.items for i in ids)

    def check_logs(self) -> None:
        """Full log matching over every pair of servers' persisted logs."""
        logs = {}
        for node in self.nodes.values():
            store = node.log_store
            first, last = store.first_index(), store.last_index()
            logs[node.id] = (
                {e.index: e for e in store.entries(first, last + 1, 1 << 40)}
                if last >= first
                else {}
            )
        ids = sorted(logs)
        for i, a in enumerate(ids):
            for b in ids[i + 1 :]:
                self._match_pair(a, logs[a], b, logs[b])

    @staticmethod
    def _match_pair(a: str, la: dict[int, Entry], b: str, lb: dict[int, Entry]) -> None:
        common = sorted(set(la) & set(lb), reverse=True)
        agreed = False
        for index in common:
            same = la[index] == lb[index]
            agreed = agreed or la[index].term == lb[index].term
            if agreed and not same:
                raise SafetyViolation(f"log matching: {a} and {b} differ at {index}")


# ----------------------------------------------------------------------
# Random runs
# ----------------------------------------------------------------------


@dataclass
class SimResult:
    """Summary of one random run."""

    seed: int
    nodes: int
    ticks: int
    acked: int
    leaders: int
    final_members: list[str]
    stats: Counter[str]


def _random_config(rng: random.Random) -> Callable[[str], RaftConfig]:
    """Per-seed tunables; safety must hold for every combination."""
    base = RaftConfig(
        node_id="template",
        election_ticks=rng.choice((5, 8, 12)),
        heartbeat_ticks=rng.choice((1, 2)),
        max_msg_entries=rng.choice((1, 2, 4, 8)),
        max_inflight=rng.choice((1, 2, 4)),
        snapshot_chunk_bytes=rng.choice((64, 256, 4096)),
        # Without these, deposed leaders linger and logs diverge further.
        pre_vote=rng.random() < 0.8,
        check_quorum=rng.random() < 0.8,
    )
    return lambda node_id: dataclasses.replace(base, node_id=node_id)


class _Workload:
    """Random faults and client actions for ``run_seed``."""

    def __init__(self, cluster: Cluster, rng: random.Random) -> None:
        self.c = cluster
        self.rng = rng
        self.counter = 0

    def faults(self) -> None:
        c, rng = self.c, self.rng
        ids = sorted(c.nodes)
        roll = rng.random()
        leader = c.leader()
        if roll < 0.01:
            c.heal()
            c.partition(*self._split(ids))
        elif roll < 0.015 and leader:
            c.isolate(leader)  # the leader keeps taking writes it cannot commit
        elif roll < 0.05:
            c.heal()
        elif roll < 0.056:
            c.crash(rng.choice(ids))
        elif roll < 0.06 and leader:
            c.crash(leader)
        elif roll < 0.09:
            down = sorted(n for n in ids if c.nodes[n].core is None)
            if down:
                c.restart(rng.choice(down))

    def _split(self, ids: list[str]) -> tuple[list[str], list[str]]:
        shuffled = list(ids)
        self.rng.shuffle(shuffled)
        k = self.rng.randint(1, len(ids) // 2)
        return shuffled[:k], shuffled[k:]

    def actions(self) -> None:
        c, rng = self.c, self.rng
        # Each action looks the leader up again: the previous one may have
        # crashed it (a crash can hit between ready() and persisting).
        try:
            # Any leader, stale ones included: a deposed leader cut off in a
            # minority then grows an uncommitted, divergent log suffix.
            if rng.random() < 0.35 and (leader := self._any_leader()):
                self.counter += 1
                c.propose(leader, f"w{self.counter}")
            if rng.random() < 0.01 and (leader := c.leader()):
                self._conf_change(leader)
            if rng.random() < 0.004 and (leader := c.leader()):
                target = rng.choice(sorted(c.core(leader).membership.voters))
                c.note(f"transfer {leader} -> {target}")
                c.act(leader, lambda core: core.transfer_leadership(target))
            if rng.random() < 0.03 and (live := c.live()):
                self.counter += 1
                c.read(rng.choice(live).id, f"r{self.counter}".encode())
            for node in c.live():
                core = node.core
                if core is None:
                    continue
                if node.sm.index - core.log.snap_index > 12 and rng.random() < 0.05:
                    c.compact(node.id)
        except RaftError:
            pass

    def _any_leader(self) -> str | None:
        found = [n.id for n in self.c.live() if n.core and n.core.role is Role.LEADER]
        return self.rng.choice(found) if found else None

    def _conf_change(self, leader: str) -> None:
        """Propose a burst of one to three membership changes at ``leader``.

        All but the first are refused by a correct core (one change at a
        time); the burst is there so that a core that forgets the rule
        builds overlapping configurations.
        """
        # Limitation: even so, with that rule removed 300 seeds showed only
        # lost liveness, no safety break; test_node covers the rule itself.
        for _ in range(self.rng.randint(1, 3)):
            c = self.c
            core = c.nodes[leader].core
            if core is None or core.role is not Role.LEADER:
                return
            change = self._pick_change(core.membership)
            if change is None:
                return
            c.note(f"propose {change.op.value} {change.node} at {leader}")
            try:
                c.act(leader, lambda core, ch=change: core.propose_conf_change(ch))
            except ConfigChangeInProgress:
                return

    def _pick_change(self, membership: Membership) -> ConfChange | None:
        outsiders = sorted(set(self.c.nodes) - membership.members)
        learners = sorted(membership.learners)
        members = sorted(membership.members)
        choices: list[ConfChange] = []
        choices += [ConfChange(ConfChangeOp.ADD_LEARNER, n) for n in outsiders]
        choices += [ConfChange(ConfChangeOp.ADD_VOTER, n) for n in outsiders]
        choices += [ConfChange(ConfChangeOp.PROMOTE, n) for n in learners]
        if len(membership.voters) > 2:
            choices += [ConfChange(ConfChangeOp.REMOVE, n) for n in members]
        elif learners:
            choices += [ConfChange(ConfChangeOp.REMOVE, n) for n in learners]
        return self.rng.choice(choices) if choices else None


def run_seed(
    seed: int,
    nodes: int | None = None,
    steps: int | None = None,
    trace: Callable[[str], None] | None = None,
) -> SimResult:
    """One random run: faults and workload for ``steps`` ticks, then heal and check.

    Raises:
        SafetyViolation: a safety property broke (message says which).
        SimFailure: no progress after healing, or an acked write went missing.
    """
    rng = random.Random(seed)
    n = nodes or rng.choice((3, 3, 4, 5))
    steps = steps or 200
    ids = [f"n{i}" for i in range(1, n + 1)]
    founders = ids if n == 3 or rng.random() < 0.5 else ids[:-1]
    make_config = _random_config(rng)
    # Raft needs message delays well below the election timeout (§3.4);
    # beyond that elections livelock, which is expected, not a bug.
    election = make_config("n0").election_ticks
    net = NetConfig(
        loss=rng.choice((0.0, 0.02, 0.1)),
        duplicate=rng.choice((0.0, 0.02)),
        max_delay=min(rng.choice((0, 1, 3, 6)), election // 2),
        codec=0.05,
    )
    cluster = Cluster(ids, seed, founders, net, make_config)
    cluster.trace = trace
    cluster.note(f"start {make_config('n0')} {net}")
    cluster.crash_unpersisted = 0.0005
    cluster.reboot = 0.002
    work = _Workload(cluster, rng)
    for _ in range(steps):
        work.faults()
        work.actions()
        cluster.tick()
    return _heal_and_check(cluster, seed, n, steps)


def _heal_and_check(cluster: Cluster, seed: int, n: int, steps: int) -> SimResult:
    cluster.crash_unpersisted = cluster.reboot = 0.0
    cluster.net = NetConfig(max_delay=cluster.net.max_delay)
    cluster.heal()
    for node_id in cluster.nodes:
        cluster.restart(node_id)
    acked = dict(cluster.checker.acked)
    need = max(acked.values(), default=0)

    def converged() -> bool:
        leader = cluster.leader()
        if leader is None:
            return False
        core = cluster.core(leader)
        members = core.membership.members
        return core.commit >= need and all(
            cluster.nodes[m].sm.index >= core.commit for m in members
        )

    if not cluster.run_until(converged, 400):
        raise SimFailure(f"seed {seed}: cluster did not converge after healing")
    leader = cluster.leader()
    assert leader is not None
    members = sorted(cluster.core(leader).membership.members)
    for payload in acked:
        if not cluster.applied_everywhere(payload, members):
            raise SimFailure(f"seed {seed}: acked {payload} missing on a member")
    cluster.check_logs()
    return SimResult(
        seed=seed,
        nodes=n,
        ticks=cluster.now,
        acked=len(acked),
        leaders=len(cluster.checker.leaders),
        final_members=members,
        stats=cluster.stats,
    )
