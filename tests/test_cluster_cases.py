"""The cluster cases of ../shared/cases/jobs.json (J12, J14) on 3 real servers.

Times are compressed: the cases' minutes become seconds.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from conftest import shell_job
from test_cluster import leader_of, start_cluster


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_J12_leader_failover_keeps_scheduling_every_job(agent_factory: Any) -> None:
    nodes = start_cluster(agent_factory)
    leader = leader_of(nodes)
    # The case's 2 minutes, compressed to 3 s. Not 2 s: a run handed to the
    # old node while it restarts is reported once that node knows the leader
    # (about a second, more on a loaded machine), and until then `forbid`
    # rightly holds the next instant back (seen once in CI at 2 s: one gap).
    job = shell_job("myjob", "uptime", "@every 3s", concurrency="forbid")
    assert leader.post_job(job).status_code == 201
    leader.finished("myjob", count=9, timeout=30)  # 3 servers x 3 fires
    leader.kill9()
    killed = time.time()
    survivors = [n for n in nodes if n is not leader]
    new_leader = leader_of(survivors)
    assert new_leader.http.get("/v1/leader").json()["Name"] == new_leader.name
    new_leader.wait_for(
        "a fire by the new leader",
        lambda: any(
            r["scheduled_at"] and ts(r["scheduled_at"]) > killed
            for r in new_leader.executions("myjob")
        ),
    )
    leader.start()
    time.sleep(5)
    runs = new_leader.executions("myjob")
    # One execution per (instant, node): no tick doubled by old and new leader.
    per_tick = Counter((r["scheduled_at"], r["node_name"]) for r in runs)
    assert max(per_tick.values()) == 1, per_tick.most_common(1)
    # No interval without a fire, across the kill and the old node's return.
    instants = sorted({ts(r["scheduled_at"]) for r in runs if r["scheduled_at"]})
    gaps = [b - a for a, b in itertools.pairwise(instants)]
    assert instants and max(gaps) <= 3.0, gaps
    assert instants[-1] > time.time() - 5, "scheduling stopped"
    nxt = new_leader.http.get("/v1/jobs/myjob").json()["next"]
    assert nxt and ts(nxt) > time.time() - 1


def test_J14_all_servers_down_resume_with_at_most_one_catch_up(
    agent_factory: Any,
) -> None:
    nodes = start_cluster(agent_factory)
    for node in nodes:
        node.extra += ["--catch-up-window", "4"]
    leader = leader_of(nodes)
    # Every 5 s at whole multiples of 5 (the case's "0 * * * * *", compressed).
    job = shell_job("minutely", "date", "*/5 * * * * *", tags={"server": "true:1"})
    assert leader.post_job(job).status_code == 201
    leader.finished("minutely", count=2, timeout=20)
    for node in nodes:
        node.stop()
    down = time.time()
    time.sleep(22)  # at least 4 missed instants
    for node in nodes:
        node.start(wait=False)
    for node in nodes:
        node.wait_ready(timeout=60)
    up = time.time()
    new_leader = leader_of(nodes)
    new_leader.wait_for(
        "runs resumed",
        lambda: (
            sum(
                1
                for r in new_leader.executions("minutely")
                if r["scheduled_at"] and ts(r["scheduled_at"]) >= up
            )
            >= 1
        ),
        20,
    )
    runs = new_leader.executions("minutely")
    outage = [
        r for r in runs if r["scheduled_at"] and down < ts(r["scheduled_at"]) < up
    ]
    assert len(outage) <= 1, [r["scheduled_at"] for r in outage]
    for run in runs:
        if run["scheduled_at"]:
            at = datetime.fromtimestamp(ts(run["scheduled_at"]), UTC)
            assert at.second % 5 == 0 and at.microsecond == 0, run["scheduled_at"]
