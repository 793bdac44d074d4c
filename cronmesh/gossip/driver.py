"""asyncio driver of the SWIM core: the only gossip code with sockets.

Theory of operation. :class:`GossipDriver` owns one UDP endpoint and one
TCP server, both on the bind address and port, and one
:class:`~cronmesh.gossip.core.GossipCore`. Every input (a datagram, an
inbound stream, the outcome of a TCP exchange, a timer expiry, an API call)
is handed to the core with the current monotonic time in milliseconds, and
the :class:`~cronmesh.gossip.outputs.Batch` it returns is carried out at
once: datagrams are sent, TCP exchanges (push-pull state sync and the
fallback ping) are started as tasks whose outcome goes back through
``tcp_result``, member events are handed to the registered callbacks. A
single timer task sleeps until ``core.next_deadline_ms()`` and is woken
early whenever an input moves that deadline forward. Everything runs on
one event loop, so the core is never entered concurrently.

Wire framing on TCP (ours, not memberlist's): one exchange per connection;
the opener sends ``u32 length (big endian) + stream payload``, the other
side answers with one frame of the same shape (or closes without answering
when it cannot decode the request). Payloads are built and sealed by the
codec, so encryption needs nothing here beyond passing the keyring on.

Malformed input of any kind (garbage datagrams, wrong-key packets,
oversized or truncated frames) is dropped and counted in :attr:`stats`;
the driver never raises out of a protocol callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cronmesh.errors import TransportError, ValidationError
from cronmesh.gossip.codec import decode_stream
from cronmesh.gossip.config import GossipConfig
from cronmesh.gossip.config import profile as profile_config
from cronmesh.gossip.core import GossipCore
from cronmesh.gossip.keyring import DecodeError, Keyring
from cronmesh.gossip.messages import MemberState, PushPull
from cronmesh.gossip.outputs import (
    Batch,
    Member,
    OutPacket,
    PingRequest,
    PushPullRequest,
    TcpRequest,
)
from cronmesh.gossip.tags import encode_tags

__all__ = [
    "MAX_STREAM_BYTES",
    "PUSH_ON_CHANGE_FANOUT",
    "STATUS_NAMES",
    "DriverStats",
    "EventHandler",
    "GossipDriver",
    "MemberInfo",
    "parse_address",
]

logger = logging.getLogger("cronmesh.gossip")

# Largest TCP frame we read; a push-pull record is at most ~780 bytes, so
# this holds the state of about 10 000 members.
# Limitation: a bigger cluster's push-pull is refused (dropped and counted).
MAX_STREAM_BYTES = 8 * 1024 * 1024
# Members we push our state to after changing our tags or leaving.
PUSH_ON_CHANGE_FANOUT = 16
# Inbound TCP exchanges served at once; further connections are closed.
_MAX_INBOUND_STREAMS = 64
# Limitation: our own TCP framing (u32 length), as the codec is our own;
# memberlist/serf peers cannot talk to us at the gossip layer.
_FRAME = struct.Struct(">I")

# Serf's status names for the core's member states.
STATUS_NAMES: dict[MemberState, str] = {
    MemberState.ALIVE: "alive",
    MemberState.SUSPECT: "suspect",
    MemberState.DEAD: "failed",
    MemberState.LEFT: "left",
}


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """One member as the application sees it."""

    name: str
    addr: str
    port: int
    tags: dict[str, str]
    status: str  # alive, suspect, failed or left
    incarnation: int

    @classmethod
    def from_member(cls, member: Member) -> MemberInfo:
        return cls(
            member.name,
            member.host,
            member.port,
            member.tags,
            STATUS_NAMES[member.state],
            member.incarnation,
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (the tags dict is copied)."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class DriverStats:
    """Counters since start, for metrics; a snapshot from :attr:`stats`."""

    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: int = 0  # undecodable/wrong-key packets and streams, bad frames
    send_errors: int = 0
    streams_in: int = 0  # inbound TCP exchanges handled
    streams_out: int = 0  # outbound TCP exchanges answered
    stream_failures: int = 0  # outbound TCP exchanges that got no answer
    probes: int = 0
    probe_failures: int = 0
    suspicions: int = 0
    refutes: int = 0
    health_score: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class _Counters:
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped: int = 0
    send_errors: int = 0
    streams_in: int = 0
    streams_out: int = 0
    stream_failures: int = 0


EventHandler = Callable[[str, MemberInfo], Awaitable[None] | None]


class _FrameError(Exception):
    """A TCP frame announced more than :data:`MAX_STREAM_BYTES`."""


def parse_address(
    text: str, default_port: int, *, allow_zero: bool = False
) -> tuple[str, int]:
    """Split ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``.

    Raises:
        ValidationError: empty host, or a port outside 1..65535 (0..65535
            with ``allow_zero``, for bind addresses).
    """
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValidationError(f"bad address {text!r}: missing ']'", "address")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValidationError(f"bad address {text!r}", "address")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise ValidationError(f"bad address {text!r}: empty host", "address")
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ValidationError(f"bad port in address {text!r}", "address") from None
    if not (0 if allow_zero else 1) <= port < 65536:
        raise ValidationError(f"port out of range in address {text!r}", "address")
    return host, port


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _family(host: str) -> int:
    """AF_INET or AF_INET6 for an IP literal, 0 for anything else."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        return family
    return 0


