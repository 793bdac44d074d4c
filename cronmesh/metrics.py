"""Prometheus metrics of one agent, under Dkron's names where Dkron has one.

Dkron's own: `dkron_job_executions_succeeded_total{job_name}` and
`dkron_job_executions_failed_total{job_name}`, counted when a server
applies an execution's result (so every server counts every run, as in
Dkron's store). The rest are ours, `cronmesh_...`.

Two kinds of source. Events that happen once (a run ends, a fire starts
late, a webhook fails) are counted where they happen, through the small
methods below. Values the node already keeps (Raft term and indexes,
gossip members, probe counters) are read at scrape time by `_NodeCollector`,
so no hot path pays for metrics.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cronmesh.core.fsm import Event
from cronmesh.gossip.driver import STATUS_NAMES

if TYPE_CHECKING:
    from cronmesh.agent import Agent

__all__ = ["LAG_BUCKETS", "Metrics"]

# Seconds from a fire instant to its run starting: sub-ms to a catch-up run.
LAG_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    15.0,
    60.0,
)


class Metrics:
    """A registry per agent, so several agents can live in one test process."""

    def __init__(self, agent: Agent) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.succeeded = Counter(
            "dkron_job_executions_succeeded",
            "Total number of successful job executions",
            ["job_name"],
            registry=r,
        )
        self.failed = Counter(
            "dkron_job_executions_failed",
            "Total number of failed job executions",
            ["job_name"],
            registry=r,
        )
        self.fire_lag = Histogram(
            "cronmesh_fire_lag_seconds",
            "Scheduled runs: seconds from the fire instant to their start committed",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.start_lag = Histogram(
            "cronmesh_run_start_lag_seconds",
            "Scheduled runs on this node: seconds from the fire instant to the "
            "process start (a held run's gate opening)",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        # Notifications count their failed deliveries here (webhook_failed).
        self.webhook_failures = Counter(
            "cronmesh_webhook_failures",
            "Webhook notifications that could not be delivered",
            ["job_name"],
            registry=r,
        )
        running = Gauge(
            "cronmesh_executions_running",
            "Executions running on this node",
            registry=r,
        )
        running.set_function(lambda: len(agent.runner.live))
        missed = Gauge(
            "cronmesh_scheduler_missed_fires",
            "Fire instants skipped because they were older than the catch-up window",
            registry=r,
        )
        missed.set_function(lambda: agent.scheduler.missed)
        shed = Gauge(
            "cronmesh_scheduler_shed_fires",
            "Fire instants skipped because the leader was overloaded and the "
            "job's next instant came due while the previous one still waited",
            registry=r,
        )
        shed.set_function(lambda: agent.scheduler.shed)
        window = Gauge(
            "cronmesh_scheduler_fire_window",
            "Fires the leader lets be in flight at once (follows the loop lag)",
            registry=r,
        )
        window.set_function(lambda: agent.scheduler.window.limit)
        lag = Gauge(
            "cronmesh_event_loop_lag_seconds",
            "Worst lateness of the event loop over the last half second",
            registry=r,
        )
        lag.set_function(lambda: agent.loop_lag.last)
        jobs = Gauge("cronmesh_jobs", "Jobs stored", registry=r)
        jobs.set_function(lambda: _job_count(agent))
        scheduled = Gauge(
            "cronmesh_jobs_scheduled",
            "Jobs the scheduler of this node follows (all on the leader, else 0)",
            registry=r,
        )
        scheduled.set_function(lambda: len(agent.scheduler.entries))
        applied = Gauge("cronmesh_applied_index", "Last applied command", registry=r)
        applied.set_function(agent.store.applied_index)
        cluster = agent.cluster
        if cluster is not None:
            foreign = Gauge(
                "cronmesh_raft_foreign_messages",
                "Raft messages refused or dropped because they came from a "
                "server of another cluster (since start)",
                registry=r,
            )
            foreign.set_function(cluster.foreign_messages)
        r.register(_NodeCollector(agent))

    def on_event(self, event: Event) -> None:
        """FSM listener: count finished executions by job and outcome."""
        execution = event.execution
        if event.kind != "execution_done" or execution is None:
            return
        counter = self.succeeded if execution.success else self.failed
        counter.labels(job_name=execution.job_name).inc()

    def observe_fire_lag(self, seconds: float) -> None:
        """A scheduled run starts `seconds` after its fire instant."""
        self.fire_lag.observe(max(seconds, 0.0))

    def observe_start_lag(self, seconds: float) -> None:
        """A scheduled run started here `seconds` after its fire instant."""
        self.start_lag.observe(max(seconds, 0.0))

    def webhook_failed(self, job_name: str) -> None:
        """A webhook notification about `job_name` was given up on."""
        self.webhook_failures.labels(job_name=job_name).inc()


# What `_NodeCollector` exports: name -> (type, help).
_NODE_METRICS: dict[str, tuple[str, str]] = {
    "cronmesh_raft_term": ("gauge", "Current Raft term"),
    "cronmesh_raft_commit_index": ("gauge", "Highest log index known committed"),
    "cronmesh_raft_last_index": ("gauge", "Last index in this server's log"),
    "cronmesh_raft_apply_lag": (
        "gauge",
        "Committed log entries not yet applied to the state (commit - applied)",
    ),
    "cronmesh_raft_leader": ("gauge", "1 while this server is the Raft leader"),
    "cronmesh_raft_leader_changes": (
        "counter",
        "Leaders this server has seen elected (a new leader or a new term)",
    ),
    "cronmesh_gossip_members": (
        "gauge",
        "Members of the gossip mesh this node knows, by state",
    ),
    "cronmesh_gossip_probe_failures": (
        "counter",
        "Probes of a member that got no ack, directly or indirectly",
    ),
    "cronmesh_gossip_health_score": (
        "gauge",
        "Lifeguard local health: 0 is healthy, higher means this node lags",
    ),
}


def _job_count(agent: Agent) -> int:
    # Followers schedule nothing, but they store every job.
    with agent.store.view() as view:
        return view.job_count()


class _NodeCollector(Collector):
    """Raft and gossip values, read from the drivers at scrape time."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def describe(self) -> list[Metric]:
        # The names only, so the registry refuses a clash without calling
        # collect() before the drivers exist.
        return [_family(name) for name in _NODE_METRICS]

    def collect(self) -> Iterator[Metric]:
        yield from self._raft()
        yield from self._gossip()

    def _raft(self) -> Iterator[Metric]:
        cluster = self.agent.cluster
        node = cluster.driver.node if cluster is not None else None
        if cluster is None or node is None:
            return  # not a server, or not started yet
        status = node.status()
        yield _family("cronmesh_raft_term", status.term)
        yield _family("cronmesh_raft_commit_index", status.commit)
        yield _family("cronmesh_raft_last_index", status.last_index)
        yield _family("cronmesh_raft_apply_lag", max(status.commit - status.applied, 0))
        yield _family("cronmesh_raft_leader", 1 if cluster.driver.is_leader() else 0)
        yield _family("cronmesh_raft_leader_changes", cluster.driver.leader_changes)

    def _gossip(self) -> Iterator[Metric]:
        gossip = self.agent.gossip
        if gossip is None or not gossip.started:
            return
        counts = Tally(m.status for m in gossip.members())
        members = _family("cronmesh_gossip_members", labels=["state"])
        assert isinstance(members, GaugeMetricFamily)
        for state in STATUS_NAMES.values():
            members.add_metric([state], counts.get(state, 0))
        yield members
        stats = gossip.stats
        yield _family("cronmesh_gossip_probe_failures", stats.probe_failures)
        yield _family("cronmesh_gossip_health_score", stats.health_score)


def _family(
    name: str, value: float | None = None, labels: list[str] | None = None
) -> Metric:
    kind, documentation = _NODE_METRICS[name]
    if kind == "counter":
        return CounterMetricFamily(name, documentation, value=value, labels=labels)
    return GaugeMetricFamily(name, documentation, value=value, labels=labels)
