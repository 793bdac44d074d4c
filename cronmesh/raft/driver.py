"""The asyncio driver of one Raft server: the only Raft code that awaits.

One task owns the `RaftNode`. It sleeps until something arrives (a message,
a proposal, a read, a membership change) or the next tick is due, feeds all
of it to the core, and then handles each Ready in the order the contract
demands (ready.py): persist, send, apply committed entries to the state
machine, answer the proposers whose entries were applied, and `advance`.
Everything that arrived while a Ready was being handled waits for the next
turn, so concurrent proposals share an fsync.

Three shortcuts keep fsyncs and waiting off the commit path:

- A Ready that has entries to persist and entries to apply writes both in
  ONE LMDB transaction (one fsync instead of two): a follower applies what
  the leader's previous append committed while it stores the next one, and
  a busy leader likewise. A crash shows both or neither; the applied
  entries are committed already, so applying them before the messages go
  out changes nothing a peer can see.
- A leader hands its AppendEntries to the transport before it writes the
  same entries to its own disk, and yields once so they leave while it
  fsyncs (Raft thesis §10.2.1): the leader counts its own copy toward the
  commit only once it is durable (`advance`), so this is safe. Only done
  when the Ready changes no term or vote; every other message (votes,
  answers to the leader) is sent only after the persist.
- An apply that goes alone (the leader's, once an answer committed its
  entries) skips the fsync of LMDB's meta page (`_apply` says why that is
  safe); the next synced write or tick makes it durable.

The driver is also the node's `CommandLog`: `propose` on the leader appends
and waits for the entry to be applied here; on a follower it forwards the
command to the leader over gRPC and returns the leader's result.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cronmesh.core.commitlog import MAX_COMMAND_BYTES, NotLeaderError
from cronmesh.core.fsm import ApplyResult, StateMachine, encode_command
from cronmesh.errors import InvariantViolation, StorageError, ValidationError
from cronmesh.raft.errors import NotLeader, ProposalDropped, RaftError
from cronmesh.raft.messages import AppendEntries, Message
from cronmesh.raft.node import RaftConfig, RaftNode
from cronmesh.raft.ready import Ready, Role
from cronmesh.raft.storage import bootstrap
from cronmesh.raft.types import ConfChange, EntryKind, HardState, Membership
from cronmesh.storage.raftlog import LmdbRaftStorage
from cronmesh.storage.snapshot import dump_state, load_state

__all__ = ["RaftDriver", "RaftSettings"]

# Longest wait for more proposals to share one persist (see _gather).
GATHER_MAX = 0.002
GATHER_STEP = 0.0002

log = logging.getLogger("cronmesh.raft")

NOOP = encode_command("noop")


@dataclass
class RaftSettings:
    """Timing and compaction of a server's Raft (seconds, entries)."""

    tick: float = 0.1  # one tick of the core
    election_ticks: int = 10  # base election timeout in ticks (1-2 s)
    heartbeat_ticks: int = 1
    snapshot_threshold: int = 8192  # applied entries between snapshots


