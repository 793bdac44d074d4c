"""Breaking staged runs (docs/operations.md, "Staged runs") with real agents.

A scheduled run of a non-forbid job is committed and handed over up to a
second before its instant and held at a gate until then. These tests aim at
what that lead second can get wrong: a run started early, twice or never, a
job changed or killed within the second, a leader or an agent dying in it,
and a program the gate's shell treats differently from a direct start.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProcess, shell_job
from test_distributed import leader_of, start_mesh, stop_all

from cronmesh.core.commitlog import LocalLog
from cronmesh.core.dispatcher import Dispatcher
from cronmesh.core.fsm import StateMachine, encode_command
from cronmesh.core.runner import Runner
from cronmesh.storage.env import DataDir
from cronmesh.storage.state import StateStore


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def held(node: AgentProcess, job: str) -> list[dict[str, Any]]:
    """The job's runs `node` lists as running whose instant is still ahead."""
    now = datetime.now(UTC)
    busy = node.http.get("/v1/busy")
    assert busy.status_code == 200, busy.text
    return [
        run
        for run in busy.json()
        if run["job_name"] == job and ts(run["started_at"]) > now
    ]


def wait_held(node: AgentProcess, job: str) -> dict[str, Any]:
    return dict(node.wait_for(f"a held run of {job}", lambda: held(node, job))[0])


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def gate_shells(marker: str) -> list[int]:
    """Pids of live processes whose command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and b"cronmesh-gate" in cmdline:
            found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    base = tmp_path_factory.mktemp("staged-node")
    agent = AgentProcess(base / "data", name="n1").start()
    yield agent
    agent.stop()


def test_a_job_deleted_and_recreated_is_staged_once_per_instant(
    node: AgentProcess,
) -> None:
    # A daily 6-field cron whose instant is 3 s away: the heap item of the
    # deleted job stayed valid for the new one (both had generation 0), so
    # at the instant's lead both popped and the second took the *next*
    # instant, a day ahead, and staged it (on a remote worker it would have
    # started after MAX_START_IN = 60 s, a day early). Fixed.
    at = datetime.now(UTC) + timedelta(seconds=3)
    cron = f"{at.second} {at.minute} {at.hour} * * *"
    job = shell_job("recreated", "true", cron, timezone="UTC")
    assert node.post_job(job).status_code == 201
    assert node.http.delete("/v1/jobs/recreated").status_code == 200
    assert node.post_job(job).status_code == 201
    node.finished("recreated", 1)
    time.sleep(0.5)  # a second take, if any, happens at the same turn
    runs = node.executions("recreated")
    assert [ts(run["scheduled_at"]) for run in runs] == [at.replace(microsecond=0)]
    assert node.http.delete("/v1/jobs/recreated").status_code == 200


def test_an_edit_in_the_lead_second_runs_the_old_definition_once(
    node: AgentProcess, tmp_path: Path
) -> None:
    out = tmp_path / "edit.txt"

    def job(version: str) -> dict[str, Any]:
        command = f"echo {version} $CRONMESH_EXECUTION_ID >> {out}"
        # A cron schedule: an edit plans from now, and the instant after
        # now is the staged one (an `@every` job restarts its interval).
        return shell_job("edited", command, "*/2 * * * * *", config={"shell": "true"})

    assert node.post_job(job("v1")).status_code == 201
    staged = wait_held(node, "edited")
    assert node.post_job(job("v2")).status_code == 201
    node.wait_for("a run of v2", lambda: any("v2" in x for x in lines_of(out)))
    node.http.post("/v1/jobs/edited/toggle")
    lines = lines_of(out)
    assert f"v1 {staged['id']}" in lines, lines
    ids = [line.split()[1] for line in lines]
    assert len(ids) == len(set(ids)), lines  # no execution ran twice
    # Every v2 run came after the staged one: the edit started nothing
    # under the staged fire.
    assert all(
        x.startswith("v2") for x in lines[lines.index(f"v1 {staged['id']}") + 1 :]
    )
    runs = node.executions("edited")
    instants = Counter(run["scheduled_at"] for run in runs)
    assert max(instants.values()) == 1, runs
    # The edit took the staged instant again, only to have it refused and
    # logged at info as a run "not started" (a run that did start). Fixed.
    assert "run not started job=edited" not in node.log()
    node.wait_for(
        "no run of the job left running",
        lambda: not [r for r in node.executions("edited") if r["finished_at"] is None],
        10,
    )
    assert node.http.delete("/v1/jobs/edited").status_code == 200


def test_a_run_deleted_with_its_job_in_the_lead_second_never_starts(
    node: AgentProcess, tmp_path: Path
) -> None:
    # docs/operations.md said a delete in the last second leaves the staged
    # run to run; the agent stops every run of a deleted job, so it never
    # starts (the doc now says so).
    out = tmp_path / "deleted.txt"
    job = shell_job(
        "deleted", f"echo ran >> {out}", "@every 2s", config={"shell": "true"}
    )
    assert node.post_job(job).status_code == 201
    staged = wait_held(node, "deleted")
    assert node.http.delete("/v1/jobs/deleted").status_code == 200
    time.sleep(
        max(0.0, (ts(staged["started_at"]) - datetime.now(UTC)).total_seconds()) + 0.5
    )
    assert lines_of(out) == []
    assert gate_shells(str(out)) == []


def test_a_held_run_killed_before_its_instant_never_runs_and_ends_at_it(
    node: AgentProcess, tmp_path: Path
) -> None:
    out = tmp_path / "killed.txt"
    job = shell_job(
        "killed", f"echo ran >> {out}", "@every 3s", config={"shell": "true"}
    )
    assert node.post_job(job).status_code == 201
    staged = wait_held(node, "killed")
    kill = node.http.post(f"/v1/jobs/killed/executions/{staged['id']}/kill")
    assert kill.status_code == 202, kill.text
    node.http.post("/v1/jobs/killed/toggle")

    def ended() -> dict[str, Any] | None:
        for run in node.executions("killed"):
            if run["id"] == staged["id"] and run["finished_at"]:
                return dict(run)
        return None

    run = node.wait_for("the killed run recorded", ended)
    assert run["success"] is False
    assert "killed" in run["output"]
    # It was recorded ending before it began (finished_at < started_at).
    assert ts(run["finished_at"]) >= ts(run["started_at"]), run
    time.sleep(
        max(0.0, (ts(staged["started_at"]) - datetime.now(UTC)).total_seconds()) + 0.3
    )
    assert lines_of(out) == []
    assert node.http.delete("/v1/jobs/killed").status_code == 200


def test_a_gated_program_fails_as_a_direct_start_does(
    node: AgentProcess, tmp_path: Path
) -> None:
    # The gate's shell ran a script without `#!` itself (execve says
    # ENOEXEC, dash then runs the file as a shell script), where a direct
    # start fails "Exec format error"; a script whose interpreter is
    # missing (or named with a CRLF line end) failed with the shell's
    # "exec: ...: not found" and exit 127.
    # Fixed: such programs are not gated.
    no_shebang = tmp_path / "no-shebang"
    no_shebang.write_text(f"echo ran >> {tmp_path / 'ran.txt'}\n")
    missing = tmp_path / "missing-interpreter"
    missing.write_text("#!/nonexistent/interpreter\necho hi\n")
    crlf = tmp_path / "crlf"  # the kernel looks for "/bin/sh\r"
    crlf.write_bytes(b"#!/bin/sh\r\necho hi\r\n")
    for script in (no_shebang, missing, crlf):
        script.chmod(0o755)
    names = {"gate-noshebang": no_shebang, "gate-missing": missing, "gate-crlf": crlf}
    for name, script in names.items():
        assert (
            node.post_job(shell_job(name, str(script), "@every 2s")).status_code == 201
        )
    for name in names:
        node.finished(name, 1)
        node.http.post(f"/v1/jobs/{name}/toggle")
        staged = node.executions(name)[-1]
        assert staged["trigger"] == "schedule"
        run = node.http.post(f"/v1/jobs/{name}/run")
        assert run.status_code == 202, run.text
        direct_id = run.headers["X-Execution-Id"]

        def direct(name: str = name, direct_id: str = direct_id) -> Any:
            done = [r for r in node.executions(name) if r["id"] == direct_id]
            return done[0] if done and done[0]["finished_at"] else None

        manual = node.wait_for("the direct run", direct)
        assert manual["success"] is False
        assert staged["success"] is False, staged
        assert staged["output"] == manual["output"]
        assert "cannot start" in manual["output"]
        assert node.http.delete(f"/v1/jobs/{name}").status_code == 200
    assert lines_of(tmp_path / "ran.txt") == []


def test_an_agent_killed_while_holding_a_run_runs_nothing_and_reports_it(
    agent_factory: Any, tmp_path: Path
) -> None:
    # A long lead (--stage-ahead 10, a daily instant 8 s away: staged 7.2 s
    # ahead) so that the restart reports the run before its instant: it was
    # recorded ending before it began. Fixed (Runner.recover).
    agent = agent_factory("--stage-ahead", "10", name="k9")
    out = tmp_path / "k9.txt"
    at = datetime.now(UTC) + timedelta(seconds=8)
    cron = f"{at.second} {at.minute} {at.hour} * * *"
    job = shell_job("k9", f"echo ran >> {out}", cron, config={"shell": "true"})
    job["timezone"] = "UTC"
    assert agent.post_job(job).status_code == 201
    staged = wait_held(agent, "k9")
    agent.wait_for("a process held at the gate", lambda: gate_shells(str(out)), 10)
    agent.kill9()
    agent.wait_for("the held shells gone", lambda: not gate_shells(str(out)), 10)
    agent.start()

    def reported() -> dict[str, Any] | None:
        for run in agent.executions("k9"):
            if run["id"] == staged["id"] and run["finished_at"]:
                return dict(run)
        return None

    run = agent.wait_for("the held run reported", reported)
    assert run["success"] is False
    assert "interrupted" in run["output"]
    assert ts(run["finished_at"]) >= ts(run["started_at"]), run
    wait = (ts(staged["started_at"]) - datetime.now(UTC)).total_seconds()
    time.sleep(max(0.0, wait) + 0.3)
    assert lines_of(out) == []


def test_a_leader_killed_in_the_lead_second_leaves_one_run_per_instant(
    tmp_path: Path,
) -> None:
    nodes = start_mesh(tmp_path)
    try:
        servers = nodes[:3]
        leader = leader_of(servers)
        out = tmp_path / "failover.txt"
        command = f"echo $CRONMESH_EXECUTION_ID >> {out}"
        job = shell_job(
            "failover",
            command,
            "@every 2s",
            tags={"id": "w1"},
            config={"shell": "true"},
        )
        assert leader.post_job(job).status_code == 201
        staged = wait_held(leader, "failover")
        leader.kill9()
        rest = [s for s in servers if s is not leader]
        new = leader_of(rest)
        new.wait_for(
            "the held run and two after it ran",
            lambda: staged["id"] in lines_of(out) and len(lines_of(out)) >= 3,
            30,
        )
        new.http.post("/v1/jobs/failover/toggle")
        lines = lines_of(out)
        assert len(lines) == len(set(lines)), lines  # no execution ran twice
        new.wait_for(
            "every run recorded finished",
            lambda: all(r["finished_at"] for r in new.executions("failover")),
            20,
        )
        runs = new.executions("failover")
        instants = Counter(run["scheduled_at"] for run in runs)
        assert max(instants.values()) == 1, runs
        by_id = {run["id"]: run for run in runs}
        assert by_id[staged["id"]]["success"] is True, by_id[staged["id"]]
    finally:
        stop_all(nodes)


def test_a_new_leader_does_not_reuse_the_id_of_a_run_staged_before_it(
    tmp_path: Path,
) -> None:
    # Staged runs start at the instant itself, so their execution ids
    # (start ns + node) collide for two jobs due at one instant on one node;
    # the dispatcher kept them apart in memory only. A new leader staging
    # job B at the instant the old one staged job A on the same node gave B
    # A's id: the node answered "running" (it has that id), B never ran and
    # its record stayed running. Fixed: a dispatcher that starts leading
    # learns the starts of the runs already staged.
    data = DataDir(tmp_path / "d")
    fsm = StateMachine(StateStore(data))
    out = tmp_path / "ran.txt"
    for name in ("a", "b"):
        job = shell_job(name, f"echo {name} >> {out}", config={"shell": "true"})
        index = fsm.store.applied_index() + 1
        fsm.apply_batch([(index, encode_command("set_job", job=job))])

    async def scenario() -> list[str]:
        log = LocalLog(fsm)
        runner = Runner("w1", log, max_output=1000)
        instant = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
        old = Dispatcher("w1", fsm.store, log, runner)
        first = await old.fire("a", fire_at=instant)
        old.active = False  # it lost the lead
        new = Dispatcher("w1", fsm.store, log, runner)
        new.active = True
        second = await new.fire("b", fire_at=instant)
        assert first.execution is not None and second.execution is not None
        ids = [first.execution.id, second.execution.id]
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not runner.running_ids() and lines_of(out):
                break
        await runner.stop(1.0)
        return ids

    try:
        ids = asyncio.run(scenario())
        assert ids[0] != ids[1], ids
        assert sorted(lines_of(out)) == ["a", "b"]
    finally:
        data.close()


def test_runs_of_one_instant_take_consecutive_microseconds(tmp_path: Path) -> None:
    # The search for a free start began at the instant for every run, so
    # the n-th run of an instant cost n lookups (8,000 runs of one instant:
    # 3.6 s of the leader's loop, inside the lead second). Now each instant
    # remembers where its next free start is; the ids stay distinct.
    data = DataDir(tmp_path / "d")
    try:
        fsm = StateMachine(StateStore(data))
        dispatcher = Dispatcher("s1", fsm.store, LocalLog(fsm), None)  # type: ignore[arg-type]
        base = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=5)
        instants = [base, base + timedelta(seconds=1)]
        starts: dict[datetime, list[datetime]] = {at: [] for at in instants}
        for i in range(6000):  # over the pruning threshold
            at = instants[i % 2]
            starts[at].append(dispatcher._staged_start(at))
        for at, got in starts.items():
            assert got == [at + timedelta(microseconds=k) for k in range(len(got))]
    finally:
        data.close()
