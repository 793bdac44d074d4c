"""The Raft state machine of one server: no I/O, no clock, no threads.

Theory of operation
-------------------
A ``RaftNode`` is driven by six inputs: ``tick()`` (the only notion of time),
``step(message)``, ``propose(data)``, ``propose_conf_change(change)``,
``read_index(ctx)`` and ``transfer_leadership(target)`` (plus ``compact`` from
the application).  Inputs only change memory.  ``ready()`` then hands out one
batch (``Ready``) of everything they caused; the driver persists it, sends its
messages, applies its committed entries and calls ``advance(ready)``.  No
input is accepted between ``ready()`` and ``advance()``; several inputs before
one ``ready()`` make one batch (group commit, thesis §10.2.1).

Roles and elections (thesis §3.4): a follower that hears nothing from a
leader for a randomized timeout in [election_ticks, 2 * election_ticks)
first polls the voters with a pre-vote (§9.6), which changes nobody's term,
and only with a majority of pre-votes starts a real election.  With
check-quorum (§6.2) a leader that did not hear from a majority during an
election timeout steps down, and a server that heard from a leader within
the timeout ignores (pre-)vote requests (the leader lease), so a partitioned
server cannot disrupt a healthy cluster when it comes back.

Replication (§3.5): the leader tracks a ``Progress`` per follower (probe,
replicate with an in-flight window, snapshot).  A rejection carries a hint
(conflicting term and the first index of that term) so the leader skips a
whole term per round trip.  The leader commits only an entry of its own term
stored on a majority (§3.6.2); a new leader appends a no-op to get there.

Snapshots (§5): the application calls ``compact(index, data)`` with a
snapshot of its state; the log prefix goes away.  A follower that needs that
prefix receives the snapshot in chunks and installs it on the last one.

Membership (§4.1): one server at a time, as a CONFIG log entry holding the
whole new configuration.  A server uses the newest configuration in its log,
committed or not, and falls back to the previous one if that entry is
truncated.  A leader accepts a change only once nothing older is uncommitted
and an entry of its term is committed.  A leader that removed itself steps
down once the change commits (§4.2.2).

Leadership transfer (§3.10): the leader stops taking proposals, catches the
target up, sends TimeoutNow; the target campaigns at once, bypassing the
lease.  The transfer is abandoned after an election timeout.

Linearizable reads (§6.4): the leader records its commit index, proves it is
still leader by a heartbeat round answered by a majority (``seq`` numbers),
and releases the read once that index is applied.  Followers forward the
request to the leader and wait for the index the leader returns.

Unknown peers: a message that would break an invariant (a second leader in
our term, entries contradicting our committed log) is a bug only when its
sender is a member of our configuration.  From anyone else it comes from
another cluster that reached us by mistake (the transport should have
refused it): it is dropped, logged and counted in ``dropped_unknown``, and
never stops the node.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar

from cronmesh.errors import InvariantViolation
from cronmesh.raft.errors import (
    ConfigChangeInProgress,
    InvalidRequest,
    NotLeader,
    ReadyPending,
    TransferInProgress,
)
from cronmesh.raft.log import RaftLog
from cronmesh.raft.messages import (
    AppendEntries,
    AppendEntriesResp,
    InstallSnapshot,
    InstallSnapshotResp,
    Message,
    ReadIndex,
    ReadIndexResp,
    RequestVote,
    RequestVoteResp,
    TimeoutNow,
)
from cronmesh.raft.progress import Progress, ProgressState
from cronmesh.raft.quorum import VoteResult, committed_index, vote_result
from cronmesh.raft.ready import ReadState, Ready, Role, SoftState
from cronmesh.raft.storage import LogStore, StableStore
from cronmesh.raft.types import (
    ConfChange,
    Entry,
    EntryKind,
    HardState,
    Membership,
    Snapshot,
    SnapshotMeta,
    decode_config_entry,
    encode_config_entry,
)

__all__ = ["RaftConfig", "RaftNode", "Status"]

_log = logging.getLogger("cronmesh.raft")

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _guarded(
    method: Callable[Concatenate[RaftNode, _P], _R],
) -> Callable[Concatenate[RaftNode, _P], _R]:
    """Mark a public input: a node that broke an invariant takes no more input."""

    @functools.wraps(method)
    def wrapper(self: RaftNode, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if self._broken is not None:
            raise InvariantViolation(
                f"raft: node {self.id} stopped after: {self._broken}"
            ) from self._broken
        try:
            return method(self, *args, **kwargs)
        except InvariantViolation as exc:
            self._broken = exc
            raise

    return wrapper


@dataclass(frozen=True, slots=True)
class RaftConfig:
    """Tunables of one server.  Durations are in ticks, sizes in bytes."""

    node_id: str
    election_ticks: int = 10  # base election timeout; randomized up to 2x
    heartbeat_ticks: int = 1  # leader heartbeat interval, < election_ticks
    max_msg_entries: int = 64  # entries per AppendEntries, >= 1
    max_msg_bytes: int = 1 << 20  # payload per AppendEntries (one entry may exceed)
    max_inflight: int = 16  # unanswered AppendEntries per follower, >= 1
    snapshot_chunk_bytes: int = 1 << 20  # InstallSnapshot chunk size, >= 1
    max_apply_bytes: int = 16 << 20  # committed entries per Ready
    pre_vote: bool = True
    check_quorum: bool = True

    def validate(self) -> None:
        """Raises InvalidRequest naming the first bad field."""
        if not self.node_id:
            raise InvalidRequest("raft: node_id must not be empty", "node_id")
        if self.heartbeat_ticks < 1 or self.election_ticks <= self.heartbeat_ticks:
            raise InvalidRequest(
                "raft: need 1 <= heartbeat_ticks < election_ticks", "election_ticks"
            )
        for name in ("max_msg_entries", "max_inflight", "snapshot_chunk_bytes"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"raft: {name} must be >= 1", name)


@dataclass(frozen=True, slots=True)
class Status:
    """A read-only summary of one server, for metrics and status endpoints."""

    node_id: str
    role: Role
    term: int
    leader: str | None
    commit: int  # highest index known committed
    applied: int  # highest index handed to the state machine and advanced
    last_index: int  # last index in the log (persisted or not)
    snapshot_index: int  # log prefix replaced by the newest snapshot
    membership: Membership
    match: dict[str, int]  # leader only: highest index stored per member


@dataclass(slots=True)
class _Read:
    """A read-index request waiting to be confirmed by a heartbeat round."""

    ctx: bytes
    requester: str  # this node, or the follower that forwarded it
    index: int = 0  # commit index when the round started
    seq: int = 0  # the round that must be acknowledged by a majority


class RaftNode:
    """One Raft server's state machine.  See the module docstring for the model.

    Args:
        config: tunables; validated here.
        log_store: the persisted log, read at construction and while running.
        stable_store: the persisted hard state and snapshot, read here only.
        rng: the source of election jitter; seed it for reproducible runs.
        applied: index the state machine already reflects (default: the
            snapshot index, so committed entries after it are re-delivered).

    Raises:
        InvalidRequest: ``config`` is invalid.
        InvariantViolation: the stores contradict each other.
    """

    def __init__(
        self,
        config: RaftConfig,
        log_store: LogStore,
        stable_store: StableStore,
        rng: random.Random,
        applied: int | None = None,
    ) -> None:
        config.validate()
        self.id = config.node_id
        self.cfg = config
        self._rng = rng
        hard = stable_store.hard_state()
        # Limitation: the newest snapshot is kept in memory whole (to send it
        # to followers); a large application state costs that much RAM.
        self._snapshot = stable_store.snapshot()
        meta = self._snapshot.meta if self._snapshot else None
        self.log = RaftLog(log_store, meta)
        self._configs: list[tuple[int, Membership]] = [
            (meta.index, meta.membership) if meta else (0, Membership())
        ]
        self._scan_configs()
        self.term, self.vote = hard.term, hard.vote
        self.commit = max(hard.commit, self.log.snap_index)
        self.applied = self.log.snap_index if applied is None else applied
        self._check_restart_bounds()
        self._persisted_hs = hard
        self._broken: InvariantViolation | None = None
        # Messages dropped because a non-member broke an invariant with them.
        self.dropped_unknown = 0
        self._init_volatile()
        self._reported_soft = SoftState(self.role, self.leader, self.term)

    def _check_restart_bounds(self) -> None:
        if self.commit > self.log.last_index():
            raise InvariantViolation(
                f"raft: commit {self.commit} beyond last index {self.log.last_index()}"
            )
        if not self.log.snap_index <= self.applied <= self.commit:
            raise InvariantViolation(
                f"raft: applied {self.applied} outside "
                f"[{self.log.snap_index}, {self.commit}]"
            )

    def _init_volatile(self) -> None:
        self.role = Role.FOLLOWER
        self.leader: str | None = None
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._timeout = self._random_timeout()
        self.progress: dict[str, Progress] = {}
        self._votes: dict[str, bool] = {}
        self._transfer_target: str | None = None
        self._transfer_elapsed = 0
        self._seq = 0
        self._seq_due = False
        self._reads_need_commit: list[_Read] = []
        self._reads_pending: list[_Read] = []
        self._reads_ready: list[ReadState] = []
        self._forwarded: set[bytes] = set()
        self._failed_reads: list[bytes] = []
        self._msgs: list[Message] = []
        self._install: Snapshot | None = None
        self._compacted: Snapshot | None = None
        self._snap_buf: tuple[tuple[int, int], bytearray] | None = None
        self._bcast = False
        self._outstanding: Ready | None = None

    # ------------------------------------------------------------------
    # Observation
    # ------------------------------------------------------------------

    @property
    def membership(self) -> Membership:
        """The configuration in force: the newest one in the log (§4.1)."""
        return self._configs[-1][1]

    @property
    def snapshot(self) -> Snapshot | None:
        """The newest snapshot this node holds (saved, or about to be)."""
        return self._snapshot

    def status(self) -> Status:
        """A consistent summary of this server right now."""
        return Status(
            node_id=self.id,
            role=self.role,
            term=self.term,
            leader=self.leader,
            commit=self.commit,
            applied=self.applied,
            last_index=self.log.last_index(),
            snapshot_index=self.log.snap_index,
            membership=self.membership,
            match={peer: pr.match for peer, pr in sorted(self.progress.items())},
        )

    def membership_at(self, index: int) -> Membership:
        """The configuration in force at log ``index``."""
        for at, membership in reversed(self._configs):
            if at <= index:
                return membership
        raise InvariantViolation(
            f"raft: no configuration known at index {index} "
            f"(oldest {self._configs[0][0]})"
        )

    # ------------------------------------------------------------------
    # Logging helpers
    # ------------------------------------------------------------------

    def _emit(self, level: int, event: str, fields: dict[str, object]) -> None:
        if _log.isEnabledFor(level):
            fields = {"node_id": self.id, "term": self.term, **fields}
            text = " ".join(f"{k}={v}" for k, v in fields.items())
            _log.log(level, "%s %s", event, text, extra=fields)

    def _info(self, event: str, **fields: object) -> None:
        self._emit(logging.INFO, event, fields)

    def _debug(self, event: str, **fields: object) -> None:
        self._emit(logging.DEBUG, event, fields)

    def _violation_or_drop(self, sender: str, text: str) -> None:
        """``text`` broke an invariant: raise when ``sender`` is one of ours,
        else drop the message (see "Unknown peers" in the module docstring)."""
        if sender in self.membership.members:
            raise InvariantViolation(text)
        self.dropped_unknown += 1
        self._emit(
            logging.WARNING,
            "drop message from a server outside the configuration",
            {"peer": sender, "reason": text},
        )

    # ------------------------------------------------------------------
    # Inputs
    # ------------------------------------------------------------------

    def _check_idle(self) -> None:
        if self._outstanding is not None:
            raise ReadyPending("raft: input given before advance() of the last Ready")

    @_guarded
    def tick(self) -> None:
        """Advance logical time by one tick."""
        self._check_idle()
        if self.role is Role.LEADER:
            self._tick_heartbeat()
        else:
            self._tick_election()

    @_guarded
    def step(self, msg: Message) -> None:
        """Process one message received from a peer.

        Stale and misaddressed messages are dropped (logged at DEBUG).
        """
        self._check_idle()
        if msg.to != self.id:
            self._debug("drop misaddressed message", peer=msg.frm, to=msg.to)
        elif isinstance(msg, ReadIndex):
            self._handle_read_index(msg)
        elif isinstance(msg, ReadIndexResp):
            self._handle_read_index_resp(msg)
        elif msg.term > self.term and not self._on_higher_term(msg):
            return
        elif msg.term < self.term:
            self._on_lower_term(msg)
        else:
            self._dispatch(msg)

    def _dispatch(self, msg: Message) -> None:
        """Hand a message of our own term to its handler."""
        match msg:
            case AppendEntries():
                self._handle_append_entries(msg)
            case AppendEntriesResp():
                self._handle_append_resp(msg)
            case RequestVote():
                self._handle_request_vote(msg)
            case RequestVoteResp():
                self._handle_vote_resp(msg)
            case InstallSnapshot():
                self._handle_install_snapshot(msg)
            case InstallSnapshotResp():
                self._handle_snapshot_resp(msg)
            case TimeoutNow():
                self._handle_timeout_now(msg)
            case _:
                self._debug("drop unknown message", kind=type(msg).__name__)

    @_guarded
    def propose(self, data: bytes) -> tuple[int, int]:
        """Append a command to the log (leader only).

        Returns:
            ``(index, term)`` of the new entry.  The command succeeded once an
            entry with exactly this index and term comes out in
            ``committed_entries``; a different term at that index means it
            was lost and may be retried.

        Raises:
            NotLeader: this node is not the leader.
            TransferInProgress: a leadership transfer is under way.
        """
        self._check_idle()
        self._check_can_propose()
        # Limitation: uncommitted entries are not capped; while no quorum
        # answers, proposals pile up in memory until check-quorum steps down.
        return self._leader_append(EntryKind.NORMAL, data)

    @_guarded
    def propose_conf_change(self, change: ConfChange) -> tuple[int, int]:
        """Append a single-server membership change (leader only).

        The new configuration takes effect on each server as soon as it is
        appended there (thesis §4.1).

        Returns:
            ``(index, term)`` of the CONFIG entry.

        Raises:
            NotLeader, TransferInProgress: as for ``propose``.
            ConfigChangeInProgress: an earlier change is not committed, or
                this leader has not committed an entry of its term yet.
            InvalidRequest: the change is a no-op or removes the last voter.
        """
        self._check_idle()
        self._check_can_propose()
        if self.log.term(self.commit) != self.term:
            raise ConfigChangeInProgress("raft: no entry of this term committed yet")
        if self._configs[-1][0] > self.commit:
            raise ConfigChangeInProgress(
                f"raft: change at index {self._configs[-1][0]} not committed"
            )
        # Limitation: ADD_VOTER and PROMOTE do not wait for the server to
        # catch up; a lagging new voter can stall commits until it has.
        new = self.membership.apply(change)
        return self._leader_append(EntryKind.CONFIG, encode_config_entry(new, change))

    @_guarded
    def read_index(self, ctx: bytes) -> None:
        """Ask for a linearizable read; ``ctx`` comes back in a ``ReadState``.

        On a follower the request is forwarded to the leader.  A request that
        cannot be confirmed comes back in ``Ready.failed_reads``.

        Raises:
            NotLeader: no leader is known (hint None).
        """
        self._check_idle()
        if self.role is Role.LEADER:
            self._leader_read(ctx, self.id)
        elif self.leader is not None:
            self._forwarded.add(ctx)
            self._send(ReadIndex(to=self.leader, frm=self.id, term=self.term, ctx=ctx))
        else:
            raise NotLeader(None)

    @_guarded
    def transfer_leadership(self, target: str) -> None:
        """Hand leadership to voter ``target`` (§3.10).

        Proposals are refused until the transfer ends; it is abandoned after
        an election timeout.

        Raises:
            NotLeader: this node is not the leader.
            InvalidRequest: ``target`` is not a voter.
            TransferInProgress: a transfer to another server is under way.
        """
        self._check_idle()
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader)
        if target == self.id or target == self._transfer_target:
            return
        if target not in self.membership.voters:
            raise InvalidRequest(f"raft: {target} is not a voter", "target")
        if self._transfer_target is not None:
            raise TransferInProgress(f"raft: already transferring to {target}")
        self._info("leadership transfer started", peer=target)
        self._transfer_target, self._transfer_elapsed = target, 0
        self._maybe_send_timeout_now(target)

    @_guarded
    def compact(self, index: int, data: bytes) -> None:
        """Replace the log prefix up to ``index`` by the snapshot ``data``.

        ``data`` MUST be the state machine as of exactly ``index``.  Calls
        for an index already covered are ignored.

        Raises:
            InvalidRequest: ``index`` has not been applied yet.
        """
        self._check_idle()
        if index <= self.log.snap_index:
            return
        if index > self.applied:
            raise InvalidRequest(
                f"raft: compact to {index} beyond applied {self.applied}", "index"
            )
        term = self.log.term(index)
        assert term is not None
        meta = SnapshotMeta(index, term, self.membership_at(index))
        self._snapshot = self._compacted = Snapshot(meta, data)
        self.log.compact_to(meta)
        keep = [c for c in self._configs if c[0] > index]
        self._configs = [(index, meta.membership), *keep]

    # ------------------------------------------------------------------
    # Ready / advance
    # ------------------------------------------------------------------

    def has_ready(self) -> bool:
        """Whether ``ready()`` would return something worth handling."""
        # Called after every input: compare fields rather than build objects.
        hard, soft = self._persisted_hs, self._reported_soft
        return bool(
            self._msgs
            or self.log.unstable
            or self.commit > self.applied
            or self.term != hard.term
            or self.vote != hard.vote
            or self.commit != hard.commit
            or self.role is not soft.role
            or self.leader != soft.leader
            or self.term != soft.term
            or (self.role is Role.LEADER and (self._bcast or self._seq_due))
            or self.log.truncate_from is not None
            or self._install
            or self._compacted
            or self._failed_reads
            or any(r.index <= self.commit for r in self._reads_ready)
        )

    @_guarded
    def ready(self) -> Ready:
        """Collect the batch produced since the last ``advance``.

        Raises:
            ReadyPending: the previous Ready was not advanced.
        """
        self._check_idle()
        self._flush()
        install = self._install
        base = install.meta.index if install else self.applied
        committed: list[Entry] = []
        if self.commit > base:
            committed = self.log.entries(
                base + 1, self.commit + 1, self.cfg.max_apply_bytes
            )
        applied_after = committed[-1].index if committed else base
        reads = [r for r in self._reads_ready if r.index <= applied_after]
        self._reads_ready = [r for r in self._reads_ready if r.index > applied_after]
        hard = HardState(self.term, self.vote, self.commit)
        soft = SoftState(self.role, self.leader, self.term)
        ready = Ready(
            messages=tuple(self._msgs),
            entries=tuple(self.log.unstable),
            truncate_from=self.log.truncate_from,
            hard_state=hard if hard != self._persisted_hs else None,
            committed_entries=tuple(committed),
            snapshot=install,
            compacted=self._compacted,
            read_states=tuple(reads),
            failed_reads=tuple(self._failed_reads),
            soft_state=soft if soft != self._reported_soft else None,
        )
        self._msgs, self._failed_reads = [], []
        self._reported_soft = soft
        self._outstanding = ready
        return ready

    @_guarded
    def advance(self, ready: Ready) -> None:
        """Acknowledge that ``ready`` was persisted, sent and applied.

        Raises:
            ReadyPending: ``ready`` is not the batch last handed out.
        """
        if ready is not self._outstanding:
            raise ReadyPending("raft: advance() with a Ready not handed out last")
        self._outstanding = None
        self.log.stable_to(len(ready.entries))
        if ready.hard_state is not None:
            self._persisted_hs = ready.hard_state
        if ready.snapshot is not None:
            self.applied = ready.snapshot.meta.index
            self._install = None
        if ready.committed_entries:
            self.applied = ready.committed_entries[-1].index
        self._compacted = None
        if self.role is Role.LEADER:
            # The leader counts its own copy only once it is on disk.
            self.progress[self.id].ack(self.log.stable_last_index())
            self._maybe_commit()

    def _flush(self) -> None:
        """Send what inputs deferred so that one batch carries it once."""
        if self.role is not Role.LEADER:
            return
        if self._bcast:
            self._bcast = False
            for peer in self._peers():
                self._replicate(peer)
        if self._seq_due:
            self._seq_due = False
            self._seq += 1
            self._broadcast_heartbeat()

    # ------------------------------------------------------------------
    # Time
    # ------------------------------------------------------------------

    def _random_timeout(self) -> int:
        base = self.cfg.election_ticks
        return base + self._rng.randrange(base)

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.election_elapsed >= self._timeout and self._promotable():
            self._info("election timeout", elapsed=self.election_elapsed)
            self._campaign(pre_vote=self.cfg.pre_vote)

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self._transfer_target is not None:
            self._transfer_elapsed += 1
            if self._transfer_elapsed >= self.cfg.election_ticks:
                self._info("leadership transfer aborted", peer=self._transfer_target)
                self._transfer_target = None
        if self.election_elapsed >= self.cfg.election_ticks:
            self.election_elapsed = 0
            if self.cfg.check_quorum and not self._quorum_active():
                self._info("stepping down: quorum not heard from")
                self._become_follower(self.term, None)
                return
            for peer in self._peers():
                self.progress[peer].recent_active = False
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks:
            self.heartbeat_elapsed = 0
            self._broadcast_heartbeat()

    def _quorum_active(self) -> bool:
        active = {
            p: pr.recent_active or p == self.id for p, pr in self.progress.items()
        }
        return vote_result(active, self.membership.voters) is VoteResult.WON

    def _promotable(self) -> bool:
        return self.id in self.membership.voters

    # ------------------------------------------------------------------
    # Role transitions (§3.3)
    # ------------------------------------------------------------------

    def _reset(self, term: int) -> None:
        if term != self.term:
            if term < self.term:
                raise InvariantViolation(f"raft: term going back {self.term}->{term}")
            self.term, self.vote = term, None
        self._fail_reads()
        self.leader = None
        self.election_elapsed = self.heartbeat_elapsed = 0
        self._timeout = self._random_timeout()
        self._votes, self.progress = {}, {}
        self._transfer_target = None
        self._bcast = self._seq_due = False

    def _become_follower(self, term: int, leader: str | None) -> None:
        self._reset(term)
        self.role, self.leader = Role.FOLLOWER, leader
        self._info("became follower", leader=leader)

    def _become_pre_candidate(self) -> None:
        self._reset(self.term)
        self.role = Role.PRE_CANDIDATE
        self._info("became pre-candidate")

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.role, self.vote = Role.CANDIDATE, self.id
        self._info("became candidate")

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role, self.leader = Role.LEADER, self.id
        last = self.log.last_index()
        for peer in sorted(self.membership.members | {self.id}):
            self.progress[peer] = Progress(next=last + 1)
        me = self.progress[self.id]
        me.match, me.state = self.log.stable_last_index(), ProgressState.REPLICATE
        self._info("became leader", last_index=last)
        # A no-op of the new term lets earlier entries commit (§3.6.2).
        self._leader_append(EntryKind.NOOP, b"")

    def _campaign(self, pre_vote: bool, transfer: bool = False) -> None:
        if pre_vote:
            self._become_pre_candidate()
        else:
            self._become_candidate()
        term = self.term + 1 if pre_vote else self.term
        self._votes[self.id] = True
        if self._tally():
            return
        last_index, last_term = self.log.last_index(), self.log.last_term()
        for voter in sorted(self.membership.voters - {self.id}):
            self._send(
                RequestVote(
                    to=voter,
                    frm=self.id,
                    term=term,
                    last_index=last_index,
                    last_term=last_term,
                    pre_vote=pre_vote,
                    transfer=transfer,
                )
            )

    def _tally(self) -> bool:
        """Act on the election result; True when the election is over."""
        result = vote_result(self._votes, self.membership.voters)
        if result is VoteResult.PENDING:
            return False
        if result is VoteResult.LOST:
            self._info("election lost", role=self.role.value)
            self._become_follower(self.term, None)
        elif self.role is Role.PRE_CANDIDATE:
            self._campaign(pre_vote=False)
        else:
            self._become_leader()
        return True

    def _follow(self, leader: str) -> bool:
        """A message from ``leader`` of our term arrived; recognize it.

        False when the message was dropped (it came from a second leader
        outside our configuration)."""
        if self.role is Role.LEADER:
            self._violation_or_drop(
                leader, f"raft: two leaders in term {self.term}: {self.id} and {leader}"
            )
            return False
        if self.role is not Role.FOLLOWER:
            self._become_follower(self.term, leader)
        elif self.leader != leader:
            self._fail_forwarded_reads()
            self.leader = leader
            self._info("leader found", leader=leader)
        self.election_elapsed = 0
        return True

    # ------------------------------------------------------------------
    # Term rules (§3.3)
    # ------------------------------------------------------------------

    def _in_lease(self) -> bool:
        return (
            self.cfg.check_quorum
            and self.leader is not None
            and self.election_elapsed < self.cfg.election_ticks
        )

    def _on_higher_term(self, msg: Message) -> bool:
        """Adopt ``msg.term`` if appropriate; False when the message is ignored."""
        if isinstance(msg, RequestVote):
            if self._in_lease() and not msg.transfer:
                self._debug("ignore vote request: leader lease", peer=msg.frm)
                return False
            if msg.pre_vote:
                return True
        elif isinstance(msg, RequestVoteResp) and msg.pre_vote and msg.granted:
            return True
        known = isinstance(msg, AppendEntries | InstallSnapshot | TimeoutNow)
        self._info("higher term seen", peer=msg.frm, new_term=msg.term)
        self._become_follower(msg.term, msg.frm if known else None)
        return True

    def _on_lower_term(self, msg: Message) -> None:
        if isinstance(msg, AppendEntries | InstallSnapshot):
            # Tell a stale leader about the newer term so it steps down.
            self._send(
                AppendEntriesResp(
                    to=msg.frm, frm=self.id, term=self.term, success=False
                )
            )
        elif isinstance(msg, RequestVote) and msg.pre_vote:
            self._send(
                RequestVoteResp(
                    to=msg.frm,
                    frm=self.id,
                    term=self.term,
                    granted=False,
                    pre_vote=True,
                )
            )
        else:
            self._debug("drop stale message", peer=msg.frm, msg_term=msg.term)

    # ------------------------------------------------------------------
    # Elections (§3.4, §9.6)
    # ------------------------------------------------------------------

    def _handle_request_vote(self, m: RequestVote) -> None:
        can_vote = (
            self.vote == m.frm
            or (self.vote is None and self.leader is None)
            or (m.pre_vote and m.term > self.term)
        )
        mine = (self.log.last_term(), self.log.last_index())
        granted = can_vote and (m.last_term, m.last_index) >= mine
        if granted and not m.pre_vote:
            self.vote = m.frm
            self.election_elapsed = 0
        kind = "pre-vote" if m.pre_vote else "vote"
        self._info(
            f"{kind} {'granted' if granted else 'rejected'}",
            peer=m.frm,
            for_term=m.term,
        )
        term = m.term if granted and m.pre_vote else self.term
        self._send(
            RequestVoteResp(
                to=m.frm, frm=self.id, term=term, granted=granted, pre_vote=m.pre_vote
            )
        )

    def _handle_vote_resp(self, m: RequestVoteResp) -> None:
        expected = Role.PRE_CANDIDATE if m.pre_vote else Role.CANDIDATE
        if self.role is not expected:
            self._debug("drop vote response", peer=m.frm, role=self.role.value)
            return
        self._votes[m.frm] = m.granted
        self._tally()

    def _handle_timeout_now(self, m: TimeoutNow) -> None:
        if not self._promotable():
            self._debug("ignore timeout-now: not a voter", peer=m.frm)
            return
        self._info("timeout-now received; campaigning", peer=m.frm)
        self._campaign(pre_vote=False, transfer=True)

    # ------------------------------------------------------------------
    # Log replication, follower side (§3.5)
    # ------------------------------------------------------------------

    def _handle_append_entries(self, m: AppendEntries) -> None:
        prev_index, prev_term, entries = m.prev_index, m.prev_term, m.entries
        if prev_index < self.commit:
            # Entries up to our commit are already known to match (§3.6.3).
            skip = self.commit - prev_index
            if skip >= len(entries):
                if self._follow(m.frm):
                    self._ack_append(m, self.commit)
                return
            prev_index, prev_term = self.commit, entries[skip - 1].term
            entries = entries[skip:]
            if not self.log.matches(prev_index, prev_term):
                # Checked before _follow, so a stranger never becomes our
                # leader on the way to being dropped.
                self._violation_or_drop(
                    m.frm,
                    f"raft: committed entry {prev_index} has term "
                    f"{self.log.term(prev_index)}, leader says {prev_term}",
                )
                return
        if not self._follow(m.frm):
            return
        if not self.log.matches(prev_index, prev_term):
            self._reject_append(m, prev_index)
            return
        if not self._append_new(entries, m.frm):
            return
        last_new = prev_index + len(entries)
        if min(m.commit, last_new) > self.commit:
            self.commit = min(m.commit, last_new)
        self._ack_append(m, last_new)

    def _append_new(self, entries: tuple[Entry, ...], sender: str) -> bool:
        """Append the part of ``entries`` we lack, truncating a conflict (§3.5).

        False when they contradict our committed log (from a non-member)."""
        for i, entry in enumerate(entries):
            if self.log.term(entry.index) == entry.term:
                continue
            if entry.index <= self.commit:
                self._violation_or_drop(
                    sender,
                    f"raft: conflict at committed index {entry.index} "
                    f"(commit {self.commit}, term {entry.term})",
                )
                return False
            self._log_append(list(entries[i:]))
            break
        return True

    def _ack_append(self, m: AppendEntries, match: int) -> None:
        self._send(
            AppendEntriesResp(
                to=m.frm,
                frm=self.id,
                term=self.term,
                success=True,
                match_index=match,
                seq=m.seq,
            )
        )

    def _reject_append(self, m: AppendEntries, prev_index: int) -> None:
        last = self.log.last_index()
        if prev_index > last:
            conflict_term, conflict_index = 0, last + 1
        else:
            conflict_term = self.log.term(prev_index) or 0
            conflict_index = prev_index
            # Skip back over the whole conflicting term (fast backtracking).
            # Limitation: one store read per index of that term.
            while (
                conflict_index - 1 > self.commit
                and self.log.term(conflict_index - 1) == conflict_term
            ):
                conflict_index -= 1
        self._debug("reject append", peer=m.frm, prev_index=prev_index)
        self._send(
            AppendEntriesResp(
                to=m.frm,
                frm=self.id,
                term=self.term,
                success=False,
                reject_index=prev_index,
                conflict_term=conflict_term,
                conflict_index=conflict_index,
                seq=m.seq,
            )
        )

    def _log_append(self, entries: list[Entry]) -> None:
        """Append to the log and keep the configuration list in step (§4.1)."""
        first = entries[0].index
        self.log.append(entries)
        changed = False
        while len(self._configs) > 1 and self._configs[-1][0] >= first:
            self._configs.pop()
            changed = True
        for entry in entries:
            if entry.kind is EntryKind.CONFIG:
                self._configs.append((entry.index, decode_config_entry(entry.data)))
                changed = True
        if changed:
            self._on_membership_change()

    def _scan_configs(self) -> None:
        """Rebuild the configuration list from the persisted log (restart)."""
        # Limitation: restart reads the whole uncompacted log once to find
        # CONFIG entries; a long uncompacted log slows start-up accordingly.
        lo, hi = self.log.first_index(), self.log.last_index() + 1
        while lo < hi:
            batch = self.log.entries(lo, hi, 1 << 22)
            for entry in batch:
                if entry.kind is EntryKind.CONFIG:
                    self._configs.append((entry.index, decode_config_entry(entry.data)))
            lo = batch[-1].index + 1

    def _on_membership_change(self) -> None:
        m = self.membership
        self._info(
            "configuration changed",
            voters=sorted(m.voters),
            learners=sorted(m.learners),
        )
        if self.role is not Role.LEADER:
            return
        last = self.log.last_index()
        for peer in sorted(m.members - self.progress.keys()):
            self.progress[peer] = Progress(next=last + 1)
        for peer in self.progress.keys() - m.members - {self.id}:
            del self.progress[peer]
        if self._transfer_target not in m.voters:
            self._transfer_target = None

    # ------------------------------------------------------------------
    # Snapshots, follower side (§5.3)
    # ------------------------------------------------------------------

    def _handle_install_snapshot(self, m: InstallSnapshot) -> None:
        if not self._follow(m.frm):
            return
        if m.snap_index <= self.commit or self.log.matches(m.snap_index, m.snap_term):
            # We hold the snapshot's last entry already: keep the log (and any
            # entries we acknowledged after it) and only learn that it is
            # committed (§5.3); a snapshot covers committed entries only.
            self.commit = max(self.commit, m.snap_index)
            self._send(
                AppendEntriesResp(
                    to=m.frm,
                    frm=self.id,
                    term=self.term,
                    success=True,
                    match_index=self.commit,
                )
            )
            return
        key = (m.snap_index, m.snap_term)
        if m.offset == 0:
            self._snap_buf = (key, bytearray())
        buf = self._snap_buf
        if buf is None or buf[0] != key or m.offset != len(buf[1]):
            have = len(buf[1]) if buf is not None and buf[0] == key else 0
            self._snapshot_progress(m, have)
            return
        # Limitation: chunks are buffered in memory until the last one; a
        # restart loses a partial transfer, which then starts over at 0.
        buf[1].extend(m.data)
        if not m.done:
            self._snapshot_progress(m, len(buf[1]))
            return
        membership = Membership(frozenset(m.voters), frozenset(m.learners))
        meta = SnapshotMeta(m.snap_index, m.snap_term, membership)
        self._install_snapshot(Snapshot(meta, bytes(buf[1])))
        self._send(
            AppendEntriesResp(
                to=m.frm,
                frm=self.id,
                term=self.term,
                success=True,
                match_index=m.snap_index,
            )
        )

    def _snapshot_progress(self, m: InstallSnapshot, have: int) -> None:
        self._send(
            InstallSnapshotResp(
                to=m.frm,
                frm=self.id,
                term=self.term,
                snap_index=m.snap_index,
                next_offset=have,
            )
        )

    def _install_snapshot(self, snap: Snapshot) -> None:
        meta = snap.meta
        self._info("installing snapshot", index=meta.index, snap_term=meta.term)
        self.log.restore(meta)
        self._snapshot = self._install = snap
        self._compacted = None  # an older local snapshot must not overwrite it
        self._snap_buf = None
        self.commit = meta.index
        before = self.membership
        self._configs = [(meta.index, meta.membership)]
        if meta.membership != before:
            self._on_membership_change()

    # ------------------------------------------------------------------
    # Log replication, leader side (§3.5, §10.2.2)
    # ------------------------------------------------------------------

    def _check_can_propose(self) -> None:
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader)
        if self._transfer_target is not None:
            raise TransferInProgress(
                f"raft: transferring leadership to {self._transfer_target}"
            )

    def _leader_append(self, kind: EntryKind, data: bytes) -> tuple[int, int]:
        entry = Entry(self.log.last_index() + 1, self.term, kind, data)
        self._log_append([entry])
        self._bcast = True
        return entry.index, entry.term

    def _peers(self) -> list[str]:
        return [p for p in self.progress if p != self.id]

    def _replicate(self, peer: str) -> None:
        """Send as much as the peer's window allows."""
        pr = self.progress[peer]
        while not pr.is_paused(self.cfg.max_inflight) and self._send_append(peer, pr):
            pass

    def _send_append(self, peer: str, pr: Progress, empty_ok: bool = False) -> bool:
        """Send one AppendEntries from ``pr.next``; True if more may follow."""
        prev = pr.next - 1
        prev_term = self.log.term(prev)
        if prev_term is None:
            self._start_snapshot(peer, pr)
            return False
        last = self.log.last_index()
        if pr.next > last and not empty_ok:
            return False
        entries: list[Entry] = []
        if pr.next <= last:
            hi = min(last + 1, pr.next + self.cfg.max_msg_entries)
            entries = self.log.entries(pr.next, hi, self.cfg.max_msg_bytes)
        self._send(
            AppendEntries(
                to=peer,
                frm=self.id,
                term=self.term,
                prev_index=prev,
                prev_term=prev_term,
                entries=tuple(entries),
                commit=self.commit,
                seq=self._seq,
            )
        )
        if pr.state is ProgressState.PROBE:
            pr.paused = True
            return False
        if not entries:
            return False
        pr.next = entries[-1].index + 1
        pr.inflight.append(entries[-1].index)
        return pr.next <= last

    def _heartbeat(self, peer: str) -> None:
        pr = self.progress[peer]
        if pr.state is ProgressState.SNAPSHOT:
            self._send_snapshot_chunk(peer, pr)  # also retransmits a lost chunk
        elif pr.state is ProgressState.PROBE:
            pr.paused = False
            self._send_append(peer, pr, empty_ok=True)
        else:
            # An empty append at next-1: answered at once if nothing is
            # missing, rejected (so we fall back to probing) if a message
            # of the window was lost.  Limitation: a window message that is
            # only delayed also causes a rejection and a resend.
            prev_term = self.log.term(pr.next - 1)
            if prev_term is None:
                self._start_snapshot(peer, pr)
                return
            self._send(
                AppendEntries(
                    to=peer,
                    frm=self.id,
                    term=self.term,
                    prev_index=pr.next - 1,
                    prev_term=prev_term,
                    commit=self.commit,
                    seq=self._seq,
                )
            )

    def _broadcast_heartbeat(self) -> None:
        for peer in self._peers():
            self._heartbeat(peer)

    def _handle_append_resp(self, m: AppendEntriesResp) -> None:
        pr = self._active_progress(m)
        if pr is None:
            return
        if m.seq > pr.acked_seq:
            pr.acked_seq = m.seq
            self._confirm_reads()
        if m.success:
            self._append_accepted(m.frm, pr, m.match_index)
        else:
            self._append_rejected(m.frm, pr, m)

    def _active_progress(self, m: Message) -> Progress | None:
        pr = self.progress.get(m.frm) if self.role is Role.LEADER else None
        if pr is None:
            self._debug("drop response", peer=m.frm, role=self.role.value)
            return None
        pr.recent_active = True
        return pr

    def _append_accepted(self, peer: str, pr: Progress, index: int) -> None:
        if index > self.log.last_index():
            raise InvariantViolation(
                f"raft: {peer} acked index {index} beyond leader last "
                f"{self.log.last_index()} in term {self.term}"
            )
        advanced = pr.ack(index)
        if pr.state is ProgressState.PROBE or (
            pr.state is ProgressState.SNAPSHOT and pr.match >= pr.snap_index
        ):
            pr.become_replicate()
        if advanced:
            self._maybe_commit()
        if self.role is not Role.LEADER:
            return  # stepped down after committing its own removal
        if peer == self._transfer_target:
            self._maybe_send_timeout_now(peer)
        self._replicate(peer)

    def _append_rejected(self, peer: str, pr: Progress, m: AppendEntriesResp) -> None:
        stale = (
            pr.state is ProgressState.SNAPSHOT
            or m.reject_index <= pr.match
            or (pr.state is ProgressState.PROBE and m.reject_index != pr.next - 1)
        )
        if stale:
            self._debug("ignore stale rejection", peer=peer, index=m.reject_index)
            return
        pr.become_probe(min(self._next_from_hint(m), m.reject_index))
        self._replicate(peer)

    def _next_from_hint(self, m: AppendEntriesResp) -> int:
        """Where to retry after a rejection, skipping whole terms (§5.3 hint)."""
        if m.conflict_term == 0:
            return m.conflict_index
        index = min(m.reject_index, self.log.last_index())
        while index > self.log.snap_index and (
            (self.log.term(index) or 0) > m.conflict_term
        ):
            index -= 1
        if index > self.log.snap_index and self.log.term(index) == m.conflict_term:
            return index + 1
        return m.conflict_index

    def _maybe_commit(self) -> bool:
        """Advance commit to what a majority stores, if of this term (§3.6.2)."""
        match = {peer: pr.match for peer, pr in self.progress.items()}
        index = committed_index(match, self.membership.voters)
        if index <= self.commit or self.log.term(index) != self.term:
            return False
        self.commit = index
        self._bcast = True  # tell followers soon (they learn it from appends)
        reads, self._reads_need_commit = self._reads_need_commit, []
        for read in reads:
            self._start_read(read)
        if self.id not in self.membership.voters and self._configs[-1][0] <= index:
            # Limitation: it steps down without handing over, so the cluster
            # waits one election timeout for the next leader.
            self._info("removed from configuration; stepping down")
            self._become_follower(self.term, None)
        return True

    def _maybe_send_timeout_now(self, target: str) -> None:
        pr = self.progress[target]
        if pr.match == self.log.last_index():
            self._info("target caught up; sending timeout-now", peer=target)
            self._send(TimeoutNow(to=target, frm=self.id, term=self.term))
        else:
            self._replicate(target)

    # ------------------------------------------------------------------
    # Snapshots, leader side (§5.3)
    # ------------------------------------------------------------------

    def _start_snapshot(self, peer: str, pr: Progress) -> None:
        if self._snapshot is None:
            raise InvariantViolation(
                f"raft: {peer} needs index {pr.next} below first "
                f"{self.log.first_index()} but there is no snapshot"
            )
        self._info("sending snapshot", peer=peer, index=self._snapshot.meta.index)
        pr.become_snapshot(self._snapshot.meta.index)
        self._send_snapshot_chunk(peer, pr)

    def _send_snapshot_chunk(self, peer: str, pr: Progress) -> None:
        # Limitation: one chunk in flight per follower, so a snapshot takes
        # size / snapshot_chunk_bytes round trips (a lost chunk waits for
        # the next heartbeat).
        snap = self._snapshot
        assert snap is not None
        if pr.snap_index != snap.meta.index:
            pr.become_snapshot(snap.meta.index)  # compacted again meanwhile
        start = pr.snap_offset
        chunk = snap.data[start : start + self.cfg.snapshot_chunk_bytes]
        meta = snap.meta
        self._send(
            InstallSnapshot(
                to=peer,
                frm=self.id,
                term=self.term,
                snap_index=meta.index,
                snap_term=meta.term,
                voters=tuple(sorted(meta.membership.voters)),
                learners=tuple(sorted(meta.membership.learners)),
                offset=start,
                data=chunk,
                done=start + len(chunk) >= len(snap.data),
            )
        )

    def _handle_snapshot_resp(self, m: InstallSnapshotResp) -> None:
        pr = self._active_progress(m)
        if pr is None:
            return
        if pr.state is ProgressState.SNAPSHOT and m.snap_index == pr.snap_index:
            pr.snap_offset = m.next_offset
            self._send_snapshot_chunk(m.frm, pr)

    # ------------------------------------------------------------------
    # Linearizable reads (§6.4)
    # ------------------------------------------------------------------

    def _leader_read(self, ctx: bytes, requester: str) -> None:
        # Limitation: no lease reads; every batch of reads costs one
        # heartbeat round to a majority.
        read = _Read(ctx, requester)
        if self.log.term(self.commit) != self.term:
            # The commit index is not known to be current until the no-op of
            # this term commits.
            self._reads_need_commit.append(read)
        else:
            self._start_read(read)

    def _start_read(self, read: _Read) -> None:
        read.index, read.seq = self.commit, self._seq + 1
        self._seq_due = True
        self._reads_pending.append(read)
        self._confirm_reads()

    def _confirm_reads(self) -> None:
        while self._reads_pending:
            read = self._reads_pending[0]
            acked = {
                p: p == self.id or pr.acked_seq >= read.seq
                for p, pr in self.progress.items()
            }
            if vote_result(acked, self.membership.voters) is not VoteResult.WON:
                return
            self._reads_pending.pop(0)
            if read.requester == self.id:
                self._reads_ready.append(ReadState(read.ctx, read.index))
            else:
                self._send(
                    ReadIndexResp(
                        to=read.requester,
                        frm=self.id,
                        term=self.term,
                        ctx=read.ctx,
                        index=read.index,
                    )
                )

    def _handle_read_index(self, m: ReadIndex) -> None:
        if self.role is Role.LEADER:
            self._leader_read(m.ctx, m.frm)
        else:
            self._debug("refuse read index: not leader", peer=m.frm)
            self._send(
                ReadIndexResp(
                    to=m.frm, frm=self.id, term=self.term, ctx=m.ctx, ok=False
                )
            )

    def _handle_read_index_resp(self, m: ReadIndexResp) -> None:
        if m.ctx not in self._forwarded:
            self._debug("drop unknown read index response", peer=m.frm)
            return
        self._forwarded.discard(m.ctx)
        if m.ok:
            self._reads_ready.append(ReadState(m.ctx, m.index))
        else:
            self._failed_reads.append(m.ctx)

    def _fail_reads(self) -> None:
        """Give back every read not yet confirmed; leadership is gone or moved."""
        for read in self._reads_need_commit + self._reads_pending:
            if read.requester == self.id:
                self._failed_reads.append(read.ctx)
            else:
                self._send(
                    ReadIndexResp(
                        to=read.requester,
                        frm=self.id,
                        term=self.term,
                        ctx=read.ctx,
                        ok=False,
                    )
                )
        self._reads_need_commit, self._reads_pending = [], []
        self._fail_forwarded_reads()

    def _fail_forwarded_reads(self) -> None:
        # Limitation: a forwarded read whose request or answer is lost stays
        # pending until the leader changes; the driver must time it out.
        self._failed_reads.extend(sorted(self._forwarded))
        self._forwarded.clear()

    # ------------------------------------------------------------------

    def _send(self, msg: Message) -> None:
        self._msgs.append(msg)
