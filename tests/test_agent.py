"""A single real agent running real shell and http jobs, end to end."""

from __future__ import annotations

import http.server
import itertools
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess, shell_job


def _iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def test_every_second_job_fires_once_per_whole_second(agent: AgentProcess) -> None:
    agent.post_job(shell_job("tick", "echo tick", "@every 1s"))
    runs = agent.finished("tick", count=4, timeout=15)
    instants = [r["scheduled_at"] for r in runs]
    assert len(set(instants)) == len(instants), "an instant ran twice"
    for run in runs:
        assert "." not in run["scheduled_at"], "fire instants are whole seconds"
        assert run["output"] == "tick\n" and run["success"] is True
        started = datetime.fromisoformat(run["started_at"].replace("Z", "+00:00"))
        scheduled = datetime.fromisoformat(run["scheduled_at"].replace("Z", "+00:00"))
        assert timedelta(0) <= started - scheduled < timedelta(seconds=1)
    job = agent.http.get("/v1/jobs/tick").json()
    assert job["status"] == "success" and job["success_count"] >= 4


def test_failure_records_exit_code_and_counts(agent: AgentProcess) -> None:
    agent.post_job(
        shell_job("boom", "echo out; echo err >&2; exit 3", config={"shell": "true"})
    )
    assert agent.http.post("/v1/jobs/boom/run").status_code == 202
    run = agent.finished("boom")[0]
    assert run["success"] is False
    assert run["output"].startswith("out\nerr\n")
    assert "3" in run["output"].splitlines()[-1]
    job = agent.http.get("/v1/jobs/boom").json()
    assert job["status"] == "failed" and job["error_count"] == 1
    assert job["last_error"] is not None


def test_manual_run_answers_at_once_and_output_streams(agent: AgentProcess) -> None:
    agent.post_job(
        shell_job("slow", "echo first; sleep 3; echo second", config={"shell": "true"})
    )
    t0 = time.monotonic()
    response = agent.http.post("/v1/jobs/slow/run")
    assert response.status_code == 202 and time.monotonic() - t0 < 1.5
    exec_id = response.headers["X-Execution-Id"]
    live = agent.wait_for(
        "partial output",
        lambda: (
            agent.http.get(f"/v1/jobs/slow/executions/{exec_id}").json()["output"]
            == "first\n"
        ),
    )
    assert live
    busy = agent.http.get("/v1/busy").json()
    assert [b["id"] for b in busy] == [exec_id]
    assert agent.finished("slow")[0]["output"] == "first\nsecond\n"
    assert agent.http.get("/v1/busy").json() == []


def test_forbid_refuses_a_manual_run_while_running(agent: AgentProcess) -> None:
    agent.post_job(shell_job("solo", "sleep 3", concurrency="forbid"))
    first = agent.http.post("/v1/jobs/solo/run")
    second = agent.http.post("/v1/jobs/solo/run")
    assert first.status_code == 202
    assert second.status_code == 409
    assert second.json()["execution_id"] == first.headers["X-Execution-Id"]
    agent.finished("solo")
    assert agent.http.post("/v1/jobs/solo/run").status_code == 202


def test_forbid_skips_scheduled_fires_while_running(agent: AgentProcess) -> None:
    agent.post_job(shell_job("overlap", "sleep 2.5", "@every 1s", concurrency="forbid"))
    time.sleep(7)
    agent.http.post("/v1/jobs/overlap/toggle")
    runs = agent.executions("overlap")
    spans = sorted((r["started_at"], r["finished_at"] or "9") for r in runs)
    assert len(spans) >= 2
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, f"overlapping executions: {spans}"


def test_J03_child_runs_after_parent_success_only(agent: AgentProcess) -> None:
    agent.post_job(shell_job("job1", "echo hello"))
    agent.post_job(
        {
            "name": "job2",
            "parent_job": "job1",
            "executor": "shell",
            "executor_config": {"command": "echo bye"},
        }
    )
    assert agent.http.get("/v1/jobs/job1").json()["dependent_jobs"] == ["job2"]
    assert agent.http.post("/v1/jobs/job1").status_code == 202
    child_runs = agent.finished("job2")
    assert len(child_runs) == 1 and child_runs[0]["output"] == "bye\n"
    assert child_runs[0]["trigger"] == "dependent"
    agent.post_job(shell_job("job1", "false"))
    agent.http.post("/v1/jobs/job1/run")
    agent.finished("job1", count=2)
    time.sleep(1.5)
    assert len(agent.executions("job2")) == 1


