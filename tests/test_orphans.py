"""A job's processes that outlive a `kill -9` of their agent are stopped when
it restarts, and only those: a recycled pid is never signalled."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest
from conftest import AgentProcess, shell_job

from cronmesh.core.orphans import (
    Orphan,
    ProcessMark,
    ProcessMarker,
    find_orphan,
    mark_process,
    stop_orphans,
)


def running(pid: int) -> bool:
    """True while `pid` runs; a zombie (killed, not yet reaped) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


def wait_file(path: Path, node: AgentProcess) -> int:
    text = node.wait_for(f"{path} written", lambda: path.exists() and path.read_text())
    return int(str(text).strip())


def start_orphan_job(node: AgentProcess, tmp_path: Path) -> tuple[str, int, int]:
    """Run a job whose shell and background `sleep` both write their pid;
    return (execution id, shell pid, sleep pid)."""
    leader, child = tmp_path / "leader.pid", tmp_path / "child.pid"
    command = f"echo $$ > {leader}; sleep 60 & echo $! > {child}; wait"
    node.post_job(shell_job("orphan", command, config={"shell": "true"}))
    response = node.http.post("/v1/jobs/orphan/run")
    assert response.status_code == 202, response.text
    exec_id = response.headers["X-Execution-Id"]
    pids = wait_file(leader, node), wait_file(child, node)
    # The agent writes a run's mark up to half a second after the start.
    node.wait_for("the run's mark", lambda: exec_id in outbox_marks(node.data_dir))
    return exec_id, *pids


