"""Distributed execution: 3 servers and 2 worker agents as real processes.

The leader picks targets by tags, hands each execution to its agent over
gRPC, and the agent reports the result to whichever server leads.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO, AgentProcess, shell_job, start_run

WORKERS = ("w1", "w2")


def start_mesh(
    base: Path, *server_extra: str, agent_extra: tuple[str, ...] = ()
) -> list[AgentProcess]:
    """3 servers s1-s3 and 2 agents w1, w2 (tag role=worker), all joined to s1."""
    servers = [
        AgentProcess(base / f"data-s{i}", name=f"s{i}", server=True) for i in (1, 2, 3)
    ]
    seed = servers[0].gossip_addr
    for node in servers:
        node.extra += ["--bootstrap-expect", "3", *server_extra]
        if node is not servers[0]:
            node.extra += ["--retry-join", seed, "--retry-interval", "0.5"]
    workers = [
        AgentProcess(base / f"data-{name}", name=name, server=False) for name in WORKERS
    ]
    for node in workers:
        node.extra += [
            "--tag",
            "role=worker",
            "--tag",
            f"id={node.name}",
            "--retry-join",
            seed,
            "--retry-interval",
            "0.5",
            *agent_extra,
        ]
    for node in [*servers, *workers]:
        node.start(wait=False)
    for node in [*servers, *workers]:
        node.wait_ready(timeout=60)
    # Every server sees every member before a test targets them.
    for node in servers:
        node.wait_for(
            "5 alive members",
            lambda n=node: (
                sum(
                    m["statusText"] == "alive" for m in n.http.get("/v1/members").json()
                )
                == 5
            ),
            30,
        )
    return [*servers, *workers]


def stop_all(nodes: list[AgentProcess]) -> None:
    for node in nodes:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(10)


def leader_of(nodes: list[AgentProcess], timeout: float = 30) -> AgentProcess:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in nodes:
            if not node.server or node.proc is None or node.proc.poll() is not None:
                continue
            try:
                if node.http.get("/v1/isleader").status_code == 200:
                    return node
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    raise AssertionError("no leader elected")


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AgentProcess]]:
    nodes = start_mesh(tmp_path_factory.mktemp("mesh"))
    yield nodes
    stop_all(nodes)


def by_name(nodes: list[AgentProcess], name: str) -> AgentProcess:
    return next(n for n in nodes if n.name == name)


def test_targets_follow_the_tags(mesh: list[AgentProcess]) -> None:
    s1, w1 = mesh[0], by_name(mesh, "w1")
    jobs = {
        "one-worker": {"role": "worker:1"},
        "every-worker": {"role": "worker"},
        "everywhere": {},
        "only-w2": {"id": "w2"},
    }
    for name, tags in jobs.items():
        # Created through an agent without --server: forwarded to a server.
        response = w1.post_job(
            shell_job(
                name,
                "echo ran-$CRONMESH_EXECUTION_ID",
                "@every 1s",
                tags=tags,
                config={"shell": "true"},
            )
        )
        assert response.status_code == 201, response.text
    nodes_of: dict[str, dict[str, set[str]]] = {}
    for name in jobs:
        runs = s1.finished(name, count=12, timeout=30)
        fires: dict[str, set[str]] = {}
        for run in runs:
            assert run["success"] is True, run
            # The execution id ends with the node that ran it.
            assert run["output"].strip() == f"ran-{run['id']}", run
            assert run["id"].endswith(f"-{run['node_name']}"), run
            fires.setdefault(run["scheduled_at"], set()).add(run["node_name"])
        nodes_of[name] = fires
    for name in jobs:
        s1.http.delete(f"/v1/jobs/{name}")

    # Complete fires only: the newest may still be starting.
    def complete(name: str, size: int) -> list[set[str]]:
        fires = nodes_of[name]
        return [nodes for nodes in fires.values() if len(nodes) >= size]

    one = list(nodes_of["one-worker"].values())
    assert all(len(nodes) == 1 and nodes <= set(WORKERS) for nodes in one), one
    every = complete("every-worker", 2)
    assert every and all(nodes == set(WORKERS) for nodes in every)
    assert all(n <= set(WORKERS) for n in nodes_of["every-worker"].values())
    everywhere = complete("everywhere", 5)
    assert everywhere and all(
        nodes == {"s1", "s2", "s3", "w1", "w2"} for nodes in everywhere
    )
    assert all(nodes == {"w2"} for nodes in nodes_of["only-w2"].values())


def test_output_streams_and_kill_reaches_the_agent(mesh: list[AgentProcess]) -> None:
    s2, w2 = by_name(mesh, "s2"), by_name(mesh, "w2")
    script = "for i in 1 2 3 4 5 6 7 8; do echo line-$i; sleep 0.5; done; sleep 60"
    exec_id = start_run(s2, "slow-printer", script, "w2")
    assert exec_id.endswith("-w2")
    # The output so far, read through a follower server and through an agent.
    path = f"/v1/jobs/slow-printer/executions/{exec_id}"
    s2.wait_for(
        "live output via a server",
        # (s2 forwarded the run; it may apply the start a moment later)
        lambda: "line-2" in s2.http.get(path).json().get("output", ""),
    )
    assert s2.http.get(path).json()["finished_at"] is None
    # Follow the output with the CLI until the kill ends the execution.
    follow = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cronmesh",
            "executions",
            "logs",
            "slow-printer",
            exec_id,
            "--follow",
            "--address",
            w2.url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    s2.wait_for(
        "all lines printed",
        lambda: "line-8" in s2.http.get(path).json()["output"],
    )
    busy = s2.http.get("/v1/busy").json()
    assert [b["id"] for b in busy if b["job_name"] == "slow-printer"] == [exec_id]
    # forbid is not set: a manual run while it runs starts another one.
    killed = s2.http.post(f"{path}/kill")
    assert killed.status_code == 202, killed.text
    assert killed.json()["node"] == "w2"
    out, err = follow.communicate(timeout=30)
    assert follow.returncode == 0, err
    assert "line-1" in out and "line-8" in out
    done = s2.wait_for(
        "the killed execution recorded",
        lambda: (r := s2.http.get(path).json())["finished_at"] and r,
    )
    assert done["success"] is False and "line-8" in done["output"]
    again = s2.http.post(f"{path}/kill")
    assert again.status_code == 409 and "has finished" in again.json()["error"]


def test_staged_runs_start_at_their_instant_and_forbid_decides_at_it(
    mesh: list[AgentProcess],
) -> None:
    """A scheduled run is committed and handed to its worker before its
    instant (its committed start IS the instant) and starts then, never
    before; a `forbid` job is decided at its instant (committed after it)."""
    s2 = by_name(mesh, "s2")
    staged = shell_job("staged", "/bin/date +%s.%N", "@every 1s", tags={"id": "w2"})
    forbid = shell_job(
        "staged-forbid",
        "/bin/date +%s.%N",
        "@every 1s",
        tags={"id": "w1"},
        concurrency="forbid",
    )
    for job in (staged, forbid):
        assert s2.post_job(job).status_code == 201
    runs = s2.finished("staged", count=4, timeout=30)
    held = s2.finished("staged-forbid", count=4, timeout=30)
    for name in ("staged", "staged-forbid"):
        s2.http.delete(f"/v1/jobs/{name}")
    for run in runs:
        assert run["success"] is True and run["node_name"] == "w2", run
        instant = ts(run["scheduled_at"]).timestamp()
        assert ts(run["started_at"]).timestamp() == pytest.approx(instant, abs=1e-3)
        # The process ran at the instant or after it, never before.
        assert float(run["output"].split()[0]) >= instant, run
    for run in held:
        assert run["success"] is True, run
        assert ts(run["started_at"]) > ts(run["scheduled_at"]), run
        assert float(run["output"].split()[0]) >= ts(run["scheduled_at"]).timestamp()


def test_forbid_holds_for_manual_runs_cluster_wide(mesh: list[AgentProcess]) -> None:
    s3, w1 = by_name(mesh, "s3"), by_name(mesh, "w1")
    job = shell_job("forbidden", "sleep 30", tags={"id": "w1"}, concurrency="forbid")
    assert s3.post_job(job).status_code == 201
    first = s3.http.post("/v1/jobs/forbidden/run")
    assert first.status_code == 202, first.text
    running_id = first.headers["X-Execution-Id"]
    # Through another server and through an agent: 409 naming the run.
    for node in (by_name(mesh, "s1"), w1):
        again = node.http.post("/v1/jobs/forbidden/run")
        assert again.status_code == 409, again.text
        assert again.json()["execution_id"] == running_id
    forced = w1.http.post("/v1/jobs/forbidden/run", params={"force": "true"})
    assert forced.status_code == 202, forced.text
    # Another server than the one that took the write: ask for a fresh read.
    runs = s3.http.get("/v1/jobs/forbidden/executions", params={"consistent": ""})
    running = [r for r in runs.json() if not r["finished_at"]]
    assert len(running) == 2
    for run in running:
        s3.http.post(f"/v1/jobs/forbidden/executions/{run['id']}/kill")
    s3.finished("forbidden", count=2)


def test_retries_use_the_job_backoff_on_the_same_node(
    mesh: list[AgentProcess],
) -> None:
    s1 = mesh[0]
    job = shell_job(
        "flaky",
        "echo try; exit 3",
        config={"shell": "true"},
        tags={"role": "worker:1"},
        retries=2,
        retry_backoff={"initial": "1s", "max": "2s"},
    )
    assert s1.post_job(job).status_code == 201
    assert s1.http.post("/v1/jobs/flaky/run").status_code == 202
    runs = sorted(s1.finished("flaky", count=3, timeout=30), key=lambda r: r["attempt"])
    assert [r["attempt"] for r in runs] == [1, 2, 3]
    assert len({r["node_name"] for r in runs}) == 1, "retries moved to another node"
    assert len({r["group"] for r in runs}) == 1
    gaps = [
        (ts(b["started_at"]) - ts(a["finished_at"])).total_seconds()
        for a, b in itertools.pairwise(runs)
    ]
    # initial 1s, then doubled (2s, also the max)
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps
    bad = s1.post_job(dict(job, retry_backoff={"initial": "soon"}))
    assert bad.status_code == 400 and "retry_backoff.initial" in bad.json()["error"]


def test_dependent_runs_once_per_successful_parent_group(
    mesh: list[AgentProcess],
) -> None:
    s1 = mesh[0]
    parent = shell_job("parent-all", "echo parent", tags={"role": "worker"})
    child = shell_job("child-once", "echo child", parent_job="parent-all")
    assert s1.post_job(parent).status_code == 201
    assert s1.post_job(child).status_code == 201
    assert s1.http.post("/v1/jobs/parent-all/run").status_code == 202
    parents = s1.finished("parent-all", count=2)
    assert {r["node_name"] for r in parents} == set(WORKERS)
    children = s1.finished("child-once", count=1)
    # No tags: the dependent job runs on every node, but for one group only.
    time.sleep(2)
    groups = Counter((r["group"], r["node_name"]) for r in s1.executions("child-once"))
    assert max(groups.values()) == 1 and len({g for g, _ in groups}) == 1
    assert children[0]["trigger"] == "dependent"


def test_cli_executions_kill_and_logs(mesh: list[AgentProcess]) -> None:
    s1 = mesh[0]
    assert (
        s1.post_job(
            shell_job("cli-kill", "echo hi; sleep 60", config={"shell": "true"})
        ).status_code
        == 201
    )
    run = s1.http.post("/v1/jobs/cli-kill/run")
    exec_id = run.headers["X-Execution-Id"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cronmesh", *args, "--address", s1.url],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )

    s1.wait_for(
        "running",
        lambda: (
            "hi"
            in s1.http.get(f"/v1/jobs/cli-kill/executions/{exec_id}").json()["output"]
        ),
    )
    killed = cli("executions", "kill", "cli-kill", exec_id, "--json")
    assert killed.returncode == 0, killed.stderr
    assert json.loads(killed.stdout)["killed"] == exec_id
    s1.finished("cli-kill")
    logs = cli("executions", "logs", "cli-kill", exec_id)
    assert logs.returncode == 0 and "hi" in logs.stdout
    missing = cli("executions", "kill", "cli-kill", exec_id)
    assert missing.returncode == 1 and "has finished" in missing.stderr


def test_leader_and_agent_kills_lose_and_double_nothing(tmp_path: Path) -> None:
    """kill -9 of the leader while 20 jobs run, then of an agent mid-run."""
    nodes = start_mesh(tmp_path, agent_extra=())
    try:
        servers = nodes[:3]
        leader = leader_of(servers)
        for i in range(20):
            job = shell_job(
                f"busy-{i:02d}",
                "sleep 1.5; echo done",
                "@every 2s",
                config={"shell": "true"},
                tags={"role": "worker:1"},
            )
            assert leader.post_job(job).status_code == 201
        slow = shell_job(
            "no-overlap",
            "sleep 3; echo ok",
            "@every 1s",
            config={"shell": "true"},
            tags={"role": "worker:1"},
            concurrency="forbid",
        )
        assert leader.post_job(slow).status_code == 201
        leader.wait_for(
            "20 jobs running",
            lambda: len(leader.http.get("/v1/busy").json()) >= 20,
            30,
        )
        leader.kill9()
        killed_at = time.time()
        survivors = [n for n in servers if n is not leader]
        new_leader = leader_of(survivors)
        # An agent dies mid-run: its executions end failed well within 30 s.
        victim = by_name(nodes, "w1")
        new_leader.wait_for(
            "w1 runs something",
            lambda: any(
                b["node_name"] == "w1" for b in new_leader.http.get("/v1/busy").json()
            ),
        )
        victim_runs = {
            b["id"]
            for b in new_leader.http.get("/v1/busy").json()
            if b["node_name"] == "w1"
        }
        victim.kill9()
        agent_killed = time.time()

        def victim_runs_ended() -> bool:
            busy = {b["id"] for b in new_leader.http.get("/v1/busy").json()}
            return not (busy & victim_runs)

        new_leader.wait_for("w1's runs failed", victim_runs_ended, 30)
        assert time.time() - agent_killed < 30
        victim.start()
        leader.start()
        time.sleep(6)
        names = [f"busy-{i:02d}" for i in range(20)]
        for name in [*names, "no-overlap"]:
            runs = new_leader.executions(name)
            fires = Counter(r["scheduled_at"] for r in runs)
            assert max(fires.values()) == 1, (name, fires.most_common(2))
        # Every fire instant of the 2 s jobs after the kill ran (late, once).
        for name in names:
            instants = sorted(
                ts(r["scheduled_at"]).timestamp()
                for r in new_leader.executions(name)
                if r["scheduled_at"]
            )
            after = [t for t in instants if t > killed_at - 4]
            gaps = [b - a for a, b in itertools.pairwise(after)]
            assert gaps and max(gaps) <= 2.0, (name, gaps)
        # The forbid job: no two executions overlap in committed times.
        runs = sorted(
            (r for r in new_leader.executions("no-overlap") if r["finished_at"]),
            key=lambda r: r["started_at"],
        )
        assert len(runs) >= 3
        for a, b in itertools.pairwise(runs):
            assert ts(b["started_at"]) >= ts(a["finished_at"]), (a["id"], b["id"])
        # The victim's executions all ended; those it was running when it
        # died are failed with a reason (one may have finished just before).
        ended = [
            run
            for name in [*names, "no-overlap"]
            for run in new_leader.executions(name)
            if run["id"] in victim_runs
        ]
        assert ended and all(run["finished_at"] for run in ended), ended
        lost = [r for r in ended if r["success"] is False]
        assert lost and all("[cronmesh]" in r["output"] for r in lost), lost
    finally:
        stop_all(nodes)


def test_a_new_leader_hands_over_a_run_its_predecessor_never_delivered(
    tmp_path: Path,
) -> None:
    """The leader commits a run, cannot hand it to its agent (stopped), and
    dies. The next leader hands it over again: it runs once, late, instead
    of waiting for the liveness timeout to be failed without having run."""
    nodes = start_mesh(tmp_path)
    try:
        lead = leader_of(nodes)
        w1 = by_name(nodes, "w1")
        job = shell_job(
            "undelivered",
            "echo ran-$CRONMESH_EXECUTION_ID",
            tags={"id": "w1"},
            config={"shell": "true"},
        )
        assert lead.post_job(job).status_code == 201
        assert w1.proc is not None
        w1.proc.send_signal(signal.SIGSTOP)
        try:
            run = lead.http.post("/v1/jobs/undelivered/run")
            assert run.status_code == 202, run.text
            exec_id = run.headers["X-Execution-Id"]
            time.sleep(1.0)  # the hand-over waits for the stopped agent
            lead.kill9()
            # Past the hand-over's gRPC deadline: w1 refuses that call.
            time.sleep(6.0)
        finally:
            w1.proc.send_signal(signal.SIGCONT)
        survivors = [n for n in nodes if n.server and n is not lead]
        new_lead = leader_of(survivors)

        def ended() -> dict[str, Any] | None:
            for entry in new_lead.executions("undelivered"):
                if entry["id"] == exec_id and entry["finished_at"]:
                    return entry
            return None

        done = new_lead.wait_for("the run to end", ended, timeout=40)
        assert done["success"] is True, done
        assert done["output"].strip() == f"ran-{exec_id}", done
        assert len(new_lead.executions("undelivered")) == 1
    finally:
        stop_all(nodes)
