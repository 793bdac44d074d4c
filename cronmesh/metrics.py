"""Prometheus metrics of one agent, under Dkron's names where Dkron has one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cronmesh.core.fsm import Event

if TYPE_CHECKING:
    from cronmesh.agent import Agent

__all__ = ["Metrics"]

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class Metrics:
    """A registry per agent, so several agents can live in one test process."""

    def __init__(self, agent: Agent) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.succeeded = Counter(
            "dkron_job_executions_succeeded",
            "Executions that succeeded",
            ["job_name"],
            registry=r,
        )
        self.failed = Counter(
            "dkron_job_executions_failed",
            "Executions that failed",
            ["job_name"],
            registry=r,
        )
        self.fire_lag = Histogram(
            "cronmesh_fire_lag_seconds",
            "Start of a scheduled execution minus its fire instant",
            buckets=LAG_BUCKETS,
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
        jobs = Gauge("cronmesh_jobs", "Jobs stored", registry=r)
        jobs.set_function(lambda: len(agent.scheduler.entries))
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

    def on_event(self, event: Event) -> None:
        execution = event.execution
        if execution is None:
            return
        if event.kind == "execution_started" and execution.scheduled_at is not None:
            lag = (execution.started_at - execution.scheduled_at).total_seconds()
            self.fire_lag.observe(max(lag, 0.0))
        elif event.kind == "execution_done":
            counter = self.succeeded if execution.success else self.failed
            counter.labels(job_name=execution.job_name).inc()
