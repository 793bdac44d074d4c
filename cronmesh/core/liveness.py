"""Liveness of executions: the leader notices runs whose agent went away.

Every agent tells the leader, every few seconds, which executions it is
running (a heartbeat). The leader keeps, per execution, when it last heard
of it. An execution the committed state holds as running is declared failed
when its agent has said nothing about it for `timeout` seconds, or sooner,
after two heartbeat intervals of silence, when the mesh says its node has
failed or left. So a `forbid` job is never blocked for long by a ghost.

Heartbeats live in the leader's memory only: a new leader starts every
clock at its election, so it waits one full `timeout` before it declares an
execution of a live-looking node failed. Pure logic, no clock of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, TypeVar

__all__ = ["LivenessWatch"]


class _Run(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def node_name(self) -> str: ...


R = TypeVar("R", bound=_Run)

DEFAULT_TIMEOUT = 30.0
HEARTBEAT_INTERVAL = 3.0


@dataclass
class LivenessWatch:
    """What the leader knows about running executions' agents."""

    timeout: float = DEFAULT_TIMEOUT
    heartbeat: float = HEARTBEAT_INTERVAL
    since: float = 0.0
    # execution id -> when it was last heard of (or first noticed)
    seen: dict[str, float] = field(default_factory=dict)

    def lead(self, now: float) -> None:
        """This node just became leader: every silence counts from now."""
        self.since = now
        self.seen.clear()

    def heard(self, running: list[str], now: float) -> None:
        for exec_id in running:
            self.seen[exec_id] = now

    def overdue(
        self,
        running: list[R],
        node_status: dict[str, str],
        now: float,
    ) -> list[tuple[R, str]]:
        """The running executions to declare failed now, each with why.

        `node_status`: the mesh's view ("alive", "suspect", "failed",
        "left"); a node it does not know counts as gone.
        """
        overdue: list[tuple[R, str]] = []
        current = set()
        for execution in running:
            current.add(execution.id)
            last = self.seen.setdefault(execution.id, max(self.since, now))
            silent = now - last
            status = node_status.get(execution.node_name, "unknown")
            gone = status not in ("alive", "suspect")
            if silent >= self.timeout:
                overdue.append(
                    (
                        execution,
                        f"agent {execution.node_name} has not reported this "
                        f"execution for {silent:.0f} s (node is {status})",
                    )
                )
            elif gone and silent >= 2 * self.heartbeat:
                overdue.append(
                    (
                        execution,
                        f"agent {execution.node_name} is {status} and has not "
                        f"reported this execution for {silent:.0f} s",
                    )
                )
        for exec_id in list(self.seen):
            if exec_id not in current:
                del self.seen[exec_id]
        return overdue
