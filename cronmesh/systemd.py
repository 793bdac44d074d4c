"""Telling systemd how the agent is doing: sd_notify(3), without libsystemd.

Under a `Type=notify` unit systemd gives the agent NOTIFY_SOCKET, a unix
datagram socket (a path, or an abstract name written with a leading `@`),
and, when the unit sets `WatchdogSec=`, WATCHDOG_USEC (and maybe
WATCHDOG_PID, the process the watchdog is meant for). Each message is one
datagram of newline-separated KEY=VALUE fields:

    READY=1                     start-up done: the HTTP API answers
    RELOADING=1 MONOTONIC_USEC  SIGHUP began a reload (systemd >= 253 wants
                                the CLOCK_MONOTONIC time with it), and
    READY=1                     ... the reload ended, applied or refused
    STOPPING=1                  SIGTERM began the graceful shutdown
    WATCHDOG=1                  every half WatchdogSec
    STATUS=...                  one line that `systemctl status` shows

The watchdog ping is sent by a task of the agent's own event loop, so a
loop that is stuck (a blocking call, a busy loop) stops pinging and systemd
kills the agent; `Restart=on-failure` then starts it again.

The three variables are taken out of the process environment when they are
read, as `sd_notify(unset_environment=1)` does: jobs inherit the agent's
environment, and a job must neither speak to systemd in the agent's name
(NotifyAccess=main would drop it anyway) nor believe a watchdog waits for
it. Nothing else is removed.

Without NOTIFY_SOCKET (not under systemd, or `Type=simple`) every method
does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
from collections.abc import MutableMapping

__all__ = [
    "NOTIFY_VARIABLES",
    "Notifier",
    "Phase",
    "monotonic_usec",
    "notify_address",
    "watchdog_usec_for",
]

log = logging.getLogger("cronmesh.systemd")

# What systemd passes for the notify protocol; removed from the environment.
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Phase(enum.Enum):
    """Where the agent is in the life cycle systemd tracks."""

    STARTING = "starting"  # before READY=1
    READY = "ready"  # serving
    RELOADING = "reloading"  # between RELOADING=1 and the next READY=1
    STOPPING = "stopping"  # after STOPPING=1; nothing may say READY again


def notify_address(text: str) -> str | None:
    """The socket address in NOTIFY_SOCKET, as `sendto` takes it.

    An absolute path is used as is; `@name` is the abstract socket `\\0name`.
    Anything else (systemd >= 254 may pass `vsock:...` inside a VM) is not
    supported and gives None.
    """
    if text.startswith("/"):
        return text
    if text.startswith("@") and len(text) > 1:
        return "\0" + text[1:]
    log.warning("NOTIFY_SOCKET=%r is not supported; not notifying systemd", text)
    return None


def watchdog_usec_for(usec_text: str, pid_text: str, pid: int) -> int:
    """The watchdog interval (microseconds) meant for process `pid`; 0: none.

    Args:
        usec_text: WATCHDOG_USEC ("" when unset).
        pid_text: WATCHDOG_PID ("" when unset: the watchdog is ours).
        pid: this process.
    """
    if not usec_text:
        return 0
    try:
        usec = int(usec_text)
        owner = int(pid_text) if pid_text else pid
    except ValueError:
        log.warning(
            "WATCHDOG_USEC=%r WATCHDOG_PID=%r not understood; no watchdog pings",
            usec_text,
            pid_text,
        )
        return 0
    if owner != pid:
        log.debug("the watchdog is for pid %d, not us (%d)", owner, pid)
        return 0
    return max(usec, 0)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """The agent's side of the notify protocol.

    Call order: `ready` once the agent serves; `reloading`/`reloaded` around
    each reload; `stopping` when the shutdown begins; `close` last. Calls
    that do not fit the phase are ignored, so a SIGHUP during start-up
    cannot send READY=1 early and nothing says READY=1 after STOPPING=1.
    """

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = address
        # Microseconds systemd waits for a ping (0: no watchdog).
        self.watchdog_usec = watchdog_usec if address else 0
        self.phase = Phase.STARTING
        self._sock: socket.socket | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._failing = False  # the last send failed (warn once per streak)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Read and remove NOTIFY_SOCKET and WATCHDOG_* (default: os.environ)."""
        env = os.environ if environ is None else environ
        socket_text, usec_text, pid_text = (
            env.pop(name, "") for name in NOTIFY_VARIABLES
        )
        address = notify_address(socket_text) if socket_text else None
        return cls(address, watchdog_usec_for(usec_text, pid_text, os.getpid()))

    # -- the life cycle
    def ready(self, status: str) -> None:
        """Start-up is done (only from STARTING)."""
        if self.phase is Phase.STARTING:
            self.phase = Phase.READY
            self.send("READY=1", _status(status))

    def reloading(self, status: str = "reloading the configuration") -> None:
        """A reload begins (only while READY)."""
        if self.phase is Phase.READY:
            self.phase = Phase.RELOADING
            self.send(
                "RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", _status(status)
            )

    def reloaded(self, status: str) -> None:
        """The reload ended, applied or not (only after `reloading`)."""
        if self.phase is Phase.RELOADING:
            self.phase = Phase.READY
            self.send("READY=1", _status(status))

    def stopping(self, status: str = "stopping") -> None:
        """The graceful shutdown begins (once)."""
        if self.phase is not Phase.STOPPING:
            self.phase = Phase.STOPPING
            self.send("STOPPING=1", _status(status))

    def status(self, text: str) -> None:
        self.send(_status(text))

    # -- the watchdog
    def start_watchdog(self) -> None:
        """Ping every half WATCHDOG_USEC from this event loop (if asked to)."""
        if self.watchdog_usec and self._pinger is None:
            log.info("systemd watchdog on interval=%.1fs", self.watchdog_usec / 1e6)
            self._pinger = asyncio.create_task(self._ping(), name="watchdog")

    async def _ping(self) -> None:
        interval = self.watchdog_usec / 2e6
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def close(self) -> None:
        """Stop pinging and close the socket."""
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger
            self._pinger = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- the wire
    def send(self, *fields: str) -> bool:
        """Send one message; True if systemd's socket took it.

        Never blocks: a message that finds systemd's queue full is dropped
        with a warning (waiting would stall the event loop, pings included).
        """
        if self.address is None:
            return False
        data = "\n".join(fields).encode()
        try:
            if self._sock is None:
                # Python sockets are close-on-exec: jobs do not inherit it.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(data, self.address)
        except OSError as exc:
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "cannot notify systemd fields=%s error=%s", fields[0], exc)
            self._failing = True
            return False
        if self._failing:
            log.info("notifying systemd works again")
            self._failing = False
        if fields[0] != "WATCHDOG=1":
            log.debug("notified systemd fields=%s", ",".join(fields))
        return True


def _status(text: str) -> str:
    # One line: a newline would start a field of its own.
    return "STATUS=" + " ".join(text.split("\n"))
