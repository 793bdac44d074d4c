"""/metrics of a real three-server cluster follows what the cluster does."""

from __future__ import annotations

from typing import Any

from conftest import AgentProcess, shell_job
from prometheus_client.parser import text_string_to_metric_families
from test_cluster import leader_of, start_cluster


def scrape(node: AgentProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = node.http.get("/metrics")
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            samples[key] = float(sample.value)
    return samples


def value(node: AgentProcess, name: str, **labels: str) -> float | None:
    return scrape(node).get((name, frozenset(labels.items())))


def test_metrics_of_a_three_server_cluster(agent_factory: Any) -> None:
    nodes = start_cluster(agent_factory)
    leader = leader_of(nodes)
    named = nodes[0].http.get("/v1/leader").json()["Name"]
    assert named == leader.name

    # Raft: every server reports the term of the leader /v1/leader names,
    # and only that one says it leads.
    term = int(leader.http.get("/v1").json()["raft"]["term"])
    for node in nodes:
        node.wait_for(
            f"{node.name} reports term {term}",
            lambda n=node: value(n, "cronmesh_raft_term") == term,
        )
        leading = 1.0 if node is leader else 0.0
        assert value(node, "cronmesh_raft_leader") == leading
        assert (value(node, "cronmesh_raft_leader_changes_total") or 0) >= 1
        assert (value(node, "cronmesh_raft_apply_lag") or 0) >= 0

    # A write moves the commit index forward on every server.
    before = value(leader, "cronmesh_raft_commit_index")
    assert before is not None
    assert leader.post_job(shell_job("ok", "true", "@every 1s")).status_code == 201
    assert leader.post_job(shell_job("bad", "false")).status_code == 201
    assert leader.post_job(shell_job("slow", "sleep 5")).status_code == 201
    for node in nodes:
        node.wait_for(
            f"{node.name} commit index grows",
            lambda n=node: (value(n, "cronmesh_raft_commit_index") or 0) > before,
        )
        node.wait_for(
            f"{node.name} stores the jobs",
            lambda n=node: value(n, "cronmesh_jobs") == 3,
        )
        scheduling = 3.0 if node is leader else 0.0
        assert value(node, "cronmesh_jobs_scheduled") == scheduling
        # Three jobs are no overload: nothing shed (the window may have
        # shrunk if the machine was slow, but never below its floor).
        assert value(node, "cronmesh_scheduler_shed_fires") == 0
        assert (value(node, "cronmesh_scheduler_fire_window") or 0) >= 32
        assert (value(node, "cronmesh_event_loop_lag_seconds") or 0) >= 0

    # Runs: Dkron's counters on every server (each applies every result),
    # equal to the job's own counts; the fire lag only where the scheduled
    # run was started (the leader). A job without tags runs on every node.
    assert leader.http.post("/v1/jobs/bad/run").status_code == 202
    assert leader.http.post("/v1/jobs/slow/run").status_code == 202
    for node in nodes:
        node.wait_for(
            f"{node.name} runs slow",
            lambda n=node: (value(n, "cronmesh_executions_running") or 0) >= 1,
        )

    def counted(node: AgentProcess) -> bool:
        bad = node.http.get("/v1/jobs/bad").json()
        ok = node.http.get("/v1/jobs/ok").json()
        return bool(
            bad["error_count"] >= 1
            and value(node, "dkron_job_executions_failed_total", job_name="bad")
            == bad["error_count"]
            and (
                value(node, "dkron_job_executions_succeeded_total", job_name="ok") or 0
            )
            >= 1
            and ok["success_count"] >= 1
        )

    for node in nodes:
        node.wait_for(f"{node.name} counts the runs", lambda n=node: counted(n))
    assert (value(leader, "cronmesh_fire_lag_seconds_count") or 0) >= 1
    for node in nodes:
        if node is not leader:
            assert value(node, "cronmesh_fire_lag_seconds_count") == 0
    # Each node that ran a scheduled run (`ok` runs on every node, staged)
    # measured its start; the manual runs count nowhere.
    for node in nodes:
        node.wait_for(
            f"{node.name} measured a start",
            lambda n=node: (value(n, "cronmesh_run_start_lag_seconds_count") or 0) >= 1,
        )

    # Gossip: all alive, then one server killed is seen failed by the others.
    for node in nodes:
        assert value(node, "cronmesh_gossip_members", state="alive") == 3
        assert value(node, "cronmesh_gossip_members", state="failed") == 0
    victim = next(n for n in nodes if n is not leader)
    victim.kill9()
    for node in nodes:
        if node is victim:
            continue
        node.wait_for(
            f"{node.name} sees {victim.name} failed",
            lambda n=node: (
                value(n, "cronmesh_gossip_members", state="failed") == 1
                and value(n, "cronmesh_gossip_members", state="alive") == 2
            ),
            timeout=30,
        )
        assert (value(node, "cronmesh_gossip_probe_failures_total") or 0) >= 1
