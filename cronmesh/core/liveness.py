"""Liveness of executions: the leader notices runs whose agent went away.

Every agent tells the leader, every few seconds, which executions it is
running (a heartbeat). The leader keeps, per execution, when it last heard
of it. An execution the committed state holds as running is declared failed
when its agent has said nothing about it for `timeout` seconds, or sooner,
after two heartbeat intervals of silence, when the mesh says its node has
failed or left. So a `forbid` job is never blocked for long by a ghost.

A hand-over (gRPC AgentRun) that got no answer is not final: the leader
may not know whether the agent took the run. Such an execution stays
running and is watched here until the agent's heartbeats settle it: two
heartbeats of its node, both received after the hand-over was given up,
that do not list it mean the agent never started it (the agent refuses a
hand-over that arrives after its gRPC deadline, so a late one cannot start
it either); a heartbeat that lists it ends the doubt. The timeout still
applies. Executions failed for either reason while their hand-over was in
doubt carry the verdict VERDICT_HANDOVER, which lets the agent's own later
report replace the failure (core/fsm.py).

Heartbeats live in the leader's memory only. A new leader counts the
silence of every execution running at its election from the election itself
(not from its first sweep, up to a second later), except on a node the mesh
already says is failed or left: there it counts from when this node saw the
node go (`gone_since`), so the run of an agent that died well before the
failover is failed at the first sweep. A live-looking (or suspect) node
still gets one full `timeout` from the election: only its heartbeats could
tell more, and they went to the old leader. Pure logic, no clock of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, TypeVar

__all__ = ["VERDICT_HANDOVER", "LivenessWatch"]


class _Run(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def node_name(self) -> str: ...


R = TypeVar("R", bound=_Run)

DEFAULT_TIMEOUT = 30.0
HEARTBEAT_INTERVAL = 3.0
# Heartbeats of a node that do not list an execution whose hand-over went
# unanswered, before the leader says the agent never started it.
MISSED_HEARTBEATS = 2
# The verdict of a failure the leader recorded while the hand-over of the
# execution went unanswered (Execution.verdict).
VERDICT_HANDOVER = "handover"


@dataclass
class LivenessWatch:
    """What the leader knows about running executions' agents."""

    timeout: float = DEFAULT_TIMEOUT
    heartbeat: float = HEARTBEAT_INTERVAL
    since: float = 0.0
    # execution id -> when it was last heard of (or first noticed)
    seen: dict[str, float] = field(default_factory=dict)
    # execution ids some heartbeat has listed since this node leads
    heard_of: set[str] = field(default_factory=set)
    # execution id -> (node, heartbeats of that node without it) for runs
    # whose hand-over got no answer
    unanswered: dict[str, tuple[str, int]] = field(default_factory=dict)
    # The next `overdue` is the first since `lead`: what runs then was
    # running at the election, and its clock starts at `since`.
    inherit: bool = False

    def lead(self, now: float) -> None:
        """This node just became leader: every silence counts from now."""
        self.since = now
        self.seen.clear()
        self.heard_of.clear()
        self.inherit = True

    def heard(self, running: list[str], now: float) -> None:
        for exec_id in running:
            self.seen[exec_id] = now
            self.heard_of.add(exec_id)
            self.unanswered.pop(exec_id, None)

    def handover_unanswered(self, exec_id: str, node: str) -> None:
        """The leader gave up handing `exec_id` to `node` without an answer.

        Call it only after the last attempt ended: heartbeats received from
        now on are what settles it.
        """
        self.unanswered[exec_id] = (node, 0)

    def beat(self, node: str, running: list[str], now: float) -> None:
        """A heartbeat of `node` listing the execution ids it has."""
        self.heard(running, now)
        listed = set(running)
        for exec_id, (target, missed) in list(self.unanswered.items()):
            if target == node and exec_id not in listed:
                self.unanswered[exec_id] = (target, missed + 1)

    def verdict(self, exec_id: str) -> str:
        """VERDICT_HANDOVER while the hand-over of `exec_id` is in doubt."""
        return VERDICT_HANDOVER if exec_id in self.unanswered else ""

    def overdue(
        self,
        running: list[R],
        node_status: dict[str, str],
        now: float,
        gone_since: dict[str, float] | None = None,
    ) -> list[tuple[R, str]]:
        """The running executions to declare failed now, each with why.

        `node_status`: the mesh's view ("alive", "suspect", "failed",
        "left"); a node it does not know counts as gone. `gone_since`: when
        this node saw a member fail or leave (same clock as `now`).
        """
        overdue: list[tuple[R, str]] = []
        current = set()
        gone_since = gone_since or {}
        first_seen = self.since if self.inherit else max(self.since, now)
        self.inherit = False
        for execution in running:
            current.add(execution.id)
            node = execution.node_name
            last = self.seen.setdefault(execution.id, first_seen)
            status = node_status.get(node, "unknown")
            gone = status not in ("alive", "suspect")
            if gone and execution.id not in self.heard_of and node in gone_since:
                # Never heard of since this node leads: the agent's silence
                # began when the mesh saw it go, maybe before the election.
                last = min(last, gone_since[node])
            silent = now - last
            missed = self.unanswered.get(execution.id, (node, 0))[1]
            if missed >= MISSED_HEARTBEATS:
                overdue.append(
                    (
                        execution,
                        f"never started on {node}: the hand-over got no "
                        f"answer and {missed} heartbeats of the agent since "
                        "do not list it",
                    )
                )
            elif silent >= self.timeout:
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
                self.heard_of.discard(exec_id)
        for exec_id in list(self.unanswered):
            if exec_id not in current:
                del self.unanswered[exec_id]
        return overdue
