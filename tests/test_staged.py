"""Staged runs: processes started ahead of their instant, held at a gate.

The executor level (core/executors/gate.py, the shell executor's `gate`);
the cluster level (a staged run starts at its instant on its worker) is in
tests/test_distributed.py.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from cronmesh.core.executors.base import ExecResult, OutputBuffer
from cronmesh.core.executors.gate import StartGate
from cronmesh.core.executors.shell import ShellExecutor


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def _env(output: bytes) -> list[str]:
    """The `env` lines of `output`, sorted, without the shell-kept `$_`."""
    return sorted(x for x in output.decode().splitlines() if "=" in x and x[:2] != "_=")


@pytest.mark.parametrize("shell", ["false", "true"])
def test_a_gated_process_runs_its_command_only_when_the_gate_opens(shell: str) -> None:
    """Held by a shell of its own, which execs the job's argv (`/bin/sh -c
    SCRIPT` for `shell: true`) in the same process."""

    async def main() -> dict[str, object]:
        executor = ShellExecutor()
        loop = asyncio.get_running_loop()
        gate = StartGate(loop)
        seen: dict[str, object] = {"pids": []}

        def open_gate() -> None:
            seen["opened_at"] = time.time()
            gate.open()

        loop.call_later(0.4, open_gate)
        script = (
            "date +%s.%N; echo $$; "
            "if [ -e /proc/$$/fd/3 ]; then echo fd3-open; else echo fd3-closed; fi; "
            "/usr/bin/env"
        )
        command = script if shell == "true" else f"/bin/sh -c '{script}'"
        gated = await executor.run(
            {"command": command, "shell": shell},
            OutputBuffer(100_000),
            job_name="g",
            execution_id="e1",
            gate=gate,
            on_start=lambda pid, reaped: seen["pids"].append(pid),  # type: ignore[attr-defined]
        )
        assert gated.success, gated.output
        direct = await executor.run(
            {"command": "/usr/bin/env"},
            OutputBuffer(100_000),
            job_name="g",
            execution_id="e1",
        )
        lines = gated.output.decode().splitlines()
        seen.update(
            ran_at=float(lines[0]),
            pid=int(lines[1]),
            fd3=lines[2],
            env=_env(gated.output),
            direct_env=_env(direct.output),
        )
        return seen

    seen = run(main())
    assert isinstance(seen, dict)
    # Not before the gate opened; the same process (and group) that started.
    assert seen["ran_at"] >= seen["opened_at"]
    assert seen["pids"] == [seen["pid"]]
    # The gate's descriptor 3 is closed; the environment is the job's own
    # (only the shell-kept `$_` differs).
    assert seen["fd3"] == "fd3-closed"
    assert seen["env"] == seen["direct_env"] and seen["env"]


def run_held(
    config: dict[str, str],
    *,
    open_in: float | None = None,
    close_in: float | None = None,
    cancel_in: float | None = None,
) -> tuple[ExecResult, float]:
    """Run `config` held at a gate that opens (or closes) after the given
    seconds, optionally cancelled; the result and the seconds it took."""

    async def main() -> tuple[ExecResult, float]:
        loop = asyncio.get_running_loop()
        gate = StartGate(loop)
        if open_in is not None:
            loop.call_later(open_in, gate.open)
        if close_in is not None:
            loop.call_later(close_in, gate.close)
        cancel = None
        if cancel_in is not None:
            cancel = asyncio.Event()
            loop.call_later(cancel_in, cancel.set)
        began = time.monotonic()
        result = await ShellExecutor().run(
            config,
            OutputBuffer(10_000),
            job_name="held",
            execution_id="e",
            gate=gate,
            cancel=cancel,
        )
        return result, time.monotonic() - began

    return asyncio.run(main())


def test_a_staged_run_killed_before_its_instant_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    result, _ = run_held({"command": f"touch {marker}"}, open_in=1.0, cancel_in=0.2)
    assert not result.success and b"killed on request" in result.output
    time.sleep(0.1)
    assert not marker.exists()


def test_a_gate_closed_without_opening_runs_nothing(tmp_path: Path) -> None:
    """What a crashed agent leaves: the write end closes, the shells exit."""
    marker = tmp_path / "ran"
    result, _ = run_held({"command": f"touch {marker}"}, close_in=0.2)
    assert result.success is False
    assert not marker.exists()


def test_a_missing_program_fails_at_the_instant_with_the_usual_error() -> None:
    result, waited = run_held({"command": "no-such-program-here --x"}, open_in=0.3)
    assert not result.success
    assert result.output == (
        b"[cronmesh] cannot start: command not found: no-such-program-here\n"
    )
    assert waited >= 0.29  # reported at the instant, not when staged


def test_a_shell_script_with_a_syntax_error_fails_at_the_instant() -> None:
    config = {"command": "echo before; if then fi", "shell": "true"}
    result, waited = run_held(config, open_in=0.3)
    output = result.output.decode()
    # The message of an ungated run, line number included.
    assert output.startswith("/bin/sh: 1: Syntax error:"), output
    assert not result.success and "exit status 2" in output and "before" not in output
    assert waited >= 0.29


def test_the_timeout_of_a_gated_run_counts_from_the_gate() -> None:
    result, _ = run_held({"command": "sleep 0.3", "timeout": "1s"}, open_in=1.0)
    assert result.success, result.output


def test_one_gate_releases_many_runs_and_each_runs_once(tmp_path: Path) -> None:
    async def main() -> list[bool]:
        loop = asyncio.get_running_loop()
        gate = StartGate(loop)
        executor = ShellExecutor()
        runs = [
            executor.run(
                {"command": f"touch {tmp_path}/{i}"},
                OutputBuffer(1000),
                job_name="many",
                execution_id=f"m{i}",
                gate=gate,
            )
            for i in range(40)
        ]
        tasks = [asyncio.ensure_future(r) for r in runs]
        await asyncio.sleep(0.5)
        assert not any(t.done() for t in tasks)
        assert not os.listdir(tmp_path)
        gate.open()
        return [r.success for r in await asyncio.gather(*tasks)]

    assert run(main()) == [True] * 40
    assert sorted(os.listdir(tmp_path), key=int) == [str(i) for i in range(40)]