class RaftDriver:
    """Runs a `RaftNode` on LMDB storage and a message transport."""

    def __init__(
        self,
        node_id: str,
        storage: LmdbRaftStorage,
        fsm: StateMachine,
        *,
        settings: RaftSettings | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.node_id = node_id
        self.storage = storage
        self.fsm = fsm
        self.settings = settings or RaftSettings()
        self.rng = rng or random.Random()
        self.send: Callable[[Message], None] = lambda msg: None
        self.forward: Callable[[str, bytes], Any] | None = None
        # What this server waits for before it has a leader (cluster.py).
        self.waiting: Callable[[], str] | None = None
        self.on_role: list[Callable[[bool], None]] = []
        self.node: RaftNode | None = None
        self._inbox: list[Message] = []
        self._proposals: list[tuple[bytes, asyncio.Future[ApplyResult]]] = []
        self._changes: list[tuple[ConfChange, asyncio.Future[ApplyResult]]] = []
        self._transfers: list[str] = []
        self._reads: list[bytes] = []
        self._read_waiters: dict[bytes, asyncio.Future[None]] = {}
        self._pending: dict[int, tuple[int, asyncio.Future[ApplyResult]]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.leader: str | None = None
        self._durable_hs = HardState()
        self.broken = ""  # why the driver stopped, when it did
        self.role = Role.FOLLOWER
        self.term = 0
        # Elections seen won (a new leader, or a new term), for metrics.
        self.leader_changes = 0
        self._seen_leader: tuple[str, int] | None = None

    # -- set-up
    def has_state(self) -> bool:
        return (
            self.storage.log.last_index() > 0
            or self.storage.stable.snapshot() is not None
        )

    def bootstrap(self, voters: set[str], cluster_id: str = "") -> None:
        """Write the first configuration of a new cluster (founders only),
        with the new cluster's id when one is given."""
        if cluster_id:
            self.storage.bootstrap(voters, cluster_id)
        else:
            bootstrap(self.storage.log, self.storage.stable, voters)
        log.info(
            "raft bootstrapped node_id=%s voters=%s cluster_id=%s",
            self.node_id,
            sorted(voters),
            cluster_id,
        )

    def start(self) -> None:
        config = RaftConfig(
            node_id=self.node_id,
            election_ticks=self.settings.election_ticks,
            heartbeat_ticks=self.settings.heartbeat_ticks,
        )
        applied = self.fsm.store.applied_index()
        snapshot = self.storage.stable.snapshot()
        if snapshot is not None and applied < snapshot.meta.index:
            load_state(self.fsm.store.data, snapshot.data, snapshot.meta.index)
            applied = snapshot.meta.index
        hard = self.storage.stable.hard_state()
        self._durable_hs = hard
        # The commit index on disk may lag the applied state (a change of
        # the commit index alone is not fsynced, see _needs_persist); the
        # core then re-delivers entries the state machine already has, and
        # apply_batch skips them by index.
        floor = snapshot.meta.index if snapshot is not None else 0
        applied = max(min(applied, hard.commit), floor)
        self.node = RaftNode(
            config, self.storage.log, self.storage.stable, self.rng, applied=applied
        )
        self._task = asyncio.create_task(self._run(), name="raft")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(NotLeaderError(self.leader or ""))

    # -- observation
    def is_leader(self) -> bool:
        return self.role is Role.LEADER

    def no_leader_reason(self) -> str:
        """Why no leader is known, when this server knows better than "a
        majority may be down" (set by the cluster: waiting to bootstrap)."""
        return self.waiting() if self.waiting is not None else ""

    @property
    def membership(self) -> Membership:
        assert self.node is not None
        return self.node.membership

    # -- inputs (any task)
    def deliver(self, msg: Message) -> None:
        self._inbox.append(msg)
        self._wake.set()

    async def propose(self, payload: bytes) -> ApplyResult:
        """Apply `payload` through the leader (CommandLog protocol)."""
        if self.broken:
            raise StorageError(self.broken)
        if len(payload) > MAX_COMMAND_BYTES:
            raise ValidationError(
                f"command: {len(payload)} bytes, more than the {MAX_COMMAND_BYTES} "
                "a Raft entry may hold"
            )
        if self.role is not Role.LEADER:
            return await self._forward(payload)
        future: asyncio.Future[ApplyResult] = asyncio.get_running_loop().create_future()
        self._proposals.append((payload, future))
        self._wake.set()
        return await future

    async def _forward(self, payload: bytes) -> ApplyResult:
        """Send `payload` to the leader; if that fails and another leader has
        been elected meanwhile, try that one (at most three leaders).

        A retry can apply a command twice when the first leader committed it
        after all; the commands are safe to repeat (an upsert, or refused as
        a duplicate by the state machine: fire instants, execution reports).
        """
        tried: list[str] = []
        while True:
            leader = self.leader
            if not leader or self.forward is None or leader in tried:
                known = leader or (tried[-1] if tried else "")
                raise NotLeaderError(known, "" if known else self.no_leader_reason())
            tried.append(leader)
            try:
                reply = await self.forward(leader, payload)
            except Exception as exc:  # transport or gRPC error of the call
                if len(tried) >= 3 or self.leader in (None, leader):
                    raise NotLeaderError(self.leader or leader) from exc
                continue
            if not reply.code:
                # A redirect: that server does not lead (any more). Without a
                # hint it knows no leader: never an answer of success.
                if not reply.leader or len(tried) >= 3 or reply.leader in tried:
                    raise NotLeaderError(reply.leader)
                continue
            # Any code is the leader's answer, a refusal of any kind too
            # (Cluster._on_propose): the caller raises it as that kind.
            value = json.loads(reply.value) if reply.value else None
            return ApplyResult(code=reply.code, error=reply.error, value=value)

    async def change_membership(self, change: ConfChange) -> ApplyResult:
        future: asyncio.Future[ApplyResult] = asyncio.get_running_loop().create_future()
        self._changes.append((change, future))
        self._wake.set()
        return await future

    async def read_barrier(self, timeout: float = 5.0) -> None:
        """Wait until this server's state reflects every write acknowledged
        before the call (Raft's read-index, thesis §6.4).

        Raises:
            NotLeaderError: no leader could confirm the read in time.
        """
        if self.broken:
            raise StorageError(self.broken)
        ctx = self.rng.randbytes(12)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._read_waiters[ctx] = future
        self._reads.append(ctx)
        self._wake.set()
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError as exc:
            raise NotLeaderError(self.leader or "") from exc
        finally:
            self._read_waiters.pop(ctx, None)

    def transfer_leadership(self, target: str) -> None:
        self._transfers.append(target)
        self._wake.set()

    # -- the loop
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        tick = self.settings.tick
        next_tick = loop.time() + tick
        while True:
            delay = next_tick - loop.time()
            if delay > 0 and not self._has_input():
                self._wake.clear()
                try:
                    # Not wait_for: that makes a task per turn, and on
                    # Python 3.11 it swallows a cancel that comes with a
                    # wake-up, so stop() would wait forever.
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            if self._proposals and not self._inbox and self._may_gather():
                await self._gather(loop)
            try:
                if loop.time() >= next_tick:
                    self._node().tick()
                    next_tick = max(next_tick + tick, loop.time())
                    self.fsm.store.data.flush()  # unsynced applies, see _apply
                self._feed()
                while self._node().has_ready():
                    ready = self._node().ready()
                    await self._handle(ready)
                    self._node().advance(ready)
                self._maybe_compact()
            except Exception as exc:
                # Persisting or applying failed: going on could break Raft's
                # promises, so this server stops taking part, loudly.
                log.exception("raft driver stopped node_id=%s", self.node_id)
                self._fail_all(exc)
                return
            await asyncio.sleep(0)

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give the loop a few turns to take in more proposals before this
        turn's persist blocks it for an fsync.

        Only called when `_may_gather` says more may be coming. The wait is
        longer than it looks: epoll waits whole milliseconds, so the
        GATHER_STEP sleep takes about 1 ms.

        gRPC and uvicorn accept about one request per loop turn, so without
        this a burst of 200 forwarded writes gets one write per fsync
        (measured: 200 concurrent Propose calls on one server took 1.1 s,
        every batch of one). Stops when a short sleep brings nothing new,
        or after GATHER_MAX seconds.
        """
        deadline = loop.time() + GATHER_MAX
        count = len(self._proposals)
        while loop.time() < deadline:
            # A real sleep, not sleep(0): gRPC's poller thread hands new
            # calls to the loop through a socket, which a turn without
            # waiting rarely sees.
            await asyncio.sleep(GATHER_STEP)
            if len(self._proposals) == count:
                break
            count = len(self._proposals)

    def _may_gather(self) -> bool:
        """Whether this turn's proposals should wait for company.

        With peers, only while earlier entries still wait for their commit,
        i.e. when proposals come faster than one round trip: a lone
        proposal then goes out at once instead of paying the ~1 ms of
        `_gather` on every commit, and a burst still gathers from its
        second batch on. A single voter commits within the turn, so nothing
        is ever pending at its start and that signal says nothing.
        Limitation: a single voter therefore always gathers, and a lone
        proposer on it still pays that ~1 ms per commit.
        """
        return bool(self._pending) or len(self._node().membership.voters) <= 1

    def _node(self) -> RaftNode:
        assert self.node is not None
        return self.node

    def _has_input(self) -> bool:
        return bool(
            self._inbox
            or self._proposals
            or self._changes
            or self._transfers
            or self._reads
        )

    def _feed(self) -> None:
        node = self._node()
        inbox, self._inbox = self._inbox, []
        for msg in inbox:
            try:
                node.step(msg)
            except RaftError as exc:
                log.debug("raft message refused node_id=%s error=%s", self.node_id, exc)
        proposals, self._proposals = self._proposals, []
        for payload, future in proposals:
            try:
                index, term = node.propose(payload)
            except (NotLeader, RaftError) as exc:
                future.set_exception(NotLeaderError(getattr(exc, "leader", None) or ""))
                continue
            self._pending[index] = (term, future)
        changes, self._changes = self._changes, []
        for change, future in changes:
            try:
                index, term = node.propose_conf_change(change)
            except RaftError as exc:
                future.set_exception(exc)
                continue
            self._pending[index] = (term, future)
        reads, self._reads = self._reads, []
        for ctx in reads:
            try:
                node.read_index(ctx)
            except RaftError:
                self._settle_read(ctx, NotLeaderError(self.leader or ""))
        transfers, self._transfers = self._transfers, []
        for target in transfers:
            try:
                node.transfer_leadership(target)
            except RaftError as exc:
                log.info("leadership transfer refused target=%s error=%s", target, exc)

    def _needs_persist(self, ready: Ready) -> bool:
        """Whether `ready` holds anything that must be durable before sending.

        A Ready whose only durable change is a higher commit index is not
        written (etcd's rule): the commit index can always be learned again
        from the leader, so losing it in a crash is safe, and skipping it
        saves one fsync per commit on every server.
        """
        if not ready.must_sync():
            return False
        hard = ready.hard_state
        commit_only = (
            not ready.entries
            and ready.truncate_from is None
            and ready.snapshot is None
            and ready.compacted is None
            and hard is not None
            and (hard.term, hard.vote) == (self._durable_hs.term, self._durable_hs.vote)
        )
        return not commit_only

    async def _handle(self, ready: Ready) -> None:
        persist = self._needs_persist(ready)
        late = ready.messages
        if persist and self._may_send_early(ready):
            early = [m for m in ready.messages if isinstance(m, AppendEntries)]
            if early:
                late = tuple(
                    m for m in ready.messages if not isinstance(m, AppendEntries)
                )
                for msg in early:
                    self.send(msg)
                # One loop turn: the transport writes them before the fsync.
                # Limitation: best effort; a slow turn sends them after it.
                await asyncio.sleep(0)
        applied = False
        if persist:
            if self._can_apply_with_persist(ready):
                self._persist_and_apply(ready)
                applied = True
            else:
                self.storage.persist(ready)
            if ready.hard_state is not None:
                self._durable_hs = ready.hard_state
        for msg in late:
            self.send(msg)
        if ready.snapshot is not None:
            meta = ready.snapshot.meta
            load_state(self.fsm.store.data, ready.snapshot.data, meta.index)
            log.info(
                "raft snapshot installed node_id=%s index=%d", self.node_id, meta.index
            )
        if ready.committed_entries and not applied:
            self._settle(ready, self._apply(ready))
        for state in ready.read_states:
            self._settle_read(state.ctx, None)
        for ctx in ready.failed_reads:
            self._settle_read(ctx, NotLeaderError(self.leader or ""))
        if ready.soft_state is not None:
            self._role_changed(
                ready.soft_state.role, ready.soft_state.leader, ready.soft_state.term
            )

    def _may_send_early(self, ready: Ready) -> bool:
        """Whether the leader's appends in `ready` may go before its persist.

        Only when nothing but log entries (and the commit index) changes on
        disk: a new term or vote must be durable before any message of it.
        """
        hard = ready.hard_state
        return (
            self.role is Role.LEADER
            and ready.snapshot is None
            and (
                hard is None
                or (hard.term, hard.vote)
                == (self._durable_hs.term, self._durable_hs.vote)
            )
        )

    def _can_apply_with_persist(self, ready: Ready) -> bool:
        return (
            bool(ready.committed_entries)
            and ready.snapshot is None
            and self.fsm.store.data is self.storage.data
        )

    def _apply(self, ready: Ready) -> list[ApplyResult]:
        """Apply `ready`'s committed entries in a transaction of their own,
        committed without the final fsync (`DataDir.unsynced`).

        Why that is safe: the transaction holds the new state and the
        applied index together, so the state on disk is always the result
        of applying the log up to the index stored with it; LMDB's
        NOMETASYNC keeps it intact (it only may lose the last transactions
        to a power loss, never mix them). Every entry applied here is in
        the durable log of a majority (it is committed) and of this server
        (`_handle` persists a Ready before it applies), so a lost apply is
        redone on restart: `start` resumes from the applied index on disk
        and the core hands the later entries to the state machine again.
        The proposer's answer depends only on the commit and on the result,
        which the replay computes again identically. A kill -9 loses
        nothing (the page cache keeps the transaction); the next synced
        write, or the next tick's `flush`, makes it durable.
        Limitation: a power loss within that tick re-applies the lost
        entries at restart, so state machine listeners see their events a
        second time (as after any crash between a persist and its apply).
        """
        with self.fsm.store.data.unsynced():
            return self.fsm.apply_batch(self._batch(ready))

    def _batch(self, ready: Ready) -> list[tuple[int, bytes]]:
        return [
            (e.index, e.data if e.kind is EntryKind.NORMAL else NOOP)
            for e in ready.committed_entries
        ]

    def _persist_and_apply(self, ready: Ready) -> None:
        """Persist `ready` and apply its committed entries in one transaction.

        `StateMachine.apply_batch` opens its own write through its store's
        `DataDir.write`; for this one call that method is replaced on the
        instance by one that runs the persist's body first in the same
        transaction, so the state machine's contract (one transaction per
        batch, listeners told after the commit) holds unchanged.
        Limitation: this relies on `apply_batch` making exactly one
        `DataDir.write` call; a hook in the state machine would be cleaner.
        It is checked: a persist that did not run stops the driver.
        """
        data = self.storage.data
        bodies: list[Any] = []
        results: list[ApplyResult] = []

        def committer(body: Callable[[Any], Any]) -> Any:
            outer = data.write
            used = False

            def joined(apply_body: Callable[[Any], Any]) -> Any:
                nonlocal used
                if used:  # a second write in the same apply: not joined
                    return outer(apply_body)
                used = True

                def both(txn: Any) -> Any:
                    bodies.append(body(txn))  # may run again: map grown
                    return apply_body(txn)

                return outer(both)

            shadowed = "write" in vars(data)  # already replaced on the instance
            data.write = joined  # type: ignore[method-assign]
            try:
                results.extend(self.fsm.apply_batch(self._batch(ready)))
            finally:
                if shadowed:
                    data.write = outer  # type: ignore[method-assign]
                else:
                    del data.write  # back to the class's method
            if not bodies:
                raise InvariantViolation(
                    "raft: the state machine wrote without the persist of "
                    f"entries up to {ready.entries[-1].index if ready.entries else 0}"
                )
            return bodies[-1]

        self.storage.persist(ready, committer)
        self._settle(ready, results)

    def _settle(self, ready: Ready, results: list[ApplyResult]) -> None:
        """Answer the proposers of the entries `ready` applied."""
        for entry, result in zip(ready.committed_entries, results, strict=True):
            waiting = self._pending.pop(entry.index, None)
            if waiting is None:
                continue
            term, future = waiting
            if future.done():
                continue
            if term != entry.term:
                future.set_exception(
                    ProposalDropped("raft: entry replaced by a new leader")
                )
            else:
                future.set_result(result)

    def _settle_read(self, ctx: bytes, error: Exception | None) -> None:
        future = self._read_waiters.get(ctx)
        if future is None or future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def _role_changed(self, role: Role, leader: str | None, term: int) -> None:
        was_leader = self.role is Role.LEADER
        self.role, self.leader, self.term = role, leader, term
        if leader is not None and (leader, term) != self._seen_leader:
            self._seen_leader = (leader, term)
            self.leader_changes += 1
        if role is Role.LEADER and not was_leader:
            log.info(
                "leader elected node_id=%s term=%d (this node)", self.node_id, term
            )
        elif leader and was_leader is False and role is Role.FOLLOWER:
            log.info(
                "following leader node_id=%s leader=%s term=%d",
                self.node_id,
                leader,
                term,
            )
        if was_leader != (role is Role.LEADER):
            if was_leader:
                self._drop_pending()
            for callback in self.on_role:
                callback(role is Role.LEADER)

    def _fail_all(self, exc: Exception) -> None:
        self.broken = f"raft stopped: {exc}"
        self.role, self.leader = Role.FOLLOWER, None
        for callback in self.on_role:
            callback(False)
        error = StorageError(self.broken)
        waiting = [f for _, f in self._pending.values()]
        waiting += [f for _, f in self._proposals] + [f for _, f in self._changes]
        for future in waiting:
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        self._proposals.clear()
        self._changes.clear()

    def _drop_pending(self) -> None:
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(NotLeaderError(self.leader or ""))
        self._pending.clear()

    def _maybe_compact(self) -> None:
        node = self._node()
        if node.applied - node.log.snap_index < self.settings.snapshot_threshold:
            return
        node.compact(node.applied, dump_state(self.fsm.store.data))
        log.info("raft log compacted node_id=%s index=%d", self.node_id, node.applied)
