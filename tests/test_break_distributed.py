"""Adversarial reproductions against distributed execution (issue 5).

Each test starts real `cronmesh agent` processes on loopback (3 servers and
2 worker agents, as tests/test_distributed.py does) and shows one defect.
Tests of defects that exist today are marked xfail(strict=True): the suite
stays green, and a test that starts passing (the defect is fixed) fails
until its mark is removed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, AgentProcess, shell_job, start_run
from test_distributed import by_name, leader_of, start_mesh, stop_all


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AgentProcess]]:
    nodes = start_mesh(tmp_path_factory.mktemp("break-mesh"))
    yield nodes
    stop_all(nodes)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def read_pid(path: Path, node: AgentProcess) -> int:
    text = node.wait_for(f"{path} written", lambda: path.exists() and path.read_text())
    return int(str(text).strip())


def kill_pid_in(path: Path) -> None:
    """Ends a job process a test started (it outlives a killed agent)."""
    if path.exists() and path.read_text().strip():
        pid = int(path.read_text())
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def execution(node: AgentProcess, job: str, exec_id: str) -> dict[str, Any]:
    """The execution as `node` has it ({} while it has not applied the start)."""
    response = node.http.get(
        f"/v1/jobs/{job}/executions/{exec_id}", params={"consistent": ""}
    )
    if response.status_code == 404:
        return {}
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_deleting_a_job_stops_its_running_execution(
    mesh: list[AgentProcess], tmp_path: Path
) -> None:
    s1 = mesh[0]
    pid_file = tmp_path / "pid"
    script = f"echo $$ > {pid_file}; exec sleep 40"
    start_run(s1, "deleted-while-running", script, "w1")
    pid = read_pid(pid_file, s1)
    deleted = s1.http.delete("/v1/jobs/deleted-while-running")
    assert deleted.status_code == 200, deleted.text
    # Nothing can stop it through the API any more: the job is gone.
    busy = s1.http.get("/v1/busy").json()
    assert not [b for b in busy if b["job_name"] == "deleted-while-running"]
    try:
        # Three heartbeat rounds are plenty for the agent to hear of it.
        s1.wait_for("the deleted job's process ends", lambda: not pid_alive(pid), 12)
    finally:
        kill_pid_in(pid_file)


def test_recreated_forbid_job_neither_overlaps_nor_inherits_the_old_run(
    mesh: list[AgentProcess], tmp_path: Path
) -> None:
    s1, s2 = mesh[0], by_name(mesh, "s2")
    name = "recreated-forbid"
    marks = tmp_path / "marks"
    # Ticks every 0.1 s show how long each run was alive (a run stopped by
    # the delete is SIGKILLed and writes no end mark).
    command = (
        f"echo start-$CRONMESH_EXECUTION_ID >> {marks}; "
        f"for i in $(seq 50); do echo tick-$CRONMESH_EXECUTION_ID >> {marks}; "
        f"sleep 0.1; done; echo end-$CRONMESH_EXECUTION_ID >> {marks}"
    )
    job = shell_job(
        name, command, tags={"id": "w1"}, config={"shell": "true"}, concurrency="forbid"
    )
    assert s1.post_job(job).status_code == 201
    old = s1.http.post(f"/v1/jobs/{name}/run")
    assert old.status_code == 202, old.text
    old_id = old.headers["X-Execution-Id"]
    s1.wait_for("the old run started", lambda: marks.exists())
    assert s1.http.delete(f"/v1/jobs/{name}").status_code == 200
    assert s1.post_job(job).status_code == 201
    new = s2.http.post(f"/v1/jobs/{name}/run")
    assert new.status_code == 202, new.text
    new_id = new.headers["X-Execution-Id"]
    s1.wait_for(
        "the new run ended",
        lambda: f"end-{new_id}" in marks.read_text(),
        30,
    )
    time.sleep(2)  # a report of the old run would reach the leader by now
    history = {e["id"] for e in s1.executions(name)}
    lines = marks.read_text().split()
    # Never two live runs of a forbid job at once: the old one stopped (or
    # ended) before the new one started.
    old_lines = [i for i, line in enumerate(lines) if line.endswith(old_id)]
    assert max(old_lines) < lines.index(f"start-{new_id}"), lines
    # The re-created job's history holds its own runs only.
    assert old_id not in history, history


def test_dependent_runs_after_a_retry_succeeds_on_another_node(
    mesh: list[AgentProcess], tmp_path: Path
) -> None:
    s1 = mesh[0]
    flag = tmp_path / "first-node"
    # Fails on whichever node ran first, succeeds anywhere else.
    command = (
        f"me=${{CRONMESH_EXECUTION_ID##*-}}; "
        f"[ -e {flag} ] || echo $me > {flag}; "
        f'if [ "$(cat {flag})" = "$me" ]; then echo fail-on-$me; exit 1; fi; '
        "echo ok-on-$me"
    )
    parent = shell_job(
        "any-node-parent",
        command,
        tags={"role": "worker:1"},
        config={"shell": "true"},
        retries=8,
        retry_any_node=True,
        retry_backoff={"initial": "200ms", "max": "200ms"},
    )
    child = shell_job("any-node-child", "echo child", parent_job="any-node-parent")
    assert s1.post_job(parent).status_code == 201
    assert s1.post_job(child).status_code == 201
    assert s1.http.post("/v1/jobs/any-node-parent/run").status_code == 202

    def succeeded() -> list[dict[str, Any]]:
        return [e for e in s1.executions("any-node-parent") if e["success"]]

    runs = s1.wait_for("a successful attempt", succeeded, 30)
    nodes = {e["node_name"] for e in s1.executions("any-node-parent")}
    if len(nodes) < 2:  # 1 in 256: every retry drew the failing node
        pytest.skip("all retries landed on the first node")
    assert runs[0]["attempt"] > 1
    # The parent's group ended in success: its dependent runs once.
    s1.finished("any-node-child", count=1, timeout=10)
    assert s1.http.get("/v1/jobs/any-node-parent").json()["status"] == "success"


def test_paused_leader_does_not_fail_healthy_runs_when_it_resumes(
    tmp_path: Path,
) -> None:
    nodes = start_mesh(tmp_path, "--execution-timeout", "8")
    pid_file = tmp_path / "pid"
    try:
        servers = nodes[:3]
        leader = leader_of(servers)
        job = shell_job(
            "steady",
            f"echo $$ > {pid_file}; exec sleep 50",
            tags={"id": "w1"},
            config={"shell": "true"},
        )
        assert leader.post_job(job).status_code == 201
        run = leader.http.post("/v1/jobs/steady/run")
        assert run.status_code == 202, run.text
        exec_id = run.headers["X-Execution-Id"]
        time.sleep(4)  # w1 has sent a heartbeat to this leader
        assert leader.proc is not None
        leader.proc.send_signal(signal.SIGSTOP)
        try:
            survivors = [n for n in servers if n is not leader]
            new_leader = leader_of(survivors)
            time.sleep(12)  # longer than --execution-timeout; w1 reports on
            assert execution(new_leader, "steady", exec_id)["finished_at"] is None
        finally:
            leader.proc.send_signal(signal.SIGCONT)
        time.sleep(6)
        found = execution(new_leader, "steady", exec_id)
        # w1 stayed alive and reported all along: the run must still be going.
        assert found["finished_at"] is None, found["output"]
    finally:
        stop_all(nodes)
        kill_pid_in(pid_file)


def test_retry_follows_the_tags_the_job_has_now(mesh: list[AgentProcess]) -> None:
    s2 = by_name(mesh, "s2")

    def job(target: str) -> dict[str, Any]:
        return shell_job(
            "retagged",
            "exit 1",
            tags={"id": target},
            retries=1,
            retry_backoff={"initial": "4s"},
        )

    assert s2.post_job(job("w1")).status_code == 201
    assert s2.http.post("/v1/jobs/retagged/run").status_code == 202
    s2.finished("retagged", count=1)
    # Before the retry: the job now says it runs on w2 only.
    assert s2.post_job(job("w2")).status_code in (200, 201)
    runs = s2.finished("retagged", count=2, timeout=20)
    retry = next(r for r in runs if r["attempt"] == 2)
    assert retry["node_name"] == "w2", retry


def test_stored_output_says_when_it_was_cut(mesh: list[AgentProcess]) -> None:
    s3 = by_name(mesh, "s3")
    # 600,000 bytes: more than the default --max-output of 256,000.
    job = shell_job(
        "big-output",
        "head -c 600000 /dev/zero | tr '\\0' x; echo; echo END",
        tags={"id": "w2"},
        config={"shell": "true"},
    )
    assert s3.post_job(job).status_code == 201
    assert s3.http.post("/v1/jobs/big-output/run").status_code == 202
    done = s3.finished("big-output")[0]
    assert done["success"] is True and done["output"].endswith("END\n")
    assert "bytes cut" in done["output"].splitlines()[0], done["output"][:80]


def test_following_a_fast_large_output_says_what_it_skipped(
    mesh: list[AgentProcess],
) -> None:
    s1, s3 = mesh[0], by_name(mesh, "s3")
    script = "sleep 2; head -c 3000000 /dev/zero | tr '\\0' x; echo; echo END; sleep 1"
    exec_id = start_run(s1, "big-follow", script, "w2")
    follow = subprocess.run(
        [
            sys.executable,
            "-m",
            "cronmesh",
            "executions",
            "logs",
            "big-follow",
            exec_id,
            "--follow",
            "--address",
            s3.url,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert follow.returncode == 0, follow.stderr
    out = follow.stdout
    assert out.endswith("END\n"), out[-80:]
    # Either every byte arrived, or the stream says how many did not.
    assert len(out) > 3_000_000 or "bytes cut" in out, (len(out), out[:80])


def test_the_cut_output_of_a_running_execution_says_so(
    mesh: list[AgentProcess], tmp_path: Path
) -> None:
    s3 = by_name(mesh, "s3")
    pid_file = tmp_path / "pid"
    job = shell_job(
        "big-running",
        f"echo $$ > {pid_file}; head -c 600000 /dev/zero | tr '\\0' x; "
        "echo; echo MID; exec sleep 40",
        tags={"id": "w2"},
        config={"shell": "true"},
    )
    assert s3.post_job(job).status_code == 201
    run = s3.http.post("/v1/jobs/big-running/run")
    assert run.status_code == 202, run.text
    exec_id = run.headers["X-Execution-Id"]
    path = f"/v1/jobs/big-running/executions/{exec_id}"
    try:
        # s3 asks w2, which runs it, for the output so far.
        s3.wait_for(
            "the output so far",
            lambda: (
                execution(s3, "big-running", exec_id)
                .get("output", "")
                .endswith("MID\n")
            ),
        )
        for output in (
            execution(s3, "big-running", exec_id)["output"],
            s3.http.get(f"{path}/output").text,
        ):
            marker, kept = output.split("\n", 1)
            assert marker.startswith("[... ") and marker.endswith(" bytes cut ...]")
            cut = int(marker.split()[1])
            assert cut + len(kept.encode()) == 600_000 + len("\nMID\n")
            assert kept.endswith("x\nMID\n")
    finally:
        s3.http.post(f"{path}/kill")
        kill_pid_in(pid_file)


def test_each_successful_parent_group_triggers_its_dependent(
    mesh: list[AgentProcess], tmp_path: Path
) -> None:
    s1 = mesh[0]
    flag = tmp_path / "first"
    # The first run is slow, the second quick: they succeed out of order.
    parent = shell_job(
        "overtaken-parent",
        f"if [ -e {flag} ]; then echo quick; else touch {flag}; sleep 4; echo slow; fi",
        tags={"id": "w1"},
        config={"shell": "true"},
    )
    child = shell_job(
        "overtaken-child",
        "echo child",
        parent_job="overtaken-parent",
        tags={"id": "w2"},
    )
    assert s1.post_job(parent).status_code == 201
    assert s1.post_job(child).status_code == 201
    assert s1.http.post("/v1/jobs/overtaken-parent/run").status_code == 202
    s1.wait_for("the slow run started", flag.exists)
    assert s1.http.post("/v1/jobs/overtaken-parent/run").status_code == 202

    def both_done() -> list[dict[str, Any]]:
        runs = s1.executions("overtaken-parent")
        return runs if len(runs) == 2 and all(r["finished_at"] for r in runs) else []

    parents = s1.wait_for("both parent runs ended", both_done, 20)
    assert all(run["success"] for run in parents), parents

    # Two successful parent groups: a dependent run for each.
    def child_groups() -> int:
        return len({r["group"] for r in s1.executions("overtaken-child")})

    s1.wait_for("a dependent run per parent group", lambda: child_groups() >= 2, 10)


def test_follow_ends_when_the_run_is_declared_lost(
    mesh: list[AgentProcess], tmp_path: Path
) -> None:
    s1, s2, w2 = mesh[0], by_name(mesh, "s2"), by_name(mesh, "w2")
    pid_file = tmp_path / "pid"
    script = f"echo $$ > {pid_file}; echo started; exec sleep 60"
    exec_id = start_run(s1, "follow-lost", script, "w2")
    s2.wait_for(
        "the run started",
        lambda: "started" in execution(s2, "follow-lost", exec_id).get("output", ""),
    )
    follow = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cronmesh",
            "executions",
            "logs",
            "follow-lost",
            exec_id,
            "--follow",
            "--address",
            s2.url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert w2.proc is not None
    w2.proc.send_signal(signal.SIGSTOP)  # w2 stops answering
    try:
        s2.wait_for(
            "the run recorded failed",
            lambda: execution(s2, "follow-lost", exec_id).get("finished_at"),
            30,
        )
        # The run is over for the cluster; w2 is still silent.
        try:
            follow.wait(10)
        except subprocess.TimeoutExpired:
            follow.kill()
            follow.wait(5)
        assert follow.returncode == 0, follow.stderr.read() if follow.stderr else ""
    finally:
        w2.proc.send_signal(signal.SIGCONT)
        if follow.poll() is None:
            follow.kill()
        kill_pid_in(pid_file)
        s1.wait_for(
            "w2 alive again",
            lambda: all(
                m["statusText"] == "alive" for m in s1.http.get("/v1/members").json()
            ),
            30,
        )
