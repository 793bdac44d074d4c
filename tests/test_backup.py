"""Backup and restore: the state machine's commands, the routes and the CLI."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from conftest import AgentProcess, shell_job
from test_cli import cli
from test_cluster import leader_of, start_cluster

from cronmesh.core.fsm import StateMachine, encode_command
from cronmesh.core.model import Execution
from cronmesh.storage.env import DataDir
from cronmesh.storage.snapshot import dump_state, load_state
from cronmesh.storage.state import StateStore


def state_of(node: AgentProcess) -> dict[str, Any]:
    """Every job (without the live `next`) and every execution of `node`."""
    jobs = node.http.get("/v1/jobs").json()
    for job in jobs:
        job.pop("next")
    return {
        "jobs": jobs,
        "executions": {
            j["name"]: sorted(node.executions(j["name"]), key=lambda e: e["id"])
            for j in jobs
        },
    }


def family() -> list[dict[str, Any]]:
    """A parent with two children, one of which fails, and a loner; each
    runs on one node (Dkron's `value:count` tag)."""
    one = {"tags": {"role": "dkron:1"}}
    return [
        shell_job("nightly", "echo parent-out", "0 0 3 * * *", retries=1, **one),
        {
            **shell_job("report", "echo child-out", **one),
            "schedule": "",
            "parent_job": "nightly",
        },
        {
            **shell_job("cleanup", "exit 3", **one),
            "schedule": "",
            "parent_job": "nightly",
        },
        shell_job(
            "loner", "echo alone", metadata={"k": "v"}, displayname="Loner", **one
        ),
    ]


def test_backup_of_a_cluster_restored_into_a_new_server_is_the_same(
    agent_factory: Any, tmp_path: Path
) -> None:
    source = start_cluster(agent_factory)
    leader = leader_of(source)
    for job in family():
        assert leader.post_job(job).status_code == 201
    for _ in range(2):
        assert leader.http.post("/v1/jobs/nightly/run").status_code == 202
        leader.finished("nightly", 1)
    assert leader.http.post("/v1/jobs/loner/run").status_code == 202
    for name, count in (("nightly", 2), ("report", 2), ("cleanup", 2), ("loner", 1)):
        leader.finished(name, count)
    follower = next(n for n in source if n is not leader)
    follower.wait_for(
        "the follower to have every result",
        lambda: state_of(follower) == state_of(leader),
    )
    expected = state_of(leader)
    assert {j["name"]: j["error_count"] for j in expected["jobs"]}["cleanup"] == 2

    # Taken from a follower: any server answers.
    target = tmp_path / "backup.json"
    taken = cli("backup", "--executions", "-o", str(target), address=follower.url)
    assert taken.returncode == 0, taken.stderr
    assert "4 jobs, 7 executions" in taken.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    document = json.loads(target.read_text())
    assert document["cronmesh_backup"] == 1 and len(document["jobs"]) == 4
    plain = cli("backup", address=follower.url)
    assert plain.returncode == 0, plain.stderr
    assert "executions" not in json.loads(plain.stdout)

    # Larger than gRPC's 4 MiB message limit: staged in parts through Raft.
    big = _big_backup(1000)
    assert len(json.dumps(big)) > 5 << 20
    response = follower.http.post(
        "/v1/restore", files={"file": json.dumps(big)}, timeout=120
    )
    assert response.status_code == 200, response.text
    assert response.json()["created"] == 1000
    assert response.json()["executions"] == 2000
    for node in source:
        node.wait_for(
            "the last job on every server",
            lambda n=node: (
                n.executions("bulk-00999")
                if n.http.get("/v1/jobs/bulk-00999").status_code == 200
                else None
            ),
        )
        found = sorted(node.executions("bulk-00999"), key=lambda e: e["id"])
        assert found == big["executions"]["bulk-00999"]
        total = node.http.get("/v1/jobs", params={"_end": "0"})
        assert total.headers["X-Total-Count"] == "1004"

    # The backup into a new server gives back the same jobs and executions.
    fresh = agent_factory(name="new")
    restored = cli("restore", str(target), "--json", address=fresh.url)
    assert restored.returncode == 0, restored.stderr
    answer = json.loads(restored.stdout)
    assert (answer["created"], answer["updated"], answer["executions"]) == (4, 0, 7)
    got = state_of(fresh)
    for job, want in zip(got["jobs"], expected["jobs"], strict=True):
        assert job == want
    assert got == expected

    # Counters go on from the restored values.
    assert fresh.http.post("/v1/jobs/loner/run").status_code == 202
    fresh.finished("loner", 2)
    loner = fresh.http.get("/v1/jobs/loner").json()
    assert loner["success_count"] == 2


def _big_backup(count: int) -> dict[str, Any]:
    """`count` jobs with two finished executions each (5.3 KB a job)."""
    jobs = []
    executions = {}
    for i in range(count):
        name = f"bulk-{i:05d}"
        jobs.append({**shell_job(name, f"echo {name}"), "success_count": 2})
        executions[name] = [
            {
                "id": f"{1_700_000_000_000_000_000 + k * 1000}-old-node",
                "job_name": name,
                "started_at": "2023-11-14T22:13:20" + (".000001Z" if k else "Z"),
                "finished_at": "2023-11-14T22:13:21Z",
                "success": True,
                "node_name": "old-node",
                "group": 1,
                "attempt": 1,
                "status": "success",
                "scheduled_at": None,
                "trigger": "manual",
                "output": f"{name} run {k}\n" + "x" * 2500,
                "output_truncated": False,
            }
            for k in range(2)
        ]
    return {"cronmesh_backup": 1, "jobs": jobs, "executions": executions}


def _post(node: AgentProcess, content: Any, **params: str) -> Any:
    body = content if isinstance(content, str) else json.dumps(content)
    return node.http.post("/v1/restore", files={"file": body}, params=params)


def test_a_bad_backup_is_refused_whole_and_nothing_is_written(
    agent: AgentProcess, tmp_path: Path
) -> None:
    assert agent.post_job(shell_job("base", "echo base")).status_code == 201
    kid = {**shell_job("kid", "true"), "schedule": "", "parent_job": "base"}
    assert agent.post_job(kid).status_code == 201
    assert agent.http.post("/v1/jobs/base/run").status_code == 202
    agent.finished("kid")
    before = state_of(agent)
    document = agent.http.get("/v1/backup", params={"executions": "1"}).text
    execution = json.loads(document)["executions"]["base"][0]
    fine = shell_job("fine", "true")  # valid, but in a file with a bad job
    cases = {
        "{not json": "invalid JSON",
        document[: len(document) // 2]: "truncated",
        json.dumps({"cronmesh_backup": 2, "jobs": []}): "version 2",
        json.dumps({"jobs": "nope"}): "expected a JSON array",
        json.dumps(
            [fine, {**shell_job("lost", "true"), "schedule": "", "parent_job": "ghost"}]
        ): "'ghost' is neither in the file nor in the cluster",
        json.dumps(
            [
                fine,
                {**shell_job("a", "true"), "schedule": "", "parent_job": "b"},
                {**shell_job("b", "true"), "schedule": "", "parent_job": "a"},
            ]
        ): "cycle through parents: a -> b -> a",
        # An existing job's parent made a child of its own child.
        json.dumps([{**shell_job("base", "true"), "parent_job": "kid"}]): (
            "cycle through parents: base -> kid -> base"
        ),
        json.dumps([fine, shell_job("odd", "true", "61 * * * *")]): "odd: schedule",
        json.dumps([fine, fine]): "fine: appears more than once",
        json.dumps(
            {
                "cronmesh_backup": 1,
                "jobs": [fine],
                "executions": {
                    "fine": [{**execution, "job_name": "fine", "id": "1-x"}]
                },
            }
        ): "does not match started_at and node_name",
        json.dumps(
            {
                "cronmesh_backup": 1,
                "jobs": [fine],
                "executions": {
                    "fine": [{**execution, "job_name": "fine", "finished_at": None}]
                },
            }
        ): "finished_at: required",
    }
    for content, problem in cases.items():
        response = _post(agent, content)
        assert response.status_code == 400, (problem, response.text)
        assert problem in response.json()["error"], response.text
        assert agent.http.get("/v1/jobs/fine").status_code == 404
    rejected = _post(agent, json.dumps([fine, shell_job("odd", "true", "@nope")]))
    assert [(r["name"], r["result"]) for r in rejected.json()["jobs"]] == [
        ("odd", "rejected")
    ]
    # One write larger than a Raft entry may be is refused, not replicated
    # forever into followers' gRPC limits.
    huge = agent.post_job(shell_job("huge", "echo " + "y" * (3 << 20)))
    assert huge.status_code == 400 and "Raft entry" in huge.json()["error"]
    assert state_of(agent) == before

    # The CLI: exit 2 and one line naming the problem; a table of rejections.
    cycle = tmp_path / "cycle.json"
    cycle.write_text(json.dumps([{**shell_job("base", "true"), "parent_job": "kid"}]))
    result = cli("restore", str(cycle), address=agent.url)
    assert result.returncode == 2 and "rejected" in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1
    assert "base -> kid -> base" in result.stderr
    assert state_of(agent) == before

    # A backup to a file that fails leaves no file, not even half of one.
    agent.stop()
    target = tmp_path / "out" / "never.json"
    target.parent.mkdir()
    result = cli("backup", "-o", str(target), address=agent.url)
    assert result.returncode == 1 and "cannot reach" in result.stderr
    assert list(target.parent.iterdir()) == []
    result = cli("restore", str(cycle), address=agent.url)
    assert result.returncode == 1


def dkron_job(name: str, **fields: Any) -> dict[str, Any]:
    """A job as Dkron's GET /v1/jobs shows it: nulls, Go zero times, `next`."""
    return {
        "id": name,
        "name": name,
        "displayname": "",
        "timezone": "",
        "schedule": "@every 1h",
        "owner": "ops",
        "owner_email": "",
        "success_count": 12,
        "error_count": 3,
        "last_success": "2025-03-04T05:06:07.123456789Z",
        "last_error": "0001-01-01T00:00:00Z",
        "disabled": False,
        "tags": None,
        "metadata": None,
        "retries": 2,
        "dependent_jobs": None,
        "parent_job": "",
        "processors": {},
        "concurrency": "forbid",
        "executor": "shell",
        "executor_config": {"command": f"echo {name}"},
        "status": "success",
        "next": "2025-03-05T00:00:00Z",
        "ephemeral": False,
        "starts_at": None,
        "expires_at": None,
        **fields,
    }


def test_dkron_jobs_restore_and_dry_run_reports_without_writing(
    agent: AgentProcess, tmp_path: Path
) -> None:
    assert agent.post_job(shell_job("web", "echo old")).status_code == 201
    before = state_of(agent)
    dkron = [
        dkron_job("web", disabled=True),
        dkron_job(
            "web-child",
            schedule="",
            parent_job="web",
            status="failed",
            error_count=1,
            success_count=0,
        ),
        dkron_job("db", dependent_jobs=[]),
    ]
    path = tmp_path / "dkron.json"
    path.write_text(json.dumps(dkron))

    dry = cli("restore", str(path), "--dry-run", address=agent.url)
    assert dry.returncode == 0, dry.stderr
    assert "would restore 2 new and 1 existing" in dry.stderr
    rows = {line.split()[1]: line.split()[3] for line in dry.stdout.splitlines()[3:-1]}
    assert rows == {"web": "updated", "web-child": "created", "db": "created"}
    assert state_of(agent) == before

    response = _post(agent, dkron)  # multipart field `file`, as Dkron's
    assert response.status_code == 200, response.text
    answer = response.json()
    assert {r["name"]: r["result"] for r in answer["jobs"]} == {
        "web": "updated",
        "web-child": "created",
        "db": "created",
    }
    assert (answer["created"], answer["updated"], answer["rejected"]) == (2, 1, 0)
    web = agent.http.get("/v1/jobs/web").json()
    assert web["disabled"] is True and web["executor_config"]["command"] == "echo web"
    assert web["dependent_jobs"] == ["web-child"]
    assert (web["success_count"], web["error_count"]) == (12, 3)
    assert web["last_success"] == "2025-03-04T05:06:07.123456Z"
    assert web["last_error"] is None and web["concurrency"] == "forbid"
    child = agent.http.get("/v1/jobs/web-child").json()
    assert (child["status"], child["error_count"]) == ("failed", 1)
    # Restoring the same file again updates, and changes nothing more.
    again = _post(agent, dkron).json()
    assert (again["created"], again["updated"]) == (0, 3)
    assert agent.http.get("/v1/jobs/web").json() == web


def _run(job: str, i: int, *, success: bool = True) -> dict[str, Any]:
    started = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=i)
    return Execution(
        job_name=job,
        started_at=started,
        node_name="n1",
        group=i,
        finished_at=started + timedelta(seconds=1),
        success=success,
        output=f"run {i}",
    ).to_json()


class Log:
    """A state machine fed commands one by one, as Raft would apply them."""

    def __init__(self, path: Path, **options: Any) -> None:
        self.data = DataDir(path)
        self.fsm = StateMachine(StateStore(self.data), **options)

    def apply(self, op: str, **fields: Any) -> Any:
        index = self.fsm.store.applied_index() + 1
        return self.fsm.apply_batch([(index, encode_command(op, **fields))])[0]

    def staged(self) -> int:
        with self.fsm.store.view() as view:
            return int(view.txn.stat(view.t["staged"])["entries"])


def test_restore_parts_are_invisible_until_the_one_restore_command(
    tmp_path: Path,
) -> None:
    log = Log(tmp_path / "a", max_executions=3)
    log.apply("set_job", job=shell_job("old", "true"))
    for i in range(2):
        started = {**_run("old", i), "finished_at": None, "success": False}
        log.apply("execution_started", execution=started)
        log.apply("execution_done", execution=_run("old", i))
    first = {
        "jobs": [shell_job("old", "echo new"), shell_job("top", "true")],
        "executions": [_run("old", 5, success=False), _run("old", 6)],
    }
    second = {
        "jobs": [{**shell_job("leaf", "true"), "schedule": "", "parent_job": "top"}],
        "executions": [_run("leaf", 7)],
        "last_fire": {"top": "2026-01-01T01:00:00Z"},
    }
    assert log.apply("restore_part", id="r1", seq=0, part=first).ok
    assert log.fsm.store.get_job("top") is None
    # A snapshot taken between the parts carries them to a new server.
    moved = Log(tmp_path / "b", max_executions=3)
    load_state(moved.data, dump_state(log.data), log.fsm.store.applied_index())
    for target in (log, moved):
        assert target.apply("restore_part", id="r1", seq=1, part=second).ok
        result = target.apply("restore", staged="r1", parts=2)
        assert result.ok, result.error
        assert result.value["executions"] == 3
        assert target.staged() == 1  # the parts are gone, the answer is kept
        # Applied twice (a forwarded retry): the same answer, nothing redone.
        assert target.apply("restore", staged="r1", parts=2).value == result.value
        old = target.fsm.store.get_job("old")
        assert old is not None and old.executor_config["command"] == "echo new"
        # Four runs stored, three kept: the oldest went; the id is kept.
        runs = target.fsm.store.executions("old")
        assert [e.group for e in runs] == [1, 5, 6]
        assert runs[2].id == _run("old", 6)["id"] and runs[2].output == "run 6"
        top = target.fsm.store.get_job("top")
        assert top is not None and top.dependent_jobs == ["leaf"]
        assert target.fsm.store.last_fire("top") == datetime(2026, 1, 1, 1, tzinfo=UTC)


def test_a_restore_whose_parts_are_gone_or_wrong_writes_nothing(
    tmp_path: Path,
) -> None:
    log = Log(tmp_path / "a")
    part = {"jobs": [shell_job("x", "true")], "executions": []}
    assert log.apply("restore_part", id="r1", seq=0, part=part).ok
    # A new restore's first part drops what an abandoned one left.
    assert log.apply("restore_part", id="r2", seq=0, part=part).ok
    refused = log.apply("restore", staged="r1", parts=1)
    assert refused.code == 409 and "0 of 1 parts" in refused.error
    orphan = {"jobs": [{**shell_job("y", "true"), "parent_job": "ghost"}]}
    assert log.apply("restore_part", id="r2", seq=1, part=orphan).ok
    refused = log.apply("restore", staged="r2", parts=2)
    assert refused.code == 400 and "ghost" in refused.error
    assert log.fsm.store.list_jobs() == [] and log.staged() == 2
    assert log.apply("restore_abort", id="r2").ok
    assert log.staged() == 0
