"""The `cronmesh` command against a real agent: tables, --json, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, AgentProcess


def cli(
    *args: str, address: str | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    if address is not None:
        env["CRONMESH_ADDRESS"] = address
    return subprocess.run(
        [sys.executable, "-m", "cronmesh", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        input=stdin,
        timeout=60,
    )


def test_jobs_lifecycle_through_the_cli(agent: AgentProcess, tmp_path: Path) -> None:
    spec = tmp_path / "jobs.json"
    spec.write_text(
        json.dumps(
            [
                {
                    "name": "cli-a",
                    "schedule": "@manually",
                    "executor": "shell",
                    "executor_config": {"command": "echo from-cli"},
                },
                {
                    "name": "cli-b",
                    "schedule": "0 0 3 * * *",
                    "executor": "shell",
                    "executor_config": {"command": "true"},
                },
            ]
        )
    )
    applied = cli("jobs", "apply", "-f", str(spec), address=agent.url)
    assert applied.returncode == 0, applied.stderr
    assert "applied cli-a" in applied.stdout
    listed = cli("jobs", "list", "--json", "--address", agent.url)
    assert [j["name"] for j in json.loads(listed.stdout)] == ["cli-a", "cli-b"]
    table = cli("jobs", "list", address=agent.url)
    assert "cli-b" in table.stdout and "0 0 3 * * *" in table.stdout
    run = cli("jobs", "run", "cli-a", "--json", address=agent.url)
    assert run.returncode == 0
    exec_id = json.loads(run.stdout)["execution_id"]
    agent.finished("cli-a")
    shown = cli("executions", "cli-a", "--json", address=agent.url)
    runs = json.loads(shown.stdout)
    assert runs[0]["id"] == exec_id and runs[0]["output"] == "from-cli\n"
    assert exec_id in cli("executions", "cli-a", "--output", address=agent.url).stdout
    toggled = cli("jobs", "toggle", "cli-b", "--json", address=agent.url)
    assert json.loads(toggled.stdout)["disabled"] is True
    assert (
        json.loads(cli("jobs", "show", "cli-b", "--json", address=agent.url).stdout)[
            "disabled"
        ]
        is True
    )
    assert cli("jobs", "delete", "cli-b", address=agent.url).returncode == 0
    assert cli("jobs", "show", "cli-b", address=agent.url).returncode == 1


def test_errors_are_one_line_with_the_right_exit_code(
    agent: AgentProcess, tmp_path: Path
) -> None:
    missing = cli("jobs", "show", "nope", address=agent.url)
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "not found" in missing.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "Bad Name", "schedule": "@every 1s"}))
    invalid = cli("jobs", "apply", "-f", str(bad), address=agent.url)
    assert invalid.returncode == 2 and "illegal character" in invalid.stderr
    broken = tmp_path / "broken.json"
    broken.write_text("{oops")
    unparsable = cli("jobs", "apply", "-f", str(broken), address=agent.url)
    assert unparsable.returncode == 2 and unparsable.stderr.count("\n") == 1
    usage = cli("jobs", "list", "--no-such-flag")
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1
    assert "Traceback" not in usage.stderr
    down = cli("jobs", "list", address="http://127.0.0.1:1")
    assert down.returncode == 1 and "cannot reach" in down.stderr
    stdin = cli(
        "jobs",
        "apply",
        "-f",
        "-",
        address=agent.url,
        stdin=json.dumps(
            {
                "name": "from-stdin",
                "schedule": "@manually",
                "executor": "shell",
                "executor_config": {"command": "true"},
            }
        ),
    )
    assert stdin.returncode == 0, stdin.stderr


def test_apply_prints_the_warning_of_a_job_that_will_never_run(
    agent: AgentProcess, tmp_path: Path
) -> None:
    spec = tmp_path / "past.json"
    spec.write_text(
        json.dumps(
            {
                "name": "too-late",
                "schedule": "@at 2020-01-01T00:00:00Z",
                "executor": "shell",
                "executor_config": {"command": "true"},
            }
        )
    )
    applied = cli("jobs", "apply", "-f", str(spec), address=agent.url)
    assert applied.returncode == 0, applied.stderr
    assert "applied too-late" in applied.stdout
    assert applied.stderr.startswith("cronmesh: warning: too-late: schedule: ")
    assert "never run" in applied.stderr and applied.stderr.count("\n") == 1


def test_every_bad_address_is_bad_usage_naming_the_option() -> None:
    """A wrong scheme, port or host is refused before anything is sent."""
    cases = [
        (("jobs", "list"), "ftp://127.0.0.1:1"),
        (("members",), "127.0.0.1:99999"),
        (("doctor",), "http://"),
        (("backup",), ":8080"),
        (("executions", "logs", "a", "b"), "http://127.0.0.1:abc"),
        (("jobs", "run", "a"), "http://127.0.0.1:0"),
    ]
    for command, address in cases:
        result = cli(*command, "--address", address)
        assert result.returncode == 2, (command, address, result.stderr)
        assert result.stderr.startswith("cronmesh: error: --address: "), result.stderr
        assert address in result.stderr and result.stderr.count("\n") == 1


def test_every_command_reports_errors_with_one_prefix(tmp_path: Path) -> None:
    usage = cli("jobs", "list", "--no-such-flag")
    schedule = cli("schedule", "next", "not a schedule")
    agent = cli("agent", "--data-dir", str(tmp_path / "d"), "--tag", "server=yes")
    for result in (usage, schedule, agent):
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("cronmesh: error: "), result.stderr
        assert result.stderr.count("\n") == 1
    assert "'cronmesh jobs list --help'" in usage.stderr


def test_agent_flags_are_checked_before_starting(tmp_path: Path) -> None:
    reserved = cli("agent", "--data-dir", str(tmp_path / "d"), "--tag", "server=yes")
    assert reserved.returncode == 2 and "reserved" in reserved.stderr
    bad_tag = cli("agent", "--data-dir", str(tmp_path / "d"), "--tag", "novalue")
    assert bad_tag.returncode == 2 and "key=value" in bad_tag.stderr
    bad_level = cli("agent", "--data-dir", str(tmp_path / "d"), "--log-level", "loud")
    assert bad_level.returncode == 2
    version = cli("version")
    assert version.returncode == 0 and version.stdout.startswith("cronmesh ")


def test_apply_of_a_list_with_one_bad_job_applies_nothing(
    agent: AgentProcess, tmp_path: Path
) -> None:
    def job(name: str, schedule: str) -> dict[str, object]:
        return {
            "name": name,
            "schedule": schedule,
            "executor": "shell",
            "executor_config": {"command": "true"},
        }

    spec = tmp_path / "three.json"
    spec.write_text(
        json.dumps(
            [job("all-a", "@every 1m"), job("all-b", "nope"), job("all-c", "@daily")]
        )
    )
    applied = cli("jobs", "apply", "-f", str(spec), address=agent.url)
    assert applied.returncode == 2, applied.stdout
    assert applied.stderr.count("\n") == 1
    assert "nothing applied" in applied.stderr and "all-b" in applied.stderr
    names = [
        j["name"]
        for j in json.loads(cli("jobs", "list", "--json", address=agent.url).stdout)
    ]
    assert not {"all-a", "all-b", "all-c"} & set(names)


def test_a_manual_run_that_no_node_matches_is_not_reported_started(
    agent: AgentProcess,
) -> None:
    job = {
        "name": "nowhere",
        "schedule": "@manually",
        "executor": "shell",
        "executor_config": {"command": "true"},
        "tags": {"role": "no-such-role"},
    }
    assert agent.post_job(job).status_code == 201
    run = cli("jobs", "run", "nowhere", address=agent.url)
    assert run.returncode == 1, run.stdout
    assert "not run" in run.stderr and "role=no-such-role" in run.stderr
    assert "started" not in run.stdout
