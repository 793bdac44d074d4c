"""Dkron's REST API on a real agent process: routes, fields, codes, headers."""

from __future__ import annotations

import json
from typing import Any

from conftest import AgentProcess, shell_job

DKRON_JOB_FIELDS = {
    "id",
    "name",
    "displayname",
    "schedule",
    "timezone",
    "owner",
    "owner_email",
    "disabled",
    "tags",
    "metadata",
    "retries",
    "parent_job",
    "dependent_jobs",
    "concurrency",
    "executor",
    "executor_config",
    "processors",
    "ephemeral",
    "starts_at",
    "expires_at",
    "status",
    "success_count",
    "error_count",
    "last_success",
    "last_error",
    "next",
}


def test_create_job_returns_201_location_and_every_dkron_field(
    agent: AgentProcess,
) -> None:
    response = agent.post_job(
        shell_job("nightly", "true", "0 0 3 * * *", timezone="Europe/Berlin")
    )
    assert response.status_code == 201, response.text
    assert response.headers["Location"] == "/v1/jobs/nightly"
    body = response.json()
    assert DKRON_JOB_FIELDS <= set(body)
    assert body["next"].endswith(("+01:00", "+02:00", "Z"))
    again = agent.http.get("/v1/jobs/nightly").json()
    assert again["executor_config"] == {"command": "true"}
    assert again["concurrency"] == "allow"


def test_next_is_the_real_fire_instant_in_the_job_zone(agent: AgentProcess) -> None:
    agent.post_job(shell_job("tz", "true", "0 30 2 * * *", timezone="Asia/Kolkata"))
    nxt = agent.http.get("/v1/jobs/tz").json()["next"]
    assert "T02:30:00" in nxt or nxt.endswith("T21:00:00Z"), nxt


def test_J07_names_and_time_zones_are_rejected_never_rewritten(
    agent: AgentProcess,
) -> None:
    common = {
        "schedule": "@every 1m",
        "executor": "shell",
        "executor_config": {"command": "true"},
    }
    for bad in ("#HeLLo@@WorLd$", "invoice-create-Code12345", "job.name"):
        response = agent.post_job({"name": bad, **common})
        assert response.status_code == 400, (bad, response.text)
        assert "name" in response.json()["error"]
    assert agent.http.get("/v1/jobs", params={"q": "hello"}).json() == []
    for good in ("tâche-été", "ok_name-1"):
        assert agent.post_job({"name": good, **common}).status_code == 201
    assert agent.http.get("/v1/jobs/ok_name-1").status_code == 200
    assert agent.http.delete("/v1/jobs/ok_name-1").status_code == 200
    assert agent.http.get("/v1/jobs/ok_name-1").status_code == 404
    bad_tz = agent.post_job(
        {"name": "tz-bad", "timezone": "America/New York", **common}
    )
    assert bad_tz.status_code == 400
    assert "America/New York" in bad_tz.json()["error"]
    assert (
        agent.post_job(
            {"name": "tz-ok", "timezone": "Europe/Berlin", **common}
        ).status_code
        == 201
    )


