"""The SWIM membership core: every member transition lives in this file.

Theory of operation. The core is a plain object driven by inputs; each
input returns one :class:`~cronmesh.gossip.outputs.Batch` and the core
never sleeps, reads a clock, draws from a global RNG or touches a socket.
Time arrives as ``now_ms`` (driver's monotonic milliseconds) on every input;
``next_deadline_ms`` says when ``tick`` has something to do.

* Failure detection (SWIM section 4.3 "Round-Robin Probe Target
  Selection"; Lifeguard IV.A). Once per probe interval we ping the next
  member of a shuffled list (reshuffled each round; newcomers inserted at
  random positions). No ack within the probe timeout: ``indirect_checks``
  random members ping the target for us (SWIM 3.1) and send a nack if it
  stays silent, and the driver is asked for a TCP ping. No ack by the end
  of the interval: we suspect the target. Missed acks and missing nacks
  raise our local health score, any ack lowers it; the score stretches how
  long a probe may go unanswered before we suspect (memberlist's reading
  of Lifeguard: answered probes keep the plain interval).
* Suspicion (SWIM 4.2; Lifeguard IV.B). A suspect member gets a timer from
  ``suspicion.py`` that shrinks with independent confirmations; when it
  fires the member is declared dead. Every message carries the member's
  incarnation: a member that hears it is suspected (or declared dead while
  it is running) refutes by bumping its incarnation and broadcasting alive,
  which overrides anything said at a lower incarnation.
* Dissemination (SWIM 4.1). Alive/suspect/dead messages are queued in a
  transmit-limited broadcast queue and piggy-backed on every packet we
  send, plus a gossip round to ``gossip_nodes`` random members per gossip
  interval. A periodic push-pull full-state exchange over TCP (memberlist's
  anti-entropy), also done on join, repairs what gossip missed.
* Serf's layer on top: graceful leave (a dead message sent by the node about
  itself gives state ``left``), periodic reconnect attempts (a push-pull)
  towards failed members, and reaping of failed/left members after
  ``reconnect_timeout_ms`` / ``tombstone_timeout_ms``.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence

from cronmesh.errors import InvariantViolation, ValidationError
from cronmesh.gossip.awareness import Awareness
from cronmesh.gossip.broadcast import BroadcastQueue, retransmit_limit
from cronmesh.gossip.codec import (
    MAX_MESSAGES_PER_PACKET,
    DecodeError,
    decode_packet,
    decode_stream,
    encode_message,
    encode_packet,
    encode_stream,
    packet_overhead,
)
from cronmesh.gossip.config import GossipConfig
from cronmesh.gossip.keyring import Keyring
from cronmesh.gossip.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    MemberRecord,
    MemberState,
    Message,
    Nack,
    Ping,
    PushPull,
    Suspect,
)
from cronmesh.gossip.outputs import (
    Batch,
    EventKind,
    GossipStats,
    Member,
    MemberEvent,
    OutPacket,
    PingRequest,
    PushPullRequest,
)
from cronmesh.gossip.suspicion import (
    Suspicion,
    expected_confirmations,
    suspicion_timeout_ms,
)
from cronmesh.gossip.tags import encode_tags

__all__ = ["GossipCore"]

logger = logging.getLogger("cronmesh.gossip")

_ALIVE, _SUSPECT = MemberState.ALIVE, MemberState.SUSPECT
_DEAD, _LEFT = MemberState.DEAD, MemberState.LEFT
_GONE = (_DEAD, _LEFT)
_U32_MAX = 0xFFFFFFFF
# memberlist starts scaling the push-pull interval above this many members.
_PUSH_PULL_SCALE_THRESHOLD = 32


class _Node:
    """Mutable per-member state; only this module changes it."""

    __slots__ = (
        "host",
        "incarnation",
        "meta",
        "name",
        "port",
        "state",
        "state_change_ms",
    )

    def __init__(
        self, name: str, host: str, port: int, incarnation: int, meta: bytes, now: int
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.incarnation = incarnation
        self.meta = meta
        self.state = _ALIVE
        self.state_change_ms = now

    def snapshot(self) -> Member:
        return Member(
            self.name,
            self.host,
            self.port,
            self.incarnation,
            self.meta,
            self.state,
            self.state_change_ms,
        )

    def record(self) -> MemberRecord:
        return MemberRecord(
            self.name, self.host, self.port, self.incarnation, self.state, self.meta
        )


class _Probe:
    """The probe in flight (at most one per member, SWIM 3.1)."""

    __slots__ = (
        "ack_deadline_ms",
        "end_ms",
        "expected_nacks",
        "indirect",
        "nacks",
        "seq",
        "target",
    )

    def __init__(
        self, seq: int, target: str, ack_deadline_ms: int, end_ms: int
    ) -> None:
        self.seq = seq
        self.target = target
        self.ack_deadline_ms = ack_deadline_ms  # direct ack expected by then
        self.end_ms = end_ms  # end of the protocol period: suspect after
        self.indirect = False  # indirect probes and TCP ping already sent
        self.expected_nacks = 0
        self.nacks = 0


class _Relay:
    """An indirect probe we run on behalf of another member."""

    __slots__ = ("expires_ms", "host", "nack_at_ms", "port", "seq")

    def __init__(
        self, host: str, port: int, seq: int, nack_at_ms: int | None, expires_ms: int
    ) -> None:
        self.host = host
        self.port = port
        self.seq = seq  # the requester's sequence number
        self.nack_at_ms = nack_at_ms  # None once sent or when not wanted
        self.expires_ms = expires_ms


class GossipCore:
    """One member's SWIM/Lifeguard state machine (sans I/O).

    Call order: build it, call ``join`` with seed addresses (or nothing for
    the first member), then feed ``tick``, ``receive_packet``,
    ``receive_stream`` and ``tcp_result`` as things happen, and call ``tick``
    no later than ``next_deadline_ms()``. Each call returns a batch that
    the driver must carry out (see ``outputs.py``). ``leave`` starts a
    graceful leave; keep ticking until ``leave_done`` (or a timeout).
    """

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        *,
        config: GossipConfig,
        rng: random.Random,
        tags: Mapping[str, str] | None = None,
        keyring: Keyring | None = None,
        now_ms: int = 0,
    ) -> None:
        """Create the local member, alive at incarnation 1.

        Raises:
            ValidationError: bad config, a name/host over 255 bytes, a port
                outside 0..65535 or tags over 512 bytes encoded.
        """
        self.config = config.validate()
        _check_identity(name, host, port)
        self.name = name
        self.keyring = keyring
        self.stats = GossipStats()
        self._rng = rng
        self._now = now_ms
        self._out = Batch()
        self._self = _Node(name, host, port, 1, encode_tags(tags or {}), now_ms)
        self._nodes: dict[str, _Node] = {name: self._self}
        self._names: list[str] = [name]  # for O(1) random picks
        self._live = 1  # members neither dead nor left, ourselves included
        self._probe_order: list[str] = []
        self._probe_index = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._suspicions: dict[str, Suspicion] = {}
        self._pending: dict[int, tuple[int, int | None]] = {}  # id -> (expiry, seq)
        self._broadcasts = BroadcastQueue()
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._seq = 0
        self._request_id = 0
        self._leaving = False
        self._src: tuple[str, int] | None = None  # sender of the packet at hand
        self._joins: set[int] = set()  # request ids of our own join push-pulls
        self._merging_join = False  # merging the answer to one of them
        self._start_timers(now_ms)
        self._broadcast(name, self._alive_message())

    def _start_timers(self, now: int) -> None:
        # Random phases keep members from probing and gossiping in lockstep.
        cfg, rng = self.config, self._rng
        self._next_probe_ms = now + rng.randrange(cfg.probe_interval_ms)
        self._next_gossip_ms = now + rng.randrange(cfg.gossip_interval_ms)
        push_pull = cfg.push_pull_interval_ms
        self._next_push_pull_ms = now + rng.randrange(max(push_pull, 1))
        self._next_reconnect_ms = now + cfg.reconnect_interval_ms
        self._next_reap_ms = now + cfg.reap_interval_ms

    # --- queries --------------------------------------------------------

    @property
    def local_member(self) -> Member:
        """Our own entry."""
        return self._self.snapshot()

    @property
    def health_score(self) -> int:
        """Lifeguard local health score, 0 (healthy) .. max multiplier - 1."""
        return self._awareness.score

    @property
    def leave_done(self) -> bool:
        """True once ``leave`` ran and its broadcast was fully transmitted."""
        return self._leaving and self.name not in self._broadcasts

    @property
    def probe_target(self) -> str | None:
        """The member our probe in flight is about (None: no probe)."""
        return self._probe.target if self._probe is not None else None

    @property
    def pending_broadcasts(self) -> int:
        """Updates still waiting to be piggy-backed."""
        return len(self._broadcasts)

    def members(self) -> list[Member]:
        """Every known member, ourselves included, dead and left ones too."""
        return [node.snapshot() for node in self._nodes.values()]

    def member(self, name: str) -> Member | None:
        """One member by name, or None if unknown (or reaped)."""
        node = self._nodes.get(name)
        return node.snapshot() if node is not None else None

    def state_of(self, name: str) -> MemberState | None:
        """A member's state without building a snapshot (None: unknown)."""
        node = self._nodes.get(name)
        return node.state if node is not None else None

    def next_deadline_ms(self) -> int:
        """Earliest driver time at which ``tick`` has work to do."""
        probe = self._probe
        if probe is None:
            due = self._next_probe_ms
        else:
            # A stretched probe outlasts ``_next_probe_ms``; the next one
            # starts when this one ends, so only its own deadline counts.
            due = probe.end_ms if probe.indirect else probe.ack_deadline_ms
        due = min(due, self._next_reconnect_ms, self._next_reap_ms)
        if self.config.push_pull_interval_ms:
            due = min(due, self._next_push_pull_ms)
        if self._broadcasts:
            # Not memberlist's fixed ticker: news queued after a quiet spell
            # (``_next_gossip_ms`` in the past) goes out at once, and only
            # the rounds after it are spaced by the gossip interval. That
            # spreads a suspicion or death one hop per datagram latency
            # instead of up to one interval per hop, for one extra round.
            due = min(due, max(self._next_gossip_ms, self._now))
        for relay in self._relays.values():
            due = min(due, relay.nack_at_ms or relay.expires_ms)
        for timer in self._suspicions.values():
            due = min(due, timer.deadline_ms)
        return due

    # --- inputs ---------------------------------------------------------

    def tick(self, now_ms: int) -> Batch:
        """Run every timer that is due at ``now_ms``."""
        self._begin(now_ms)
        self._tick_probe()
        self._tick_relays()
        self._tick_suspicions()
        self._tick_gossip()
        self._tick_push_pull()
        self._tick_reconnect()
        self._tick_reap()
        return self._finish()

    def receive_packet(
        self, now_ms: int, data: bytes, src: tuple[str, int] | None = None
    ) -> Batch:
        """Handle one UDP datagram; undecodable ones are counted and dropped.

        ``src`` is the datagram's source address: it appears in log lines
        and receives stale-rumour corrections. Acks go to the address the
        sender wrote into its ping.
        """
        self._begin(now_ms)
        self.stats.packets_received += 1
        self.stats.bytes_received += len(data)
        try:
            messages = decode_packet(data, self.keyring)
        except DecodeError as exc:
            self._drop("packet", src, exc)
            return self._finish()
        self._src = src
        try:
            for msg in messages:
                self._dispatch(msg)
        finally:
            self._src = None
        return self._finish()

    def receive_stream(
        self, now_ms: int, data: bytes, src: tuple[str, int] | None = None
    ) -> Batch:
        """Handle a stream a peer opened; ``batch.reply`` is the answer.

        A push-pull is merged and answered with our state; a TCP ping is
        answered with an ack. Anything else gets no reply.
        """
        self._begin(now_ms)
        try:
            msg = decode_stream(data, self.keyring)
        except DecodeError as exc:
            self._drop("stream", src, exc)
            return self._finish()
        if isinstance(msg, PushPull):
            self._merge_state(msg)
            reply: Message = self._local_state(join=False)
        elif isinstance(msg, Ping) and msg.target == self.name:
            reply = Ack(msg.seq)
        else:
            self._drop("stream", src, DecodeError(f"unexpected {type(msg).__name__}"))
            return self._finish()
        self._out.reply = encode_stream(reply, self.keyring)
        return self._finish()

    def tcp_result(self, now_ms: int, request_id: int, reply: bytes | None) -> Batch:
        """Report how a ``tcp_requests`` entry went (``None``: it failed)."""
        self._begin(now_ms)
        entry = self._pending.pop(request_id, None)
        joining = request_id in self._joins
        self._joins.discard(request_id)
        if entry is None or reply is None:
            return self._finish()
        try:
            msg = decode_stream(reply, self.keyring)
        except DecodeError as exc:
            self._drop("stream reply", None, exc)
            return self._finish()
        seq = entry[1]
        if seq is not None and isinstance(msg, Ack) and msg.seq == seq:
            self._handle_ack(msg)
        elif seq is None and isinstance(msg, PushPull):
            self._merging_join = joining
            try:
                self._merge_state(msg)
            finally:
                self._merging_join = False
        return self._finish()

    def join(self, now_ms: int, seeds: Sequence[tuple[str, int]]) -> Batch:
        """Ask the driver to push-pull with each seed ``(host, port)``."""
        self._begin(now_ms)
        for host, port in seeds:
            self._request_push_pull(host, port, join=True)
        return self._finish()

    def leave(self, now_ms: int) -> Batch:
        """Leave gracefully: broadcast "left" about ourselves and stop probing.

        The left message goes out at once to ``gossip_nodes`` members and
        keeps riding on gossip; ``leave_done`` turns true when it has been
        sent the full transmit limit.
        """
        self._begin(now_ms)
        if not self._leaving:
            self._leaving = True
            self._probe = None
            me = self._self
            self._handle_dead(Dead(me.incarnation, me.name, me.name))
            self._gossip()
        return self._finish()

    def set_tags(self, now_ms: int, tags: Mapping[str, str]) -> Batch:
        """Replace our tags, bump our incarnation and broadcast alive.

        Raises:
            ValidationError: the tags encode to more than 512 bytes (state
                untouched), or we already left.
        """
        meta = encode_tags(tags)
        if self._leaving:
            raise ValidationError("cannot change tags after leaving", "tags")
        self._begin(now_ms)
        self._bump_incarnation(self._self.incarnation + 1)
        self._self.meta = meta
        self._broadcast(self.name, self._alive_message())
        return self._finish()

    # --- batch plumbing -------------------------------------------------

    def _begin(self, now_ms: int) -> None:
        if now_ms < self._now:
            raise InvariantViolation(
                f"gossip time went backwards: {now_ms} ms after {self._now} ms"
            )
        self._now = now_ms
        self._out = Batch()

    def _finish(self) -> Batch:
        out, self._out = self._out, Batch()
        return out

    def _drop(self, what: str, src: tuple[str, int] | None, exc: Exception) -> None:
        self.stats.dropped_packets += 1
        logger.debug("dropped %s node=%s peer=%s reason=%s", what, self.name, src, exc)

    def _emit(self, kind: EventKind, node: _Node) -> None:
        self._out.events.append(MemberEvent(kind, node.snapshot()))

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & _U32_MAX
        return self._seq

    # --- sending --------------------------------------------------------

    def _send(self, host: str, port: int, *msgs: Message) -> None:
        """Send ``msgs`` in one datagram, filling the rest with broadcasts."""
        frames = [encode_message(msg) for msg in msgs]
        used = packet_overhead(self.keyring) + sum(len(f) for f in frames)
        frames += self._broadcasts.take(
            self.config.udp_budget - used,
            self._retransmit_limit(),
            MAX_MESSAGES_PER_PACKET - len(frames),
        )
        self._emit_packet(host, port, frames)

    def _emit_packet(self, host: str, port: int, frames: list[bytes]) -> None:
        data = encode_packet(frames, self.keyring)
        self.stats.packets_sent += 1
        self.stats.bytes_sent += len(data)
        self._out.packets.append(OutPacket(host, port, data))

    def _broadcast(self, about: str, msg: Message) -> None:
        self._broadcasts.queue(about, encode_message(msg))

    def _request_push_pull(self, host: str, port: int, join: bool) -> None:
        request_id = self._new_request(None)
        if join:
            self._joins.add(request_id)
        payload = encode_stream(self._local_state(join), self.keyring)
        self._out.tcp_requests.append(
            PushPullRequest(request_id, host, port, payload, join)
        )

    def _new_request(self, seq: int | None) -> int:
        self._request_id += 1
        expiry = self._now + 2 * self.config.tcp_timeout_ms
        self._pending[self._request_id] = (expiry, seq)
        return self._request_id

    def _alive_message(self) -> Alive:
        me = self._self
        return Alive(me.incarnation, me.name, me.host, me.port, me.meta)

    def _local_state(self, join: bool) -> PushPull:
        return PushPull(join, tuple(node.record() for node in self._nodes.values()))

    # --- helpers --------------------------------------------------------

    def _live_count(self) -> int:
        """Members not dead or left, ourselves included (memberlist's n)."""
        # Limitation: memberlist also counts recently dead members, so after
        # a mass failure our suspicion timeouts are a little shorter.
        return self._live

    def _set_state(self, node: _Node, state: MemberState) -> None:
        """Change a member's state and stamp the time (the only place)."""
        self._live += (state not in _GONE) - (node.state not in _GONE)
        node.state, node.state_change_ms = state, self._now

    def _retransmit_limit(self) -> int:
        return retransmit_limit(self.config.retransmit_mult, self._live_count())

    def _random_nodes(self, k: int, accept: Callable[[_Node], bool]) -> list[_Node]:
        """Up to ``k`` distinct random members passing ``accept``.

        Like memberlist's kRandomNodes: 3n random draws, so small clusters
        are searched exhaustively in practice and big ones stay cheap.
        """
        names, picked = self._names, []
        seen: set[str] = set()
        for _ in range(3 * len(names)):
            name = names[self._rng.randrange(len(names))]
            node = self._nodes[name]
            if name not in seen and accept(node):
                picked.append(node)
                if len(picked) >= k:
                    break
            seen.add(name)
        return picked

    def _bump_incarnation(self, incarnation: int) -> None:
        if incarnation > _U32_MAX:
            raise InvariantViolation(f"incarnation {incarnation} overflows u32")
        self._self.incarnation = incarnation

    # --- timers ---------------------------------------------------------

    def _tick_probe(self) -> None:
        probe, now = self._probe, self._now
        if probe is not None and not probe.indirect and now >= probe.ack_deadline_ms:
            self._probe_indirect(probe)
        if probe is not None and now >= probe.end_ms:
            self._probe_failed(probe)
        if self._probe is None and now >= self._next_probe_ms:
            self._probe_start()

    def _probe_start(self) -> None:
        """Ping the next member of the round (SWIM 4.3)."""
        cfg, now = self.config, self._now
        # memberlist's probe ticker runs at the plain interval: an answered
        # probe is followed by the next one a period after it started.
        self._next_probe_ms = now + cfg.probe_interval_ms
        target = None if self._leaving else self._next_probe_target()
        if target is None:
            return
        seq = self._next_seq()
        # Lifeguard IV.A as memberlist does it: the health multiplier
        # stretches only how long a probe may take before we suspect (which
        # also holds back the next probe); the direct-ack timeout stays put,
        # as waiting longer does not help a datagram through.
        end = now + self._awareness.scale(cfg.probe_interval_ms)
        self._probe = _Probe(seq, target.name, now + cfg.probe_timeout_ms, end)
        self.stats.probes += 1
        me = self._self
        ping = Ping(seq, target.name, me.name, *_at(me))
        if target.state == _SUSPECT:
            # Lifeguard IV.C "buddy system": tell a suspect it is suspected,
            # so it can refute even if the gossip missed it.
            suspect = Suspect(target.incarnation, target.name, me.name)
            self._send(target.host, target.port, ping, suspect)
        else:
            self._send(target.host, target.port, ping)

    def _next_probe_target(self) -> _Node | None:
        for _ in range(len(self._probe_order) + 1):
            if self._probe_index >= len(self._probe_order):
                self._reshuffle()
                if not self._probe_order:
                    return None
            name = self._probe_order[self._probe_index]
            self._probe_index += 1
            node = self._nodes.get(name)
            if node is not None and node.state in (_ALIVE, _SUSPECT):
                return node
        return None

    def _reshuffle(self) -> None:
        order = [name for name in self._nodes if name != self.name]
        self._rng.shuffle(order)
        self._probe_order, self._probe_index = order, 0

    def _probe_indirect(self, probe: _Probe) -> None:
        """Missed the direct ack: ask k peers and the driver (SWIM 3.1)."""
        probe.indirect = True
        target = self._nodes.get(probe.target)
        if target is None:
            return
        me, cfg = self._self, self.config
        peers = self._random_nodes(
            cfg.indirect_checks,
            lambda n: n.state == _ALIVE and n is not me and n is not target,
        )
        req = IndirectPing(
            probe.seq, target.name, *_at(target), True, me.name, *_at(me)
        )
        for peer in peers:
            self._send(peer.host, peer.port, req)
        probe.expected_nacks = len(peers)
        if cfg.tcp_fallback_ping:
            payload = encode_stream(
                Ping(probe.seq, target.name, me.name, *_at(me)), self.keyring
            )
            request_id = self._new_request(probe.seq)
            self._out.tcp_requests.append(
                PingRequest(request_id, *_at(target), payload, probe.end_ms)
            )

    def _probe_failed(self, probe: _Probe) -> None:
        """No ack in the whole period: raise awareness, suspect the target."""
        self._probe = None
        self.stats.probes_failed += 1
        # Lifeguard IV.A: with nack-capable helpers only *missing* nacks
        # count against us (they show our own messages are being lost).
        if probe.expected_nacks > 0:
            delta = max(probe.expected_nacks - probe.nacks, 0)
        else:
            delta = 1
        self._awareness.apply_delta(delta)
        node = self._nodes.get(probe.target)
        if node is None or node.state not in (_ALIVE, _SUSPECT):
            return
        suspect = Suspect(node.incarnation, node.name, self.name)
        self._handle_suspect(suspect)
        # Also tell the suspect directly (our extension of the buddy system):
        # gossip alone can miss it while few members know it, e.g. just
        # after it joined, and then nobody refutes in time.
        self._send(node.host, node.port, suspect)

    def _tick_relays(self) -> None:
        now = self._now
        for seq, relay in list(self._relays.items()):
            if relay.nack_at_ms is not None and now >= relay.nack_at_ms:
                relay.nack_at_ms = None
                self._send(relay.host, relay.port, Nack(relay.seq))
            if now >= relay.expires_ms:
                del self._relays[seq]

    def _tick_suspicions(self) -> None:
        now = self._now
        due = [n for n, s in self._suspicions.items() if now >= s.deadline_ms]
        for name in due:
            timer = self._suspicions.pop(name)
            node = self._nodes[name]
            logger.info(
                "suspect timeout node=%s peer=%s confirmations=%d",
                self.name,
                name,
                timer.confirmations,
            )
            self._handle_dead(Dead(node.incarnation, name, self.name))

    def _tick_gossip(self) -> None:
        if self._now < self._next_gossip_ms:
            return
        interval = self.config.gossip_interval_ms
        behind = (self._now - self._next_gossip_ms) // interval + 1
        self._next_gossip_ms += behind * interval
        if self._broadcasts:
            self._gossip()

    def _gossip(self) -> None:
        """Send queued broadcasts to a few random members (SWIM 4.1)."""
        cfg, now, me = self.config, self._now, self._self

        def reachable(node: _Node) -> bool:
            if node is me or node.state == _LEFT:
                return False
            if node.state == _DEAD:
                return now - node.state_change_ms <= cfg.gossip_to_the_dead_ms
            return True

        room = cfg.udp_budget - packet_overhead(self.keyring)
        for node in self._random_nodes(cfg.gossip_nodes, reachable):
            frames = self._broadcasts.take(
                room, self._retransmit_limit(), MAX_MESSAGES_PER_PACKET
            )
            if not frames:
                break
            self._emit_packet(node.host, node.port, frames)

    def _tick_push_pull(self) -> None:
        cfg = self.config
        if not cfg.push_pull_interval_ms or self._now < self._next_push_pull_ms:
            return
        n = self._live_count()
        self._next_push_pull_ms = self._now + _push_pull_scale(
            cfg.push_pull_interval_ms, n
        )
        if self._leaving:
            return
        me = self._self
        peers = self._random_nodes(1, lambda n: n.state == _ALIVE and n is not me)
        for peer in peers:
            self._request_push_pull(peer.host, peer.port, join=False)

    def _tick_reconnect(self) -> None:
        """Serf's reconnect: push-pull with a random failed member, with a
        probability of failed/alive so big outages do not flood the net."""
        if self._now < self._next_reconnect_ms:
            return
        self._next_reconnect_ms = self._now + self.config.reconnect_interval_ms
        failed = [n for n in self._nodes.values() if n.state == _DEAD]
        if not failed or self._leaving:
            return
        alive = max(self._live_count(), 1)
        if self._rng.random() > len(failed) / alive:
            return
        node = failed[self._rng.randrange(len(failed))]
        self._request_push_pull(node.host, node.port, join=True)

    def _tick_reap(self) -> None:
        if self._now < self._next_reap_ms:
            return
        cfg, now = self.config, self._now
        self._next_reap_ms = now + cfg.reap_interval_ms
        self._pending = {i: e for i, e in self._pending.items() if e[0] > now}
        self._joins &= self._pending.keys()
        for node in [n for n in self._nodes.values() if n.state in _GONE]:
            keep = cfg.reconnect_timeout_ms
            if node.state == _LEFT:
                keep = cfg.tombstone_timeout_ms
            if node is not self._self and now - node.state_change_ms > keep:
                self._reap(node)

    def _reap(self, node: _Node) -> None:
        del self._nodes[node.name]
        self._names.remove(node.name)
        logger.info("member reaped node=%s peer=%s", self.name, node.name)
        self._emit(EventKind.REAP, node)

    # --- message handlers -------------------------------------------------

    def _dispatch(self, msg: Message) -> None:
        handler = self._handlers.get(type(msg))
        if handler is None:
            logger.debug("ignored %s node=%s", type(msg).__name__, self.name)
            return
        handler(self, msg)

    def _handle_ping(self, msg: Ping) -> None:
        if msg.target != self.name:
            logger.debug("ping for %s ignored node=%s", msg.target, self.name)
            return
        self._send(msg.host, msg.port, Ack(msg.seq))

    def _handle_indirect_ping(self, msg: IndirectPing) -> None:
        """Probe ``msg.target`` for the requester; forward ack or nack."""
        cfg, me, now = self.config, self._self, self._now
        seq = self._next_seq()
        # Nack at 80% of the probe timeout so it reaches the requester
        # before its probe period ends. memberlist waits the whole timeout,
        # so its nacks race the end of the period and, when late, count
        # against the requester's health.
        nack_at = now + cfg.probe_timeout_ms * 8 // 10 if msg.nack else None
        self._relays[seq] = _Relay(
            msg.host, msg.port, msg.seq, nack_at, now + cfg.probe_timeout_ms
        )
        ping = Ping(seq, msg.target, me.name, *_at(me))
        self._send(msg.target_host, msg.target_port, ping)

    def _handle_ack(self, msg: Ack) -> None:
        probe = self._probe
        if probe is not None and probe.seq == msg.seq:
            # Any answer, direct, relayed or over TCP, counts as a probe that
            # worked and lowers the health score (memberlist's probeNode).
            self._probe = None
            self._awareness.apply_delta(-1)
            return
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            self._send(relay.host, relay.port, Ack(relay.seq))

    def _handle_nack(self, msg: Nack) -> None:
        probe = self._probe
        if probe is not None and probe.seq == msg.seq:
            probe.nacks += 1

    def _handle_alive(self, msg: Alive) -> None:
        if msg.node == self.name:
            self._alive_about_self(msg)
            return
        node = self._nodes.get(msg.node)
        if node is None:
            self._add_member(msg)
            return
        moved = msg.host != node.host or msg.port != node.port
        # Limitation: a dead or left member's name can move to a new address
        # at once (memberlist waits DeadNodeReclaimTime before allowing it).
        if moved and node.state not in _GONE:
            # Two live members claim one name: keep the one we know (the
            # newcomer learns of it when it joins, see _alive_about_self).
            logger.warning(
                "name conflict: %s is claimed by %s:%d and %s:%d; keeping the "
                "member known first node=%s",
                msg.node,
                node.host,
                node.port,
                msg.host,
                msg.port,
                self.name,
            )
            return
        if msg.incarnation <= node.incarnation and not moved:
            if node.state == _LEFT:
                self._correct_stale(node)
            return
        self._revive(node, msg)

    def _add_member(self, msg: Alive) -> None:
        node = _Node(msg.node, msg.host, msg.port, msg.incarnation, msg.meta, self._now)
        self._nodes[node.name] = node
        self._live += 1
        self._names.append(node.name)
        # Random position, so a newcomer is probed within one round (4.3).
        slot = self._rng.randint(self._probe_index, len(self._probe_order))
        self._probe_order.insert(slot, node.name)
        self._broadcast(node.name, msg)
        logger.info("member joined node=%s peer=%s", self.name, node.name)
        self._emit(EventKind.JOIN, node)

    def _revive(self, node: _Node, msg: Alive) -> None:
        """Apply a newer alive message to a known member."""
        self._suspicions.pop(node.name, None)
        self._broadcast(node.name, msg)
        old_state, old_meta, old_addr = node.state, node.meta, (node.host, node.port)
        node.incarnation, node.meta = msg.incarnation, msg.meta
        node.host, node.port = msg.host, msg.port
        if old_state != _ALIVE:
            self._set_state(node, _ALIVE)
        if old_state in _GONE:
            logger.info("member joined node=%s peer=%s", self.name, node.name)
            self._emit(EventKind.JOIN, node)
        elif old_meta != msg.meta or old_addr != (msg.host, msg.port):
            self._emit(EventKind.UPDATE, node)

    def _alive_about_self(self, msg: Alive) -> None:
        me = self._self
        if self._leaving:
            return
        moved = (msg.host, msg.port) != (me.host, me.port)
        if moved and self._merging_join:
            # The mesh we are joining has a live member with our name at
            # another address: we are the newcomer, so we yield (serf asks
            # the members and shuts the loser down; the first one wins here).
            claim = Member(
                msg.node, msg.host, msg.port, msg.incarnation, msg.meta, _ALIVE, 0
            )
            logger.warning(
                "name conflict: a live member named %s is at %s:%d already",
                msg.node,
                msg.host,
                msg.port,
            )
            self._out.events.append(MemberEvent(EventKind.CONFLICT, claim))
            return
        if moved:
            logger.warning(
                "name conflict: %s:%d claims our name %s; keeping ours",
                msg.host,
                msg.port,
                self.name,
            )
        if msg.incarnation < me.incarnation:
            return
        if msg.incarnation == me.incarnation and msg.meta == me.meta and not moved:
            return
        # Someone holds a different or newer claim about us (for example
        # from before a restart): override it.
        self._refute(msg.incarnation)

    def _handle_suspect(self, msg: Suspect) -> None:
        node = self._nodes.get(msg.node)
        if node is None:
            return
        if msg.incarnation < node.incarnation:
            self._correct_stale(node)
            return
        timer = self._suspicions.get(msg.node)
        if timer is not None and msg.incarnation > node.incarnation:
            # SWIM 4.2: a suspicion at a newer incarnation overrides ours.
            # The member refuted what we suspect and we missed its alive;
            # counting this as a confirmation (memberlist does) would keep
            # us at the old incarnation, and our dead message would then be
            # dropped as stale by everyone who heard the refutation. Start
            # over at the new incarnation instead: never sooner, so no new
            # false positive, and our verdict then counts everywhere.
            del self._suspicions[msg.node]
            self._start_suspicion(node, msg)
            return
        if timer is not None:
            # Lifeguard IV.B: an independent confirmation shortens the timer
            # and is worth re-gossiping so others can count it too.
            if timer.confirm(msg.sender):
                self._broadcast(msg.node, msg)
            return
        if node.state != _ALIVE:
            if node.state == _LEFT:
                self._correct_stale(node)
            return
        if node is self._self:
            self._refute(msg.incarnation)
            return
        self._start_suspicion(node, msg)

    def _start_suspicion(self, node: _Node, msg: Suspect) -> None:
        cfg = self.config
        self._broadcast(node.name, msg)
        node.incarnation = msg.incarnation
        self._set_state(node, _SUSPECT)
        n = self._live_count()
        k = expected_confirmations(cfg.suspicion_mult, n)
        low = suspicion_timeout_ms(cfg.suspicion_mult, n, cfg.probe_interval_ms)
        high = cfg.suspicion_max_timeout_mult * low
        self._suspicions[node.name] = Suspicion(msg.sender, k, low, high, self._now)
        self.stats.suspicions += 1
        logger.debug(
            "member suspect node=%s peer=%s by=%s", self.name, msg.node, msg.sender
        )

    def _handle_dead(self, msg: Dead) -> None:
        node = self._nodes.get(msg.node)
        if node is None:
            return
        if msg.incarnation < node.incarnation:
            self._correct_stale(node)
            return
        self._suspicions.pop(msg.node, None)
        if node.state in _GONE:
            return
        if node is self._self and not self._leaving:
            self._refute(msg.incarnation)
            return
        self._broadcast(msg.node, msg)
        node.incarnation = msg.incarnation
        left = msg.sender == msg.node
        self._set_state(node, _LEFT if left else _DEAD)
        if node is self._self:
            return
        verb = "left" if left else "failed"
        logger.info("member %s node=%s peer=%s", verb, self.name, node.name)
        self._emit(EventKind.LEAVE if left else EventKind.FAILED, node)

    def _correct_stale(self, node: _Node) -> None:
        """Answer a stale rumour with the newer news we hold about ``node``.

        Not in SWIM or memberlist: a member that missed a refutation while
        the epidemic ran keeps gossiping the old suspicion and would declare
        a live member dead; one that missed a leave would suspect the
        departed member and report it failed. Whoever receives such a stale
        rumour sends its alive (or left) message straight back to the
        packet's source, so the laggard is corrected within one gossip hop
        instead of at the next push-pull.
        """
        # Limitation: unrate-limited; without encryption a spoofed source
        # can make us send one datagram per stale rumour it forges.
        if self._src is None:
            return
        if node.state == _ALIVE:
            news: Message = Alive(
                node.incarnation, node.name, node.host, node.port, node.meta
            )
        elif node.state == _LEFT:
            news = Dead(node.incarnation, node.name, node.name)
        else:
            return
        self._send(self._src[0], self._src[1], news)

    def _refute(self, accused: int) -> None:
        """Override a suspicion or death claim about ourselves (SWIM 4.2)."""
        if accused >= _U32_MAX:
            # No incarnation can beat it; only a broken or hostile peer
            # sends this, so drop it rather than wrap around.
            self._drop("claim", self._src, DecodeError("incarnation at u32 max"))
            return
        self._bump_incarnation(max(self._self.incarnation, accused) + 1)
        self.stats.refutes += 1
        # Lifeguard IV.A: being suspected hints that we are the slow one.
        self._awareness.apply_delta(1)
        self._broadcast(self.name, self._alive_message())

    def _merge_state(self, state: PushPull) -> None:
        """Fold a peer's full view into ours (memberlist's mergeState).

        A peer's "dead" becomes our "suspect": its view may be stale, and a
        suspicion gives the member the chance to refute.
        """
        for rec in state.members:
            if rec.state == _ALIVE:
                alive = Alive(rec.incarnation, rec.name, rec.host, rec.port, rec.meta)
                self._handle_alive(alive)
            elif rec.state == _LEFT:
                self._handle_dead(Dead(rec.incarnation, rec.name, rec.name))
            else:
                self._handle_suspect(Suspect(rec.incarnation, rec.name, self.name))

    _handlers: dict[type, Callable[[GossipCore, Message], None]] = {
        Ping: _handle_ping,
        IndirectPing: _handle_indirect_ping,
        Ack: _handle_ack,
        Nack: _handle_nack,
        Alive: _handle_alive,
        Suspect: _handle_suspect,
        Dead: _handle_dead,
    }  # type: ignore[dict-item]


def _check_identity(name: str, host: str, port: int) -> None:
    for label, text in (("name", name), ("host", host)):
        if not 0 < len(text.encode()) < 256:
            raise ValidationError(f"gossip {label} must be 1..255 bytes", label)
    if not 0 <= port <= 0xFFFF:
        raise ValidationError("gossip port must be in 0..65535", "port")


def _at(node: _Node) -> tuple[str, int]:
    return node.host, node.port


def _push_pull_scale(interval_ms: int, n: int) -> int:
    """Stretch the push-pull interval for big clusters (memberlist)."""
    if n <= _PUSH_PULL_SCALE_THRESHOLD:
        return interval_ms
    mult = math.ceil(math.log2(n) - math.log2(_PUSH_PULL_SCALE_THRESHOLD)) + 1
    return mult * interval_ms