def finished_run(node: AgentProcess, exec_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        for run in node.executions("orphan"):
            if run["id"] == exec_id and run["finished_at"]:
                return run
        return None

    return node.wait_for("the interrupted run recorded", done, 20)  # type: ignore[no-any-return]


def outbox_marks(data_dir: Path) -> dict[str, dict[str, Any]]:
    env = lmdb.open(str(data_dir / "outbox"), max_dbs=4, subdir=True)
    try:
        db = env.open_db(b"procs", create=False)
        with env.begin() as txn:
            return {k.decode(): json.loads(v) for k, v in txn.cursor(db=db)}
    finally:
        env.close()


def rewrite_mark(data_dir: Path, exec_id: str, mark: dict[str, Any] | None) -> None:
    """Replace (or with None, delete) the run's mark in a dead agent's outbox."""
    env = lmdb.open(str(data_dir / "outbox"), max_dbs=4, subdir=True)
    try:
        db = env.open_db(b"procs", create=False)
        with env.begin(write=True) as txn:
            if mark is None:
                assert txn.delete(exec_id.encode(), db=db)
            else:
                txn.put(exec_id.encode(), json.dumps(mark).encode(), db=db)
    finally:
        env.close()


@pytest.fixture
def spare_pids() -> Iterator[list[int]]:
    """Pids a test started or left running; SIGKILLed at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if running(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("marked", [True, False], ids=["marked", "unmarked"])
def test_restart_stops_the_process_group_of_an_interrupted_run(
    agent: AgentProcess, tmp_path: Path, spare_pids: list[int], marked: bool
) -> None:
    exec_id, leader, child = start_orphan_job(agent, tmp_path)
    spare_pids += [leader, child]
    agent.kill9()
    assert running(leader) and running(child), "the job was expected to outlive"
    if not marked:
        # As if the agent died before it wrote the mark: found by environment.
        rewrite_mark(agent.data_dir, exec_id, None)
    agent.start()
    run = finished_run(agent, exec_id)
    assert not running(leader) and not running(child)
    assert run["success"] is False
    assert "interrupted" in run["output"]
    assert f"pgid {leader}) was still running and was stopped" in run["output"]
    assert "stopping orphaned process group" in agent.log()


def test_restart_leaves_a_recycled_pid_alone(
    agent: AgentProcess, tmp_path: Path, spare_pids: list[int]
) -> None:
    exec_id, leader, child = start_orphan_job(agent, tmp_path)
    spare_pids += [leader, child]
    agent.kill9()
    mark = outbox_marks(agent.data_dir)[exec_id]
    assert mark["pid"] == leader
    # The run's processes end; an unrelated process group leader takes the
    # recorded pid's place (its own start time, no execution id).
    os.killpg(leader, signal.SIGKILL)
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    spare_pids.append(stranger.pid)
    rewrite_mark(agent.data_dir, exec_id, {**mark, "pid": stranger.pid})
    agent.start()
    run = finished_run(agent, exec_id)
    assert "interrupted" in run["output"] and "was stopped" not in run["output"]
    assert running(stranger.pid)
    assert f"not stopping pid={stranger.pid}" in agent.log()
    stranger.kill()
    stranger.wait()


# -- the rules, on processes this test starts (no agent)


def spawn_group(exec_id: str | None, script: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "CRONMESH_EXECUTION_ID"}
    if exec_id is not None:
        env["CRONMESH_EXECUTION_ID"] = exec_id
    return subprocess.Popen(["/bin/sh", "-c", script], env=env, start_new_session=True)


def wait_until(predicate: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_find_orphan_needs_the_recorded_start_time() -> None:
    proc = spawn_group("e1", "sleep 60")
    try:
        mark = mark_process(proc.pid)
        assert mark is not None
        found = find_orphan("e1", mark)
        assert found is not None and found.pgid == proc.pid
        assert proc.pid in found.pids
        earlier = ProcessMark(mark.pid, mark.start_ticks - 1, mark.boot_id)
        assert find_orphan("e1", earlier) is None
        other_boot = ProcessMark(mark.pid, mark.start_ticks, "another-boot")
        assert find_orphan("e1", other_boot) is None
        # The environment names another execution: not that run's process.
        assert find_orphan("e2", mark) is None
    finally:
        proc.kill()
        proc.wait()


def test_find_orphan_without_leader_needs_the_execution_id(tmp_path: Path) -> None:
    # The shell exits at once; its `sleep` stays in the group.
    pidfile = tmp_path / "member.pid"
    ours = spawn_group("e3", f"sleep 60 & echo $! > {pidfile}")
    mark = mark_process(ours.pid)
    assert mark is not None
    ours.wait()
    wait_until(lambda: pidfile.exists() and pidfile.read_text(), "member pid")
    member = int(pidfile.read_text())
    pidfile.unlink()
    stranger = spawn_group(None, f"sleep 60 & echo $! > {pidfile}")
    stranger_mark = mark_process(stranger.pid)
    assert stranger_mark is not None
    stranger.wait()
    wait_until(lambda: pidfile.exists() and pidfile.read_text(), "stranger pid")
    other = int(pidfile.read_text())
    try:
        found = find_orphan("e3", mark)
        assert found is not None and found.pids == [member]
        assert find_orphan("e3", stranger_mark) is None
        # No mark at all: found by the environment alone.
        by_env = find_orphan("e3", None)
        assert by_env is not None and by_env.pgid == ours.pid
    finally:
        for pid in (member, other):
            os.kill(pid, signal.SIGKILL)


def test_stop_orphans_escalates_to_sigkill(tmp_path: Path) -> None:
    pidfile = tmp_path / "stubborn.pid"
    # The trap makes the shell and its sleep ignore SIGTERM.
    stubborn = spawn_group("e4", f"trap '' TERM; sleep 60 & echo $! > {pidfile}; wait")
    polite = spawn_group("e5", "sleep 60")
    try:
        wait_until(lambda: pidfile.exists() and pidfile.read_text(), "sleep's pid")
        sleeper = int(pidfile.read_text())
        orphans = [
            Orphan("e4", stubborn.pid, [stubborn.pid]),
            Orphan("e5", polite.pid, [polite.pid]),
        ]
        how = asyncio.run(stop_orphans(orphans, grace=0.5))
        assert how == {"e4": "SIGKILL after 0.5s", "e5": "SIGTERM"}
        assert stubborn.wait(5) == -signal.SIGKILL
        assert polite.wait(5) == -signal.SIGTERM
        wait_until(lambda: not running(sleeper), "the stubborn group's sleep gone")
    finally:
        for proc in (stubborn, polite):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_mark_process_of_a_gone_pid_is_none() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert mark_process(proc.pid) is None


def test_process_marker_marks_only_runs_that_last() -> None:
    lasting = spawn_group("e6", "sleep 60")
    ended = spawn_group("e7", "sleep 60")
    reaped = spawn_group("e8", "sleep 60")
    written: dict[str, ProcessMark] = {}

    async def scenario() -> None:
        marker = ProcessMarker(lambda i, m: written.__setitem__(i, m), delay=0.05)
        marker.note("e6", lasting.pid, lambda: False)
        marker.note("e7", ended.pid, lambda: False)
        marker.note("e8", reaped.pid, lambda: True)
        marker.drop("e7")  # the run ended before its mark was due
        for _ in range(100):
            await asyncio.sleep(0.02)
            if "e6" in written:
                break
        await asyncio.sleep(0.1)  # room for a wrong write of e7 or e8
        marker.close()

    try:
        asyncio.run(scenario())
        assert set(written) == {"e6"}
        assert written["e6"] == mark_process(lasting.pid)
    finally:
        for proc in (lasting, ended, reaped):
            proc.kill()
            proc.wait()
