"""Adversarial reproductions against this session's distributed execution:
the leader's overload guard, the agents' report pipeline, hand-overs.

Real `cronmesh agent` processes on loopback (3 servers and 2 worker agents,
tests/test_distributed.py's start_mesh), one mesh for the module. A test of
a defect that is not fixed is marked xfail(strict=True): it fails the day
the defect is gone, until its mark is removed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AgentProcess, shell_job
from test_distributed import by_name, start_mesh, stop_all


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AgentProcess]]:
    nodes = start_mesh(tmp_path_factory.mktemp("break3-mesh"))
    yield nodes
    stop_all(nodes)


def unfinished(node: AgentProcess, jobs: list[str]) -> list[str]:
    """The jobs among `jobs` whose run `node` does not have as finished."""
    return [
        job for job in jobs if not [e for e in node.executions(job) if e["finished_at"]]
    ]


def test_results_whose_output_escapes_to_more_bytes_are_all_reported(
    mesh: list[AgentProcess], tmp_path: Path
) -> None:
    """A report batch is cut at MAX_REPORT_BYTES characters of output, but
    the command that carries it is JSON with every non-ASCII or control
    character escaped (six bytes for one), and Raft refuses a command over
    MAX_COMMAND_BYTES (2 MiB). Two results of 256 kB of control characters
    each make a 3 MB batch: refused, retried forever, and the agent's
    pipeline (two batches in flight) stays blocked for every later result."""
    s1, w1 = mesh[0], by_name(mesh, "w1")
    go = tmp_path / "go"
    # 256,000 bytes of \x01 (max_output), each escaped as \u0001 in JSON.
    command = (
        f"while [ ! -e {go} ]; do sleep 0.05; done; "
        "head -c 256000 /dev/zero | tr '\\0' '\\1'"
    )
    big = [f"escaped-output-{i}" for i in range(6)]
    for name in big:
        job = shell_job(name, command, tags={"id": "w1"}, config={"shell": "true"})
        assert s1.post_job(job).status_code == 201
        assert s1.http.post(f"/v1/jobs/{name}/run").status_code == 202
    s1.wait_for(
        "every run started on w1",
        lambda: (
            len([b for b in s1.http.get("/v1/busy").json() if b["job_name"] in big])
            == len(big)
        ),
    )
    go.touch()  # they all end together: their reports queue up together
    # w1 waits: a time-out shows its log (the refused report).
    w1.wait_for("every big result reported", lambda: not unfinished(s1, big), 30)
    # The pipeline is free again: a small result after them arrives too.
    small = shell_job("after-escaped-output", "echo ok", tags={"id": "w1"})
    assert s1.post_job(small).status_code == 201
    assert s1.http.post("/v1/jobs/after-escaped-output/run").status_code == 202
    s1.finished("after-escaped-output", timeout=20)