class _Counter(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_POST(self) -> None:
        _Counter.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        return


@pytest.fixture
def http_server() -> Iterator[str]:
    _Counter.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_J06_retries_are_extra_attempts_in_one_group(
    agent_factory: Any, http_server: str
) -> None:
    agent = agent_factory("--tag", "role=worker")
    flaky = {
        "name": "flaky",
        "schedule": "@manually",
        "retries": 5,
        "tags": {"role": "worker:1"},
        "executor": "http",
        "executor_config": {
            "method": "POST",
            "url": "http://127.0.0.1:1/closed-port",
            "expectCode": "200",
            "timeout": "15",
        },
    }
    at = _iso((datetime.now(UTC) + timedelta(seconds=3)).replace(microsecond=0))
    once = {
        "name": "once",
        "schedule": f"@at {at}",
        "retries": 1,
        "tags": {"role": "worker:1"},
        "executor": "http",
        "executor_config": {
            "method": "POST",
            "url": f"{http_server}/ok",
            "expectCode": "200",
            "timeout": "30",
        },
    }
    assert agent.post_job(flaky).status_code == 201
    assert agent.post_job(once).status_code == 201
    agent.http.post("/v1/jobs/flaky/run")
    runs = agent.finished("flaky", count=6, timeout=40)
    assert sorted(r["attempt"] for r in runs) == [1, 2, 3, 4, 5, 6]
    assert len({r["group"] for r in runs}) == 1
    assert not any(r["success"] for r in runs)
    time.sleep(2)
    assert len(agent.executions("flaky")) == 6
    assert agent.http.get("/v1/jobs/flaky").json()["error_count"] == 6
    done = agent.finished("once", timeout=15)
    time.sleep(1.5)
    assert len(agent.executions("once")) == 1 and done[0]["success"] is True
    assert done[0]["attempt"] == 1
    assert _Counter.hits == ["/ok"]


def test_job_for_other_tags_is_recorded_failed_not_skipped(agent: AgentProcess) -> None:
    agent.post_job(shell_job("elsewhere", "true", tags={"role": "gpu"}))
    agent.http.post("/v1/jobs/elsewhere/run")
    run = agent.finished("elsewhere")[0]
    assert run["success"] is False and "no alive node in region" in run["output"]


def test_J09_timeout_kills_the_process_group_and_frees_the_job(
    agent: AgentProcess,
) -> None:
    # Unique per run: pgrep must not see another test run's sleeps.
    marker = f"100.{os.getpid()}{time.monotonic_ns() % 1000}"
    agent.post_job(
        shell_job(
            "spawner",
            f"sleep {marker} & sleep {marker}; wait",
            concurrency="forbid",
            config={"shell": "true", "timeout": "2s"},
        )
    )
    t0 = time.monotonic()
    agent.http.post("/v1/jobs/spawner/run")
    run = agent.finished("spawner", timeout=15)[0]
    assert time.monotonic() - t0 < 8
    assert run["success"] is False and "timed out" in run["output"].lower()
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True)
    assert left.stdout == b"", "a grandchild of the timed-out job survived"
    assert agent.http.get("/v1/busy").json() == []
    assert agent.http.post("/v1/jobs/spawner/run").status_code == 202


def test_disabled_starts_at_expires_at_and_ephemeral(agent: AgentProcess) -> None:
    future = _iso(datetime.now(UTC) + timedelta(hours=1))
    past = _iso(datetime.now(UTC) - timedelta(hours=1))
    agent.post_job(shell_job("off", "true", "@every 1s", disabled=True))
    agent.post_job(shell_job("later", "true", "@every 1s", starts_at=future))
    agent.post_job(shell_job("expired", "true", "@every 1s", expires_at=past))
    agent.post_job(shell_job("oneshot", "true", "@every 1s", ephemeral=True))
    agent.wait_for(
        "ephemeral job deleted",
        lambda: agent.http.get("/v1/jobs/oneshot").status_code == 404,
    )
    time.sleep(2.5)
    for name in ("off", "later", "expired"):
        assert agent.executions(name) == [], name


