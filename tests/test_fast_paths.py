"""The fast paths behave like the slow ones they replace.

* `Job.from_stored` (trusted rows) gives what `Job.from_json` gives, and
  `Job.to_json` still lists `id` then every field.
* The shell executor's posix_spawn start gives the job what asyncio's Popen
  start gives it: no inherited descriptors, default SIGPIPE, the same env,
  the same errors (the fallback is forced here with a `cwd`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from cronmesh.core.executors import OutputBuffer, ShellExecutor
from cronmesh.core.executors.base import ExecResult
from cronmesh.core.executors.shell import _can_posix_spawn, parse_shell_config
from cronmesh.core.model import Job

JOBS: list[dict[str, Any]] = [
    {"name": "plain", "schedule": "@every 1s", "executor": "shell"},
    {
        "name": "full",
        "schedule": " 0 * * * * * ",
        "displayname": "Full",
        "timezone": "Europe/Berlin",
        "owner": "o",
        "owner_email": "o@example.com",
        "disabled": True,
        "tags": {"role": "web:2"},
        "metadata": {"team": "a"},
        "retries": 3,
        "parent_job": "plain",
        "dependent_jobs": ["c1", "c2"],
        "concurrency": "forbid",
        "executor": "shell",
        "executor_config": {"command": "echo hi", "shell": "true"},
        "processors": {"log": {"forward": "true"}, "files": {}},
        "ephemeral": True,
        "starts_at": "2026-01-01T00:00:00Z",
        "expires_at": "2027-01-01T00:00:00+02:00",
        "status": "partially_failed",
        "success_count": 5,
        "error_count": 2,
        "last_success": "2026-02-01T00:00:00.123456Z",
        "last_error": "2026-02-02T00:00:00Z",
    },
]


@pytest.mark.parametrize("data", JOBS, ids=lambda d: d["name"])
def test_from_stored_equals_from_json_for_stored_rows(data: dict[str, Any]) -> None:
    job = Job.from_json(data, keep_runtime=True)
    row = job.to_json()
    assert Job.from_stored(row) == Job.from_json(row, keep_runtime=True) == job
    # Copies, not shared containers.
    loaded = Job.from_stored(row)
    loaded.tags["x"] = "y"
    loaded.dependent_jobs.append("z")
    assert "x" not in row["tags"] and "z" not in row["dependent_jobs"]


def test_to_json_lists_id_then_every_field() -> None:
    job = Job.from_json(JOBS[1], keep_runtime=True)
    job.last_error = datetime(2026, 3, 1, tzinfo=UTC)
    row = job.to_json()
    assert list(row) == ["id", *(f.name for f in dataclasses.fields(Job))]
    assert row["last_error"] == "2026-03-01T00:00:00Z"
    assert row["processors"] == {"log": {"forward": "true"}, "files": {}}


def run(config: dict[str, str]) -> ExecResult:
    async def go() -> ExecResult:
        return await ShellExecutor().run(
            config, OutputBuffer(), job_name="j", execution_id="e-1"
        )

    return asyncio.run(go())


def both(config: dict[str, str]) -> tuple[ExecResult, ExecResult]:
    """The job run by posix_spawn, and by asyncio (forced with a cwd)."""
    fast = dict(config)
    slow = {**config, "cwd": os.getcwd()}
    assert _can_posix_spawn(parse_shell_config(fast)) or not hasattr(os, "pidfd_open")
    assert not _can_posix_spawn(parse_shell_config(slow))
    return run(fast), run(slow)


def test_no_inherited_descriptor_reaches_the_job() -> None:
    read_fd, write_fd = os.pipe()
    os.set_inheritable(write_fd, True)
    try:
        time.sleep(1.1)  # the descriptor scan is cached for up to a second
        fast, slow = both({"command": "ls /proc/self/fd"})
    finally:
        os.close(read_fd)
        os.close(write_fd)
    # 0, 1, 2 and the directory ls itself opened.
    assert fast.output == slow.output == b"0\n1\n2\n3\n"


def test_sigpipe_is_default_in_the_job() -> None:
    fast, slow = both({"command": "grep SigIgn /proc/self/status"})
    # glibc's posix_spawn leaves its two internal signals (32 and 33, below
    # SIGRTMIN) ignored in the child; every other disposition matches.
    internal = (1 << 31) | (1 << 32)
    ignored = int(fast.output.split()[1], 16)
    assert ignored & ~internal == int(slow.output.split()[1], 16) & ~internal
    assert not ignored & (1 << 12)  # SIGPIPE is 13


def test_environment_and_exit_codes_match() -> None:
    config = {"shell": "true", "command": "echo $ENV_JOB_NAME $A; exit 3", "env": "A=1"}
    fast, slow = both(config)
    assert fast == slow
    assert fast.output == b"j 1\n[cronmesh] exit status 3\n"


@pytest.mark.parametrize(
    "command", ["no-such-program-xyz", "/no/such/program", "/etc/passwd"]
)
def test_start_errors_match(command: str) -> None:
    fast, slow = both({"command": command})
    assert fast == slow
    assert not fast.success


def test_the_job_leads_its_own_session_and_group() -> None:
    fast, slow = both({"command": "cat /proc/self/stat"})
    for result in (fast, slow):
        fields = result.output.rsplit(b")", 1)[1].split()
        pid = int(result.output.split()[0])
        assert (int(fields[2]), int(fields[3])) == (pid, pid)  # pgrp, session


def test_cancelling_during_many_starts_leaves_nothing_running() -> None:
    mark = f"100.{os.getpid()}{time.monotonic_ns() % 100_000}"

    async def go() -> None:
        runs = [
            asyncio.ensure_future(
                ShellExecutor().run(
                    {"command": f"sleep {mark}"},
                    OutputBuffer(),
                    job_name="j",
                    execution_id=str(i),
                )
            )
            for i in range(20)
        ]
        await asyncio.sleep(0)
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        await asyncio.sleep(0.5)

    asyncio.run(go())
    left = [
        entry.name
        for entry in os.scandir("/proc")
        if entry.name.isdigit() and _cmdline_has(entry.name, mark)
    ]
    assert left == []


def _cmdline_has(pid: str, text: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return text.encode() in cmdline and state != b"Z"