def _is_ip(host: str) -> bool:
    return _family(host) != 0


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = _FRAME.unpack(await reader.readexactly(_FRAME.size))
    if size > MAX_STREAM_BYTES:
        raise _FrameError(f"frame of {size} bytes is over {MAX_STREAM_BYTES}")
    return await reader.readexactly(size)


def _frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload)) + payload


_STREAM_ERRORS = (OSError, TimeoutError, asyncio.IncompleteReadError, _FrameError)


_KEY_HINT = (
    "check that every agent uses the same gossip key (--encrypt, keyring.json), or none"
)


def _stream_failure(exc: BaseException, sent: bool) -> str:
    """Words for a failed stream exchange; a peer that took our request and
    hung up without a word could most likely not decrypt it."""
    if isinstance(exc, asyncio.IncompleteReadError) and sent and not exc.partial:
        return (
            "it accepted the connection but closed it without answering, "
            f"as a member does with a message it cannot decrypt; {_KEY_HINT}"
        )
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return f"{type(exc).__name__}: {exc}"


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, driver: GossipDriver) -> None:
        self._driver = driver

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._driver._on_datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (e.g. port unreachable after a peer died) land here.
        self._driver._on_udp_error(exc)


class GossipDriver:
    """Runs one gossip member on asyncio; embed with start/stop/callbacks.

    ``bind`` is where the UDP and TCP sockets listen (port 0 picks a free
    one); ``advertise`` is the address peers are told to use, by default
    the bind address. ``profile`` names a timing profile (``lan``, ``wan``,
    ``local``); ``config`` overrides it with explicit numbers. Event
    callbacks get ``(kind, member)`` with kind one of ``join``, ``update``,
    ``leave``, ``failed``, ``reap``; a callback may be a coroutine function
    (its coroutine runs as a task). No events are reported about ourselves.
    """

    def __init__(
        self,
        name: str,
        bind: tuple[str, int],
        advertise: tuple[str, int] | None = None,
        tags: Mapping[str, str] | None = None,
        profile: str = "lan",
        keyring: Keyring | None = None,
        rng: random.Random | None = None,
        *,
        config: GossipConfig | None = None,
        on_event: EventHandler | None = None,
    ) -> None:
        """Check the arguments; nothing is opened until :meth:`start`.

        Raises:
            ValidationError: unknown profile, bad config, tags over 512
                bytes, or a wildcard bind address without ``advertise``.
        """
        self.name = name
        self.config = (config or profile_config(profile)).validate()
        self.keyring = keyring
        self._bind = (bind[0], int(bind[1]))
        self._advertise = advertise
        if advertise is None and _is_wildcard(self._bind[0]):
            # Limitation: no interface scan for a private address as
            # memberlist does; a wildcard bind needs an explicit advertise.
            raise ValidationError(
                "an advertise address is required with a wildcard bind address",
                "advertise",
            )
        self._tags = dict(tags or {})
        encode_tags(self._tags)  # validate early
        self._rng = rng if rng is not None else random.Random()
        self._handlers: list[EventHandler] = [on_event] if on_event else []
        self._core: GossipCore | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._timer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._sleep_until = 0
        self._last_ms = 0
        self._inbound = 0
        self._closing = False
        self._bound: tuple[str, int] | None = None
        # Why the last stream to (host, port) failed, and why each address
        # of the last join() failed (for the operator: a wrong key shows).
        self._stream_errors: dict[tuple[str, int], str] = {}
        self.join_errors: dict[str, str] = {}
        self._family = 0
        self._counters = _Counters()

    # --- lifecycle ------------------------------------------------------

    async def start(self) -> None:
        """Open the UDP endpoint and the TCP server, start the timer.

        Raises:
            TransportError: the address cannot be bound (or resolved).
            ValidationError: started twice.
        """
        if self._core is not None or self._closing:
            raise ValidationError("gossip driver already started", "driver")
        loop = asyncio.get_running_loop()
        host, port = self._bind
        attempts = 5 if port == 0 else 1
        for attempt in range(attempts):
            try:
                await self._open_sockets(host, port)
                break
            except OSError as exc:
                if attempt + 1 == attempts:
                    raise TransportError(
                        f"cannot bind gossip to {host}:{port}: {exc}"
                    ) from exc
        assert self._bound is not None
        adv_host, adv_port = self._advertise or self._bound
        if adv_port == 0:
            adv_port = self._bound[1]
        if not _is_ip(adv_host):
            try:
                infos = await loop.getaddrinfo(
                    adv_host, adv_port, family=self._family, type=socket.SOCK_DGRAM
                )
            except OSError as exc:
                await self._close_sockets()
                raise TransportError(f"cannot resolve {adv_host}: {exc}") from exc
            adv_host = str(infos[0][4][0])
        self._core = GossipCore(
            self.name,
            adv_host,
            adv_port,
            config=self.config,
            rng=self._rng,
            tags=self._tags,
            keyring=self.keyring,
            now_ms=self._now(),
        )
        self._timer = asyncio.create_task(self._run_timer(), name="gossip-timer")
        logger.info(
            "gossip started node=%s bind=%s:%d advertise=%s:%d encrypted=%s",
            self.name,
            *self._bound,
            adv_host,
            adv_port,
            self.keyring is not None,
        )

    async def _open_sockets(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(host, port)
        )
        actual = int(transport.get_extra_info("sockname")[1])
        try:
            server = await asyncio.start_server(
                self._serve_stream, host, actual, reuse_address=True
            )
        except OSError:
            transport.close()
            raise
        self._udp, self._server = transport, server
        self._bound = (host, actual)
        # Our sockets speak one address family; resolve names to it only.
        self._family = int(transport.get_extra_info("socket").family)

    async def _close_sockets(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        if self._udp is not None:
            self._udp.close()

    async def stop(self) -> None:
        """Close everything at once (call :meth:`leave` first to say bye)."""
        if self._closing:
            return
        self._closing = True
        tasks = [t for t in (self._timer, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        await self._close_sockets()
        logger.info("gossip stopped node=%s", self.name)

    async def leave(self, timeout: float = 5.0) -> None:
        """Leave gracefully and wait (up to ``timeout`` s) for the news to
        spread; keeps answering pings until :meth:`stop`.

        The "left" message is gossiped by the core; on top of that we
        push our state (which says "left") to up to
        :data:`PUSH_ON_CHANGE_FANOUT` members, and wait until those
        exchanges ended and the broadcast was sent its full count.
        """
        core = self._require_core()
        if self._closing:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._apply(core.leave(self._now()))
        tasks = self._push_state()
        self._wake.set()
        if tasks:
            await asyncio.wait(tasks, timeout=max(deadline - loop.time(), 0))
        step = self.config.gossip_interval_ms / 1000
        while tasks and not core.leave_done and loop.time() < deadline:
            await asyncio.sleep(min(step, max(deadline - loop.time(), 0)))
        pushed = sum(
            1
            for t in tasks
            if t.done() and not t.cancelled() and t.exception() is None and t.result()
        )
        logger.info(
            "gossip left node=%s told=%d of %d broadcast_done=%s",
            self.name,
            pushed,
            len(tasks),
            core.leave_done,
        )

    def _push_state(self) -> list[asyncio.Task[bool]]:
        """Push-pull with up to PUSH_ON_CHANGE_FANOUT random live members.

        Not in memberlist/serf: with few members the transmit limit is
        small (2 in the ``local`` profile below 10 members) and an update
        then misses a member about one time in seven, which only the next
        periodic push-pull (15 s in ``local``) repairs. A direct push after
        our own rare changes (join, tags, leave) makes them reach everyone
        in one round trip.
        """
        core = self._core
        if core is None or self._closing:
            return []
        live = (MemberState.ALIVE, MemberState.SUSPECT)
        peers = [
            (m.host, m.port)
            for m in core.members()
            if m.name != self.name and m.state in live
        ]
        # Limitation: beyond the fanout, larger clusters rely on gossip and
        # the periodic push-pull for the rest.
        if len(peers) > PUSH_ON_CHANGE_FANOUT:
            peers = self._rng.sample(peers, PUSH_ON_CHANGE_FANOUT)
        if not peers:
            return []
        return self._apply(core.join(self._now(), peers))

    # --- API ------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._core is not None and not self._closing

    @property
    def bound_address(self) -> tuple[str, int] | None:
        """Where the sockets listen (the real port when bind port was 0)."""
        return self._bound

    @property
    def core(self) -> GossipCore | None:
        """The core, for read-only queries (None before start)."""
        return self._core

    def add_event_handler(self, handler: EventHandler) -> None:
        self._handlers.append(handler)

    def remove_event_handler(self, handler: EventHandler) -> None:
        self._handlers.remove(handler)

    def members(self) -> list[MemberInfo]:
        """Every known member (ourselves too, failed and left ones until
        reaped), by name; empty before :meth:`start`."""
        if self._core is None:
            return []
        infos = [MemberInfo.from_member(m) for m in self._core.members()]
        return sorted(infos, key=lambda m: m.name)

    def local_member(self) -> MemberInfo | None:
        if self._core is None:
            return None
        return MemberInfo.from_member(self._core.local_member)

    @property
    def tags(self) -> dict[str, str]:
        return dict(self._tags)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Replace our tags; the change is gossiped and pushed right away
        (see :meth:`_push_state`).

        Raises:
            ValidationError: tags over 512 bytes encoded, or we left.
        """
        new = dict(tags)
        if self._core is None:
            encode_tags(new)
        else:
            self._apply(self._core.set_tags(self._now(), new))
            self._push_state()
            self._wake.set()
        self._tags = new

    @property
    def stats(self) -> DriverStats:
        c = self._counters
        core = self._core
        core_stats = core.stats if core is not None else None
        return DriverStats(
            packets_in=c.packets_in,
            packets_out=c.packets_out,
            bytes_in=c.bytes_in,
            bytes_out=c.bytes_out,
            dropped=c.dropped + (core_stats.dropped_packets if core_stats else 0),
            send_errors=c.send_errors,
            streams_in=c.streams_in,
            streams_out=c.streams_out,
            stream_failures=c.stream_failures,
            probes=core_stats.probes if core_stats else 0,
            probe_failures=core_stats.probes_failed if core_stats else 0,
            suspicions=core_stats.suspicions if core_stats else 0,
            refutes=core_stats.refutes if core_stats else 0,
            health_score=core.health_score if core is not None else 0,
        )

    async def join(self, addresses: Sequence[str]) -> int:
        """Push-pull with each address (``host[:port]``, port defaulting to
        ours); return how many answered. Host names are resolved now; each
        resolved IP is tried in turn until one answers. After a success our
        state is also pushed to the members just learned (see
        :meth:`_push_state`)."""
        self._require_core()
        self.join_errors = {}
        results = await asyncio.gather(*(self._join_one(a) for a in addresses))
        joined = sum(results)
        if joined:
            # Tell everyone we just learned about, not only the seeds.
            self._push_state()
        logger.info(
            "gossip join node=%s answered=%d of %d", self.name, joined, len(addresses)
        )
        return joined

    async def retry_join(
        self, addresses: Sequence[str], interval: float = 30.0, max_attempts: int = 0
    ) -> int:
        """:meth:`join` until at least one address answers, ``interval``
        seconds apart; ``max_attempts`` 0 means forever.

        Raises:
            ValidationError: no addresses.
            TransportError: ``max_attempts`` joins all failed; names them.
        """
        if not addresses:
            raise ValidationError("retry-join needs at least one address", "join")
        attempt = 0
        while True:
            attempt += 1
            joined = await self.join(addresses)
            if joined:
                return joined
            if max_attempts and attempt >= max_attempts:
                raise TransportError(
                    f"could not join the gossip cluster after {attempt} attempts: "
                    f"{self.join_failure(addresses)}"
                )
            logger.warning(
                "gossip join failed node=%s attempt=%d (%s); retrying in %gs",
                self.name,
                attempt,
                self.join_failure(addresses),
                interval,
            )
            await asyncio.sleep(interval)

    def join_failure(self, addresses: Sequence[str]) -> str:
        """Why the last :meth:`join` of ``addresses`` failed, per address."""
        return "; ".join(self.join_errors.get(a, f"{a}: no answer") for a in addresses)

    # --- internals: time and batches ----------------------------------------

    def _now(self) -> int:
        now = max(time.monotonic_ns() // 1_000_000, self._last_ms)
        self._last_ms = now
        return now

    def _require_core(self) -> GossipCore:
        if self._core is None:
            raise ValidationError("gossip driver is not started", "driver")
        return self._core

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _apply(self, batch: Batch) -> list[asyncio.Task[bool]]:
        """Carry out a batch (packets, TCP requests, events); return the
        tasks of its TCP requests, which resolve to "the peer answered"."""
        if self._closing:
            return []
        for packet in batch.packets:
            self._send(packet)
        started = [self._spawn(self._tcp_request(r)) for r in batch.tcp_requests]
        for event in batch.events:
            self._deliver(event.kind.value, MemberInfo.from_member(event.member))
        core = self._core
        if core is not None and core.next_deadline_ms() < self._sleep_until:
            self._wake.set()
        return started

    def _send(self, packet: OutPacket) -> None:
        if self._udp is None or self._udp.is_closing():
            return
        if not _is_ip(packet.host):
            # A peer advertised a name: sendto would resolve it blocking.
            self._counters.send_errors += 1
            return
        try:
            self._udp.sendto(packet.data, (packet.host, packet.port))
        except (OSError, ValueError) as exc:
            self._counters.send_errors += 1
            logger.debug("send failed node=%s to=%s: %s", self.name, packet.host, exc)
            return
        self._counters.packets_out += 1
        self._counters.bytes_out += len(packet.data)

    def _deliver(self, kind: str, member: MemberInfo) -> None:
        # Limitation: sync handlers run inline on the loop; a slow one
        # delays acks and can get us suspected. Offload heavy work.
        for handler in list(self._handlers):
            try:
                result = handler(kind, member)
                if inspect.isawaitable(result):
                    self._spawn(_await(result))
            except Exception:
                logger.exception("gossip event handler failed kind=%s", kind)

    async def _run_timer(self) -> None:
        core = self._require_core()
        while not self._closing:
            self._wake.clear()
            try:
                self._apply(core.tick(self._now()))
            except Exception:  # a core bug must not stop failure detection
                logger.exception("gossip tick failed node=%s", self.name)
            self._sleep_until = core.next_deadline_ms()
            # At least 1 ms: a deadline that stays in the past must not spin.
            delay = max(self._sleep_until - self._now(), 1) / 1000
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a
            # cancel that races with the wake-up, and stop() would hang.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    # --- internals: UDP ---------------------------------------------------

    def _on_datagram(self, data: bytes, src: tuple[str, int]) -> None:
        # Limitation: no per-source rate limit; a flood costs one decode (and
        # an AES-GCM attempt per installed key) per datagram.
        core = self._core
        if core is None or self._closing:
            return
        self._counters.packets_in += 1
        self._counters.bytes_in += len(data)
        try:
            batch = core.receive_packet(self._now(), data, src)
        except Exception:  # only DecodeError is expected, and the core eats it
            self._counters.dropped += 1
            logger.exception("gossip packet crashed the core node=%s", self.name)
            return
        self._apply(batch)

    def _on_udp_error(self, exc: Exception) -> None:
        self._counters.send_errors += 1
        logger.debug("udp error node=%s: %s", self.name, exc)

    # --- internals: TCP -----------------------------------------------------

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        src = (str(peer[0]), int(peer[1])) if peer else None
        self._inbound += 1
        try:
            core = self._core
            if core is None or self._closing or self._inbound > _MAX_INBOUND_STREAMS:
                self._counters.dropped += 1
                logger.debug("stream refused node=%s peer=%s", self.name, src)
                return
            timeout = self.config.tcp_timeout_ms / 1000
            try:
                async with asyncio.timeout(timeout):
                    data = await _read_frame(reader)
            except _STREAM_ERRORS as exc:
                self._counters.dropped += 1
                logger.debug("dropped stream node=%s peer=%s: %r", self.name, src, exc)
                return
            self._counters.streams_in += 1
            batch = core.receive_stream(self._now(), data, src)
            self._apply(batch)
            if batch.reply is not None:
                with contextlib.suppress(*_STREAM_ERRORS):
                    async with asyncio.timeout(timeout):
                        writer.write(_frame(batch.reply))
                        await writer.drain()
        except Exception:
            self._counters.dropped += 1
            logger.exception("gossip stream crashed node=%s peer=%s", self.name, src)
        finally:
            self._inbound -= 1
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _tcp_request(self, request: TcpRequest) -> bool:
        """Run one exchange the core asked for and report it back."""
        core = self._require_core()
        if isinstance(request, PingRequest):
            timeout_ms = request.deadline_ms - self._now()
        else:
            timeout_ms = self.config.tcp_timeout_ms
        reply = None
        if timeout_ms > 0:
            reply = await self._exchange(
                request.host, request.port, request.payload, timeout_ms / 1000
            )
        now = self._now()
        if isinstance(request, PingRequest) and now > request.deadline_ms:
            reply = None  # too late to count as an ack
        if self._closing:
            return False
        answered = reply is not None
        if answered and isinstance(request, PushPullRequest):
            answered = self._is_state(reply, (request.host, request.port))
        self._apply(core.tcp_result(now, request.request_id, reply))
        return answered

    def _is_state(self, reply: bytes | None, peer: tuple[str, int]) -> bool:
        if reply is None:
            return False
        try:
            return isinstance(decode_stream(reply, self.keyring), PushPull)
        except DecodeError as exc:
            self._stream_errors[peer] = (
                f"it answered with data that could not be decrypted or read "
                f"({exc}); {_KEY_HINT}"
            )
            return False

    async def _exchange(
        self, host: str, port: int, payload: bytes, timeout: float
    ) -> bytes | None:
        """Send one frame, read one frame; None on any failure."""
        local = None
        if self._bound is not None and not _is_wildcard(self._bound[0]):
            local = (self._bound[0], 0)
        writer: asyncio.StreamWriter | None = None
        sent = False
        self._stream_errors.pop((host, port), None)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, local_addr=local
                )
                writer.write(_frame(payload))
                await writer.drain()
                sent = True
                reply = await _read_frame(reader)
        except _STREAM_ERRORS as exc:
            self._counters.stream_failures += 1
            self._stream_errors[(host, port)] = _stream_failure(exc, sent)
            logger.debug(
                "stream to %s:%d failed node=%s: %r", host, port, self.name, exc
            )
            return None
        finally:
            if writer is not None:
                writer.close()
        self._counters.streams_out += 1
        return reply

    async def _join_one(self, address: str) -> bool:
        core = self._require_core()
        default_port = self._bound[1] if self._bound else 0
        try:
            host, port = parse_address(address, default_port)
        except ValidationError as exc:
            logger.warning("gossip join node=%s: %s", self.name, exc)
            return False
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                host, port, family=self._family, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            logger.warning(
                "gossip join node=%s cannot resolve %s: %s", self.name, host, exc
            )
            return False
        ips = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for ip in ips:
            if self._closing:
                return False
            tasks = self._apply(core.join(self._now(), [(ip, port)]))
            if any(await asyncio.gather(*tasks)):
                self.join_errors.pop(address, None)
                return True
            reason = self._stream_errors.get((ip, port), "no answer")
            self.join_errors[address] = f"{ip}:{port}: {reason}"
        logger.debug("gossip join node=%s no answer from %s", self.name, address)
        return False


async def _await(awaitable: Awaitable[Any]) -> None:
    try:
        await awaitable
    except Exception:
        logger.exception("gossip event handler failed")