def test_retention_and_output_cap(agent_factory: Any) -> None:
    agent = agent_factory("--max-executions", "3", "--max-output", "2000")
    agent.post_job(shell_job("big", "seq 1 2000", "@every 1s"))
    agent.finished("big", count=3, timeout=10)
    time.sleep(2.5)
    runs = agent.executions("big")
    assert len(runs) <= 3
    finished = [r for r in runs if r["finished_at"]]
    assert finished and all(len(r["output"].encode()) <= 2000 for r in finished)
    assert finished[0]["output"].endswith("1999\n2000\n")
    limited = next(
        r
        for r in agent.http.get(
            "/v1/jobs/big/executions", params={"output_size_limit": "10"}
        ).json()
        if r["finished_at"]  # the newest may be staged for its instant
    )
    assert limited["output_truncated"] is True and len(limited["output"]) == 10
    # A limit that holds a marker gets one, with every byte cut since the run.
    marked = next(
        r["output"]
        for r in agent.http.get(
            "/v1/jobs/big/executions", params={"output_size_limit": "100"}
        ).json()
        if r["finished_at"]
    )
    marker, kept = marked.split("\n", 1)
    assert len(marked.encode()) <= 100 and kept.endswith("1999\n2000\n")
    whole = sum(len(f"{i}\n") for i in range(1, 2001))
    assert marker == f"[... {whole - len(kept)} bytes cut ...]"


def test_J01_kill_9_mid_run_then_restart(agent: AgentProcess) -> None:
    agent.post_job(
        shell_job("forbid-restart", "sleep 50", "@every 2s", concurrency="forbid")
    )
    agent.wait_for("a running execution", lambda: agent.http.get("/v1/busy").json())
    agent.kill9()
    # (the restart stops the orphaned `sleep 50`: tests/test_orphans.py)
    agent.start()
    assert agent.http.get("/v1/jobs/forbid-restart").status_code == 200

    def interrupted() -> list[dict[str, Any]]:
        return [
            r
            for r in agent.executions("forbid-restart")
            if r["finished_at"] and "interrupted" in r["output"]
        ]

    first = agent.wait_for("interrupted execution marked failed", interrupted, 10)
    assert first[0]["success"] is False
    agent.wait_for(
        "a new execution",
        lambda: [
            r
            for r in agent.executions("forbid-restart")
            if r["id"] != first[0]["id"] and r["started_at"] > first[0]["started_at"]
        ],
        10,
    )
    running = [r for r in agent.executions("forbid-restart") if not r["finished_at"]]
    assert len(running) <= 1


def test_jobs_survive_restart_and_at_job_never_reruns(agent: AgentProcess) -> None:
    at = _iso((datetime.now(UTC) + timedelta(seconds=2)).replace(microsecond=0))
    agent.post_job(shell_job("at-once", "echo once", f"@at {at}"))
    agent.post_job(shell_job("keep", "true", "0 0 0 1 1 *"))
    agent.finished("at-once", timeout=10)
    assert agent.stop() == 0
    agent.start()
    assert {j["name"] for j in agent.http.get("/v1/jobs").json()} == {"at-once", "keep"}
    time.sleep(2)
    assert len(agent.executions("at-once")) == 1


def test_second_agent_on_the_same_data_dir_is_refused(
    agent: AgentProcess, agent_factory: Any
) -> None:
    other = agent_factory(name="intruder", data_dir=agent.data_dir, start=False)
    other.start(wait=False)
    assert other.proc is not None
    assert other.proc.wait(20) == 1
    assert "in use by another agent" in other.log()


def test_sigterm_waits_for_running_jobs_then_exits_0(
    agent: AgentProcess, tmp_path: Path
) -> None:
    out = tmp_path / "done.txt"
    agent.post_job(
        shell_job("finish-me", f"sleep 1; echo done > {out}", config={"shell": "true"})
    )
    agent.http.post("/v1/jobs/finish-me/run")
    agent.wait_for("running", lambda: agent.http.get("/v1/busy").json())
    assert agent.stop() == 0
    assert out.read_text() == "done\n"
    agent.start()
    runs = agent.executions("finish-me")
    assert len(runs) == 1 and runs[0]["success"] is True


def test_disabled_dependent_job_does_not_run(agent: AgentProcess) -> None:
    agent.post_job(shell_job("p", "true"))
    agent.post_job(
        {
            "name": "c",
            "parent_job": "p",
            "disabled": True,
            "executor": "shell",
            "executor_config": {"command": "true"},
        }
    )
    agent.http.post("/v1/jobs/p/run")
    agent.finished("p")
    time.sleep(1.5)
    assert agent.executions("c") == []