def test_malformed_input_gets_4xx_with_a_message_and_stores_nothing(
    agent: AgentProcess,
) -> None:
    cases: list[tuple[Any, str]] = [
        ("{nope", "invalid JSON"),
        ("[]", "object"),
        (json.dumps(shell_job("a", "true", "bad cron")), "schedule"),
        (json.dumps(shell_job("a", "true", retries=-1)), "retries"),
        (json.dumps(shell_job("a", "true", retries="3")), "retries"),
        (json.dumps(shell_job("a", "true", disabled="yes")), "disabled"),
        (json.dumps(shell_job("a", "true", tags={"x": 1})), "tags.x"),
        (json.dumps(shell_job("a", "true", tags={"": "x"})), "empty name"),
        (json.dumps(shell_job("a", "true", concurrency="maybe")), "concurrency"),
        (json.dumps(shell_job("a", "true", parent_job="a")), "parent"),
        (json.dumps({"name": "a", "schedule": "@every 1s"}), "executor"),
        (json.dumps(shell_job("a", "", "@every 1s")), "command"),
        (
            json.dumps(shell_job("a", "true", "@every 1s", config={"timeout": "soon"})),
            "timeout",
        ),
        (json.dumps(shell_job("a", "true", "@at 2019-04-29 23:46:49")), "@at"),
        (json.dumps(shell_job("a", "true", "@every 10ms")), "1s"),
        (json.dumps(shell_job("a", "true", expires_at="tomorrow")), "expires_at"),
    ]
    for body, expected in cases:
        response = agent.http.post("/v1/jobs", content=body)
        assert response.status_code == 400, (body, response.text)
        assert expected.lower() in response.json()["error"].lower(), (
            body,
            response.text,
        )
    assert agent.http.get("/v1/jobs").json() == []
    missing = agent.http.get("/v1/jobs/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    assert agent.http.post("/v1/jobs/nope/run").status_code == 404
    assert agent.http.post("/v1/jobs/nope/toggle").status_code == 404
    assert agent.http.get("/v1/jobs/nope/executions").status_code == 404
    assert agent.http.delete("/v1/jobs/nope").status_code == 404


def test_J10_shell_flag_must_be_a_string(agent: AgentProcess) -> None:
    piped = shell_job("piped", "echo test | tr a-z A-Z", config={"shell": "true"})
    plain = shell_job("not-piped", "echo test | tr a-z A-Z")
    boolean = shell_job("bool-shell", "echo hi", config={"shell": True})
    created = agent.post_job(piped)
    assert created.status_code == 201 and "warnings" not in created.json()
    cut = agent.post_job(plain)
    assert cut.status_code == 201
    assert "| tr a-z A-Z" in cut.json()["warnings"][0]
    response = agent.post_job(boolean)
    assert response.status_code == 400
    assert "executor_config.shell" in response.json()["error"]
    agent.http.post("/v1/jobs/piped/run")
    agent.http.post("/v1/jobs/not-piped/run")
    assert agent.finished("piped")[0]["output"] == "TEST\n"
    assert agent.finished("not-piped")[0]["output"] == "test\n"


def test_unknown_job_fields_are_ignored_but_named(agent: AgentProcess) -> None:
    typo = {**shell_job("typo", "true"), "retrys": 3}
    created = agent.post_job(typo)
    assert created.status_code == 201
    assert created.json()["retries"] == 0
    (warning,) = created.json()["warnings"]
    assert warning.startswith("retrys: not a job field") and "'retries'" in warning
    patched = agent.http.patch("/v1/jobs/typo", json={"sheduel": "@every 3s"})
    assert patched.status_code in (200, 201), patched.text
    assert "'schedule'" in patched.json()["warnings"][0]
    # Dkron's own fields, runtime ones included, are no surprise.
    shown = agent.http.get("/v1/jobs/typo").json()
    again = agent.post_job(shown)
    assert again.status_code == 201 and "warnings" not in again.json()
    # Executor config keys the executor does not read, too.
    config_typo = shell_job("cfg", "true", config={"timout": "2s", "shell": "true"})
    (warning,) = agent.post_job(config_typo).json()["warnings"]
    assert warning.startswith("executor_config.timout: the shell executor")
    assert "'timeout'" in warning
    http_job = {
        "name": "web",
        "schedule": "@manually",
        "executor": "http",
        "executor_config": {
            "method": "GET",
            "url": "http://127.0.0.1:1/",
            "expectcode": "200",
        },
    }
    web = agent.post_job(http_job)
    assert "warnings" in web.json(), web.text
    (warning,) = web.json()["warnings"]
    assert "executor_config.expectcode" in warning and "'expectCode'" in warning


def test_J04_dependent_jobs_survive_parent_update_and_child_delete(
    agent: AgentProcess,
) -> None:
    parent = shell_job(
        "job_test", "sleep 1", "0 0/2 * * * *", retries=2, concurrency="forbid"
    )
    child = {
        "name": "job_test_chain",
        "parent_job": "job_test",
        "executor": "shell",
        "executor_config": {"command": "sleep 2"},
    }
    assert agent.post_job(parent).status_code == 201
    assert agent.post_job(child).status_code == 201
    assert agent.post_job(parent).status_code == 201
    assert agent.http.get("/v1/jobs/job_test").json()["dependent_jobs"] == [
        "job_test_chain"
    ]
    refused = agent.http.delete("/v1/jobs/job_test")
    assert 400 <= refused.status_code < 500
    assert "children" in refused.json()["error"]
    assert agent.http.delete("/v1/jobs/job_test_chain").status_code == 200
    assert agent.http.get("/v1/jobs/job_test").json()["dependent_jobs"] == []
    orphan = {**child, "name": "orphan", "parent_job": "no-such-parent"}
    assert agent.post_job(orphan).status_code == 404


def test_cycles_between_parents_are_refused(agent: AgentProcess) -> None:
    agent.post_job(shell_job("a", "true"))
    agent.post_job({**shell_job("b", "true"), "parent_job": "a"})
    agent.post_job({**shell_job("c", "true"), "parent_job": "b"})
    response = agent.post_job({**shell_job("a", "true"), "parent_job": "c"})
    assert response.status_code == 400
    assert "cycle" in response.json()["error"]
    assert agent.http.get("/v1/jobs/a").json()["parent_job"] == ""


def test_list_filters_sorting_paging_and_total_count(agent: AgentProcess) -> None:
    for name, meta in (("alpha", "red"), ("beta", "blue"), ("gamma", "red")):
        agent.post_job(
            shell_job(name, "true", metadata={"color": meta}, displayname=f"The {name}")
        )
    agent.http.post("/v1/jobs/beta/toggle")
    all_jobs = agent.http.get("/v1/jobs")
    assert all_jobs.headers["X-Total-Count"] == "3"
    assert [j["name"] for j in all_jobs.json()] == ["alpha", "beta", "gamma"]
    desc = agent.http.get("/v1/jobs", params={"_sort": "name", "_order": "DESC"})
    assert [j["name"] for j in desc.json()] == ["gamma", "beta", "alpha"]
    page = agent.http.get("/v1/jobs", params={"_start": "1", "_end": "2"})
    assert [j["name"] for j in page.json()] == ["beta"]
    assert page.headers["X-Total-Count"] == "3"
    red = agent.http.get("/v1/jobs", params={"metadata[color]": "red"}).json()
    assert [j["name"] for j in red] == ["alpha", "gamma"]
    assert [
        j["name"]
        for j in agent.http.get("/v1/jobs", params={"disabled": "true"}).json()
    ] == ["beta"]
    assert [
        j["name"] for j in agent.http.get("/v1/jobs", params={"q": "The gam"}).json()
    ] == ["gamma"]
    assert len(agent.http.get("/v1/jobs", params={"status": "untriggered"}).json()) == 3
    pretty = agent.http.get("/v1/jobs/alpha?pretty")
    assert pretty.text.startswith("{\n    ")


def test_put_patch_and_toggle(agent: AgentProcess) -> None:
    put = agent.http.put("/v1/jobs/putjob", json=shell_job("putjob", "true"))
    assert put.status_code == 201
    mismatch = agent.http.put("/v1/jobs/putjob", json=shell_job("other", "true"))
    assert mismatch.status_code == 400
    patched = agent.http.patch("/v1/jobs/putjob", json={"owner": "ops"})
    assert patched.status_code == 200 and patched.json()["owner"] == "ops"
    assert patched.json()["executor_config"] == {"command": "true"}
    toggled = agent.http.post("/v1/jobs/putjob/toggle")
    assert toggled.status_code == 200 and toggled.json()["disabled"] is True
    assert toggled.json()["next"] is None


def test_meta_routes(agent: AgentProcess) -> None:
    health = agent.http.get("/health").json()
    assert health == {"status": "healthy", "leader": True}
    index = agent.http.get("/v1").json()
    assert index["agent"]["name"] == "node1"
    assert index["tags"]["server"] == "true"
    members = agent.http.get("/v1/members")
    assert members.headers["X-Total-Count"] == "1"
    assert members.json()[0]["Name"] == "node1"
    assert members.json()[0]["statusText"] == "alive"
    assert agent.http.get("/v1/leader").json()["Name"] == "node1"
    assert agent.http.get("/v1/isleader").json() == "I am a leader"
    assert agent.http.get("/v1/busy").json() == []
    metrics = agent.http.get("/metrics").text
    assert "cronmesh_fire_lag_seconds" in metrics


def test_pause_blocks_new_jobs_with_503(agent: AgentProcess) -> None:
    assert agent.http.post("/v1/pause").json() == {"paused": True}
    response = agent.post_job(shell_job("p", "true"))
    assert response.status_code == 503 and "paused" in response.json()["error"]
    assert agent.http.get("/v1/pause").json() == {"paused": True}
    agent.http.post("/v1/unpause")
    assert agent.post_job(shell_job("p", "true")).status_code == 201


def test_restore_is_all_or_nothing(agent: AgentProcess) -> None:
    good = [
        {**shell_job("child", "true"), "schedule": "", "parent_job": "parent"},
        {**shell_job("parent", "true"), "success_count": 7},
    ]
    response = agent.http.post("/v1/restore", files={"file": json.dumps(good)})
    assert response.status_code == 200, response.text
    results = {r["name"]: r["result"] for r in response.json()["jobs"]}
    assert results == {"parent": "created", "child": "created"}
    parent = agent.http.get("/v1/jobs/parent").json()
    assert parent["dependent_jobs"] == ["child"] and parent["success_count"] == 7
    bad = [shell_job("new-one", "true"), shell_job("Broken", "true")]
    refused = agent.http.post("/v1/restore", files={"file": json.dumps(bad)})
    assert refused.status_code == 400 and "Broken" in refused.json()["error"]
    assert agent.http.get("/v1/jobs/new-one").status_code == 404
    garbage = agent.http.post("/v1/restore", files={"file": "{not json"})
    assert garbage.status_code == 400
    missing = [{**shell_job("kid", "true"), "parent_job": "nobody"}]
    refused = agent.http.post("/v1/restore", files={"file": json.dumps(missing)})
    assert refused.status_code == 400 and "'nobody'" in refused.json()["error"]
    assert agent.http.get("/v1/jobs/kid").status_code == 404
    # A rejected job's executions and last fire add no follow-on errors.
    backup = {
        "cronmesh_backup": 1,
        "jobs": [{**shell_job("b1", "true"), "schedule": "nope"}],
        "last_fire": {"b1": "2026-01-01T00:00:00Z"},
        "executions": {"b1": []},
    }
    refused = agent.http.post("/v1/restore", files={"file": json.dumps(backup)})
    assert refused.status_code == 400
    assert [r["name"] for r in refused.json()["jobs"]] == ["b1"]
    assert "schedule" in refused.json()["jobs"][0]["error"]


def test_hostile_input_found_by_adversarial_testing(agent: AgentProcess) -> None:
    long_name = "\U0001d41a" * 125  # 125 letters, 500 bytes: too long for a key
    response = agent.post_job(shell_job(long_name, "true"))
    assert response.status_code == 400 and "bytes" in response.json()["error"]
    surrogate = (
        '{"name":"sur","schedule":"@manually","executor":"shell",'
        '"executor_config":{"command":"true"},"tags":{"k":"\\ud800"}}'
    )
    response = agent.http.post("/v1/jobs", content=surrogate)
    assert response.status_code == 400 and "surrogate" in response.json()["error"]
    assert agent.http.get("/v1/jobs").status_code == 200
    deep = "[" * 100_000 + "]" * 100_000
    response = agent.http.post("/v1/jobs", content=deep)
    assert response.status_code == 400 and "nested" in response.json()["error"]
    huge = agent.post_job(shell_job("poison", "true", "@every 100000000h"))
    assert huge.status_code == 400
    cyrillic = agent.post_job(shell_job("задача", "echo ok"))
    assert cyrillic.status_code == 201, cyrillic.text
    assert agent.http.post("/v1/jobs/задача/run").status_code == 202
    assert agent.finished("задача")[0]["output"] == "ok\n"
    assert agent.post_job(shell_job("after-poison", "true")).status_code == 201


def test_restore_refuses_duplicates(agent: AgentProcess) -> None:
    twice = [shell_job("dup", "true"), shell_job("dup", "false")]
    response = agent.http.post("/v1/restore", files={"file": json.dumps(twice)})
    assert response.status_code == 400 and "more than once" in response.json()["error"]
    bogus = [{**shell_job("st", "true"), "status": "bogus"}]
    response = agent.http.post("/v1/restore", files={"file": json.dumps(bogus)})
    assert response.status_code == 400
    assert agent.http.get("/v1/jobs").json() == []


def test_next_honours_starts_at_and_expires_at(agent: AgentProcess) -> None:
    from datetime import UTC, datetime, timedelta

    later = datetime.now(UTC) + timedelta(hours=1)
    agent.post_job(
        shell_job("later", "true", "*/5 * * * * *", starts_at=later.isoformat())
    )
    nxt = datetime.fromisoformat(agent.http.get("/v1/jobs/later").json()["next"])
    assert nxt >= later
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    agent.post_job(shell_job("expired", "true", "*/5 * * * * *", expires_at=past))
    assert agent.http.get("/v1/jobs/expired").json()["next"] is None


def test_a_time_already_past_is_stored_with_a_warning(agent: AgentProcess) -> None:
    """An `@at` or `expires_at` in the past: the job can never run on its
    schedule; it is stored (Dkron does) but the answer says so."""
    from datetime import UTC, datetime, timedelta

    past = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    ahead = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    gone = agent.post_job(shell_job("gone", "true", f"@at {past}"))
    assert gone.status_code == 201, gone.text
    (warning,) = gone.json()["warnings"]
    assert warning.startswith("schedule: ") and "never run" in warning
    assert gone.json()["next"] is None
    assert agent.http.get("/v1/jobs/gone").status_code == 200
    expired = agent.post_job(shell_job("over", "true", "@every 1m", expires_at=past))
    (warning,) = expired.json()["warnings"]
    assert warning.startswith("expires_at: ") and "never run" in warning
    patched = agent.http.patch("/v1/jobs/over", json={"expires_at": ahead})
    assert patched.status_code == 200 and "warnings" not in patched.json()
    fine = agent.post_job(shell_job("ahead", "true", f"@at {ahead}"))
    assert fine.status_code == 201 and "warnings" not in fine.json()
