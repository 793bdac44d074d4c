"""Tests for the shell and http executors, against real processes and a real
HTTP server on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import pwd
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cronmesh.core.executors import (
    ExecResult,
    HttpExecutor,
    OutputBuffer,
    ShellExecutor,
    get_executor,
)
from cronmesh.core.executors.shell import (
    format_go_duration,
    install_pidfd_child_watcher,
    parse_go_duration,
    parse_mem_limit,
    split_command,
)
from cronmesh.errors import ValidationError

REFUSED_URL = "http://127.0.0.1:1/closed-port"


# --------------------------------------------------------------------------
# Helpers


class RecordingSink:
    """A sink that keeps every chunk and can signal the first one."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.first = asyncio.Event()

    def write(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.first.set()

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


def run_shell(
    config: dict[str, Any],
    executor: ShellExecutor | None = None,
    **kwargs: Any,
) -> ExecResult:
    """Run one shell job to completion in a fresh event loop."""
    ex = executor or ShellExecutor()

    async def go() -> ExecResult:
        return await ex.run(
            config, OutputBuffer(), job_name="job1", execution_id="exec-1", **kwargs
        )

    return asyncio.run(go())


def run_http(config: dict[str, str], **kwargs: Any) -> ExecResult:
    """Run one http job to completion in a fresh event loop."""

    async def go() -> ExecResult:
        return await HttpExecutor().run(
            config, OutputBuffer(), job_name="job1", execution_id="exec-1", **kwargs
        )

    return asyncio.run(go())


def marker() -> str:
    """A sleep argument no other process on the machine is using."""
    return f"100.{os.getpid()}{time.monotonic_ns() % 100_000}"


def live_processes_with(text: str) -> list[int]:
    """Pids of non-zombie processes whose command line contains ``text``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry.name}/stat").read_bytes()
        except OSError:
            continue
        state = stat[stat.rfind(b")") + 2 :].split()[0]
        if text.encode() in cmdline and state != b"Z":
            found.append(int(entry.name))
    return found


def assert_all_gone(text: str) -> None:
    """Fail if a process with ``text`` in its command line survives 1 s."""
    deadline = time.monotonic() + 1.0
    while (left := live_processes_with(text)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert left == [], f"processes survived: {left}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --------------------------------------------------------------------------
# OutputBuffer


def test_output_buffer_keeps_everything_under_the_cap() -> None:
    buf = OutputBuffer(10)
    buf.write(b"abc")
    buf.write(b"def")
    assert buf.getvalue() == b"abcdef"
    assert buf.total == 6


def test_output_buffer_keeps_the_end_and_marks_the_cut_once() -> None:
    buf = OutputBuffer(30)
    for _ in range(5):
        buf.write(b"0123456789"[:7])
    assert buf.total == 35
    # The 23-byte marker counts in the 30 bytes, and it gives the total cut.
    assert buf.getvalue() == b"[... 28 bytes cut ...]\n" + b"0123456"
    buf.write(b"X" * 50)
    assert buf.getvalue() == b"[... 78 bytes cut ...]\n" + b"X" * 7


# --------------------------------------------------------------------------
# Parsers shared with Dkron


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0", 0),
        ("2s", 2_000_000_000),
        ("500ms", 500_000_000),
        ("1m30s", 90_000_000_000),
        ("1.5h", 5_400_000_000_000),
        (".5s", 500_000_000),
        ("1h2m3s4ms5us6ns", 3_723_004_005_006),
        ("3\u00b5s", 3_000),
        ("-2s", -2_000_000_000),
    ],
)
def test_parse_go_duration_accepts_go_syntax(text: str, ns: int) -> None:
    assert parse_go_duration(text) == ns


@pytest.mark.parametrize("text", ["", "2", "s", "1x", "1s2", ".s", "1 s", "--1s"])
def test_parse_go_duration_rejects_what_go_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0s"),
        (2_000_000_000, "2s"),
        (90_000_000_000, "1m30s"),
        (3_600_000_000_000, "1h0m0s"),
        (500_000_000, "500ms"),
        (1_500_000_000, "1.5s"),
        (1_500, "1.5\u00b5s"),
        (7, "7ns"),
    ],
)
def test_format_go_duration_matches_go(ns: int, text: str) -> None:
    assert format_go_duration(ns) == text


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("1024", 1024),
        ("512M", 512 * 1024**2),
        ("512mb", 512 * 1024**2),
        ("1G", 1024**3),
        ("1.5KB", 1536),
        ("10 B", None),
        ("lots", None),
        ("0", None),
        ("5PB", None),
    ],
)
def test_parse_mem_limit(text: str, limit: int | None) -> None:
    if limit is None:
        with pytest.raises(ValueError):
            parse_mem_limit(text)
    else:
        assert parse_mem_limit(text) == limit


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("echo test | tr a-z A-Z", ["echo", "test"]),
        ("a;b", ["a"]),
        ("a && b", ["a"]),
        ("cat <in", ["cat"]),
        ("echo hi 2>/dev/null", ["echo", "hi"]),
        ("echo x2>f", ["echo", "x2"]),
        ("echo 'a | b' \"c;d\"", ["echo", "a | b", "c;d"]),
        ("echo '' \"\"", ["echo", "", ""]),
        ("echo $HOME ${X}", ["echo", "$HOME", "${X}"]),
        ("echo $(a | b) `c d`", ["echo", "$(a | b)", "`c d`"]),
        ("echo a\\ b \\t\\n", ["echo", "a b", "\t\n"]),
        ('echo \'it\\s\' "q\\"q"', ["echo", "it\\s", 'q"q']),
        ("  a\tb\r\nc  ", ["a", "b", "c"]),
    ],
)
def test_split_command_matches_go_shellwords(line: str, words: list[str]) -> None:
    assert split_command(line) == words


@pytest.mark.parametrize("line", ["echo 'open", 'echo "open', "echo \\", "a (b)", "a)"])
def test_split_command_rejects_broken_lines(line: str) -> None:
    with pytest.raises(ValueError):
        split_command(line)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_characters="\x00")), max_size=5))
def test_split_command_undoes_posix_quoting(words: list[str]) -> None:
    assert split_command(" ".join(shlex.quote(w) for w in words)) == words


# --------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({}, "executor_config.command"),
        ({"command": "   "}, "executor_config.command"),
        ({"command": "| wc"}, "executor_config.command"),
        ({"command": "echo 'open"}, "executor_config.command"),
        ({"command": "echo", "shell": "yes"}, "executor_config.shell"),
        ({"command": "echo", "shell": True}, "executor_config.shell"),
        ({"command": "echo", "timeout": "2"}, "executor_config.timeout"),
        ({"command": "echo", "timeout": "-1s"}, "executor_config.timeout"),
        ({"command": "echo", "mem_limit": "lots"}, "executor_config.mem_limit"),
        ({"command": "echo", "env": "A=1,FOO"}, "executor_config.env"),
        ({"command": "echo", "payload": "not base64!"}, "executor_config.payload"),
        ({"command": "echo", "su": "a:b:c"}, "executor_config.su"),
    ],
)
def test_shell_validation_names_the_field(config: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        get_executor("shell").validate(config)
    assert info.value.field == field
    assert str(info.value).startswith(field)


@pytest.mark.parametrize("flag", ["1", "t", "T", "TRUE", "true", "True"])
def test_shell_flag_accepts_go_true_spellings(flag: str) -> None:
    result = run_shell({"shell": flag, "command": "echo a | tr a A"})
    assert result.output == b"A\n"


HTTP_BASE = {"method": "GET", "url": REFUSED_URL}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"url": ""}, "url"),
        ({"url": "ftp://x/"}, "url"),
        ({"method": ""}, "method"),
        ({"method": "FETCH"}, "method"),
        ({"timeout": "1.5"}, "timeout"),
        ({"timeout": "-1"}, "timeout"),
        ({"headers": "X: y"}, "headers"),
        ({"headers": '["Xy"]'}, "headers"),
        ({"headers": '["Bad Name: y"]'}, "headers"),
        ({"expectCode": "2xx"}, "expectCode"),
        ({"expectBody": "("}, "expectBody"),
        ({"tlsNoVerifyPeer": "maybe"}, "tlsNoVerifyPeer"),
        ({"tlsCertificateKeyFile": "/k.pem"}, "tlsCertificateKeyFile"),
        ({"debug": 1}, "debug"),
    ],
)
def test_http_validation_names_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        get_executor("http").validate({**HTTP_BASE, **changes})
    assert info.value.field == f"executor_config.{field}"


def test_unknown_executor_is_a_validation_error() -> None:
    with pytest.raises(ValidationError) as info:
        get_executor("foo")
    assert str(info.value) == "executor: unknown executor 'foo' (known: http, shell)"
    assert info.value.field == "executor"


def test_get_executor_returns_shared_instances() -> None:
    assert get_executor("shell") is get_executor("shell")
    assert get_executor("http").name == "http"


def test_run_with_invalid_config_fails_without_raising() -> None:
    result = run_shell({"command": "echo", "timeout": "soon"})
    assert not result.success
    assert "executor_config.timeout" in result.error
    assert b"invalid config" in result.output


# --------------------------------------------------------------------------
# Shell: output


def test_shell_interleaves_stdout_and_stderr_in_order() -> None:
    result = run_shell(
        {"shell": "true", "command": "echo 1; echo 2 >&2; echo 3; echo 4 >&2"}
    )
    assert result.output == b"1\n2\n3\n4\n"
    assert (result.success, result.exit_code, result.error) == (True, 0, "")


def test_shell_streams_output_while_the_job_runs() -> None:
    async def go() -> tuple[bytes, ExecResult, bool]:
        sink = RecordingSink()
        cancel = asyncio.Event()
        task = asyncio.ensure_future(
            ShellExecutor().run(
                {"shell": "true", "command": "echo first; sleep 30"},
                sink,
                job_name="j",
                execution_id="e",
                cancel=cancel,
            )
        )
        await asyncio.wait_for(sink.first.wait(), 5)
        still_running = not task.done()
        first = sink.data
        cancel.set()
        return first, await task, still_running

    first, result, still_running = asyncio.run(go())
    assert still_running
    assert first == b"first\n"
    assert result.output.startswith(b"first\n")


def test_sink_receives_exactly_the_result_output() -> None:
    async def go() -> tuple[bytes, ExecResult]:
        sink = RecordingSink()
        result = await ShellExecutor().run(
            {"shell": "true", "command": "echo out; exit 4"},
            sink,
            job_name="j",
            execution_id="e",
        )
        return sink.data, result

    streamed, result = asyncio.run(go())
    assert streamed == result.output == b"out\n[cronmesh] exit status 4\n"


def test_shell_output_cap_keeps_the_end() -> None:
    result = run_shell({"command": "seq 1 20000"}, ShellExecutor(max_output=1000))
    assert result.success
    assert result.output.startswith(b"[... ")
    assert result.output.endswith(b"\n19999\n20000\n")
    # The marker counts in the cap and covers every byte not kept.
    marker, kept = result.output.split(b"\n", 1)
    assert len(result.output) == 1000
    total = len(b"".join(b"%d\n" % i for i in range(1, 20001)))
    assert marker == b"[... %d bytes cut ...]" % (total - len(kept))


# --------------------------------------------------------------------------
# Shell: command line, environment, cwd, stdin


def test_shell_true_runs_a_pipeline() -> None:
    assert run_shell({"shell": "true", "command": "echo test | tr a-z A-Z"}).output == (
        b"TEST\n"
    )


def test_without_shell_the_command_stops_at_the_pipe() -> None:
    # Dkron (go-shellwords) silently drops everything from the first '|'.
    result = run_shell({"command": "echo test | tr a-z A-Z"})
    assert result.output == b"test\n"
    assert result.success


def test_without_shell_quotes_group_and_nothing_is_expanded() -> None:
    result = run_shell({"command": "printf '%s|' 'a b' \"c d\" $HOME"})
    assert result.output == b"a b|c d|$HOME|"


def test_env_is_added_and_job_variables_are_set() -> None:
    script = (
        'echo "$A|$B|$C|$EXTRA|$ENV_JOB_NAME|$CRONMESH_JOB_NAME|$CRONMESH_EXECUTION_ID"'
    )
    result = run_shell(
        {"shell": "true", "command": script, "env": "A=1,B=x=y,ENV_JOB_NAME=spoof,"},
        env_extra={"EXTRA": "e", "A": "overridden by env"},
    )
    assert result.output == b"1|x=y||e|job1|job1|exec-1\n"


def test_inherited_environment_is_kept() -> None:
    result = run_shell({"command": "env", "env": "ZZ_TEST=1"})
    assert f"PATH={os.environ['PATH']}".encode() in result.output.splitlines()


def test_cwd_sets_the_working_directory(tmp_path: Path) -> None:
    result = run_shell({"command": "pwd", "cwd": str(tmp_path)})
    assert result.output == f"{tmp_path}\n".encode()


def test_missing_cwd_is_a_failure_not_an_exception(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = run_shell({"shell": "true", "command": "pwd", "cwd": str(missing)})
    assert not result.success
    assert result.exit_code is None
    assert str(missing) in result.error
    assert str(missing).encode() in result.output


def test_missing_command_is_a_failure_not_an_exception() -> None:
    result = run_shell({"command": "no-such-program-cronmesh --flag"})
    assert not result.success
    assert result.error == "command not found: no-such-program-cronmesh"
    assert b"command not found: no-such-program-cronmesh" in result.output


@pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")
def test_su_runs_the_job_as_another_user() -> None:
    result = run_shell({"command": "id -u", "su": "nobody"})
    assert result.output.strip() == str(pwd.getpwnam("nobody").pw_uid).encode()


def test_su_unknown_user_is_a_failure() -> None:
    result = run_shell({"command": "id", "su": "no-such-user-cronmesh"})
    assert not result.success
    assert result.error == "su: unknown user 'no-such-user-cronmesh'"


def test_payload_is_decoded_and_fed_to_stdin() -> None:
    data = b"line one\nline two\n" * 10_000  # larger than a pipe buffer
    result = run_shell({"command": "cat", "payload": b64(data)})
    assert result.output == data


def test_without_payload_stdin_is_empty() -> None:
    result = run_shell({"command": "cat"})
    assert (result.success, result.output) == (True, b"")


def test_payload_ignored_by_the_job_does_not_hang() -> None:
    result = run_shell({"command": "true", "payload": b64(b"x" * 1_000_000)})
    assert result.success


# --------------------------------------------------------------------------
# Shell: failures and kills


def test_non_zero_exit_is_a_failure_with_the_code_in_the_output() -> None:
    result = run_shell({"shell": "true", "command": "echo partial; exit 3"})
    assert (result.success, result.exit_code, result.error) == (
        False,
        3,
        "exit status 3",
    )
    assert result.output == b"partial\n[cronmesh] exit status 3\n"


def test_exit_note_starts_on_its_own_line() -> None:
    result = run_shell({"shell": "true", "command": "printf no-newline; exit 1"})
    assert result.output == b"no-newline\n[cronmesh] exit status 1\n"


def test_death_by_signal_names_the_signal() -> None:
    result = run_shell({"shell": "true", "command": "kill -TERM $$"})
    assert not result.success
    assert result.exit_code is None
    assert result.error == "signal SIGTERM (15)"


def test_timeout_kills_the_whole_process_group() -> None:
    mark = marker()
    started = time.monotonic()
    result = run_shell(
        {
            "shell": "true",
            "timeout": "500ms",
            "command": f"echo started; sleep {mark} & sleep {mark}; wait",
        }
    )
    elapsed = time.monotonic() - started
    assert not result.success
    assert result.exit_code is None
    assert result.error == "timeout after 500ms"
    assert result.output.startswith(b"started\n")
    assert b"timed out after 500ms" in result.output
    assert 0.4 < elapsed < 3
    assert_all_gone(mark)


def test_timeout_without_shell_kills_the_program() -> None:
    result = run_shell({"command": "sleep 30", "timeout": "200ms"})
    assert result.error == "timeout after 200ms"


def kill_all(text: str) -> None:
    """SIGKILL every process with ``text`` in its command line (test cleanup)."""
    for pid in live_processes_with(text):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_process_that_left_the_group_does_not_hold_the_job_open() -> None:
    mark = marker()
    executor = ShellExecutor(pipe_check_interval=0.1)
    try:
        started = time.monotonic()
        result = run_shell(
            {"shell": "true", "command": f"setsid sleep {mark} & echo done"}, executor
        )
        assert time.monotonic() - started < 3
        assert result.success
        assert result.output.startswith(b"done\n")
        assert b"stopped reading output" in result.output
        assert live_processes_with(mark), "a process outside the group is not ours"
    finally:
        kill_all(mark)


def test_background_member_of_the_group_is_waited_for() -> None:
    # Like Dkron: the job lasts while its group can still write to the pipe.
    started = time.monotonic()
    result = run_shell(
        {"shell": "true", "command": "(sleep 0.5; echo late) & echo early"},
        ShellExecutor(pipe_check_interval=0.1),
    )
    assert time.monotonic() - started >= 0.5
    assert result.output == b"early\nlate\n"


def test_timeout_returns_even_if_an_escaped_process_holds_the_pipe() -> None:
    mark = marker()
    try:
        result = run_shell(
            {
                "shell": "true",
                "command": f"setsid sleep {mark} & sleep 30",
                "timeout": "200ms",
            },
            ShellExecutor(pipe_check_interval=0.1, kill_grace=5),
        )
        assert result.error == "timeout after 200ms"
        assert b"stopped reading output" in result.output
    finally:
        kill_all(mark)


def test_cancel_event_kills_the_group() -> None:
    mark = marker()

    async def go() -> ExecResult:
        sink = RecordingSink()
        cancel = asyncio.Event()
        task = asyncio.ensure_future(
            ShellExecutor().run(
                {"shell": "true", "command": f"sleep {mark} & echo up; wait"},
                sink,
                job_name="j",
                execution_id="e",
                cancel=cancel,
            )
        )
        await asyncio.wait_for(sink.first.wait(), 5)
        cancel.set()
        return await asyncio.wait_for(task, 5)

    result = asyncio.run(go())
    assert (result.success, result.exit_code, result.error) == (False, None, "killed")
    assert b"killed on request" in result.output
    assert_all_gone(mark)


def test_cancel_set_before_start_runs_nothing(tmp_path: Path) -> None:
    cancel = asyncio.Event()
    cancel.set()
    flag = tmp_path / "ran"
    result = run_shell({"command": f"touch {flag}"}, cancel=cancel)
    assert result.error == "killed"
    assert not flag.exists()


def test_cancelling_the_task_kills_the_group() -> None:
    mark = marker()

    async def go() -> None:
        sink = RecordingSink()
        task = asyncio.ensure_future(
            ShellExecutor().run(
                {"shell": "true", "command": f"sleep {mark} & echo up; wait"},
                sink,
                job_name="j",
                execution_id="e",
            )
        )
        await asyncio.wait_for(sink.first.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert_all_gone(mark)


def test_a_failing_sink_kills_the_job_and_raises() -> None:
    mark = marker()

    class BrokenSink:
        def write(self, chunk: bytes) -> None:
            raise RuntimeError("sink is broken")

    async def go() -> None:
        await ShellExecutor().run(
            {"shell": "true", "command": f"echo hi; sleep {mark}"},
            BrokenSink(),
            job_name="j",
            execution_id="e",
        )

    with pytest.raises(RuntimeError, match="sink is broken"):
        asyncio.run(go())
    assert_all_gone(mark)


def test_mem_limit_kills_a_job_that_uses_too_much() -> None:
    hog = "import time; b = b'x' * (200 * 1024 * 1024); time.sleep(30)"
    started = time.monotonic()
    result = run_shell(
        {"command": f"{sys.executable} -c {shlex.quote(hog)}", "mem_limit": "50M"},
        ShellExecutor(mem_poll_interval=0.05),
    )
    assert time.monotonic() - started < 10
    assert (result.success, result.exit_code) == (False, None)
    assert result.error == "memory limit exceeded"
    assert b"over mem_limit 52428800 bytes" in result.output


def test_mem_limit_leaves_a_small_job_alone() -> None:
    result = run_shell(
        {"shell": "true", "command": "sleep 0.2; echo fine", "mem_limit": "100MB"},
        ShellExecutor(mem_poll_interval=0.05),
    )
    assert (result.success, result.output) == (True, b"fine\n")


def test_many_concurrent_jobs_leave_no_processes_behind() -> None:
    mark = marker()

    async def go() -> list[ExecResult]:
        ex = ShellExecutor()
        script = "echo {}; sleep " + mark + " & wait"
        jobs = [
            ex.run(
                {"shell": "true", "command": script.format(i), "timeout": "300ms"},
                OutputBuffer(),
                job_name="j",
                execution_id=str(i),
            )
            for i in range(50)
        ]
        return await asyncio.gather(*jobs)

    results = asyncio.run(go())
    assert [r.output.split(b"\n")[0] for r in results] == [
        str(i).encode() for i in range(50)
    ]
    assert {r.error for r in results} == {"timeout after 300ms"}
    assert_all_gone(mark)


def test_jobs_run_under_the_pidfd_child_watcher() -> None:
    async def go() -> ExecResult:
        if not install_pidfd_child_watcher():
            pytest.skip("pidfd_open is not available here")
        return await ShellExecutor().run(
            {"shell": "true", "command": "echo via pidfd; exit 2"},
            OutputBuffer(),
            job_name="j",
            execution_id="e",
        )

    try:
        result = asyncio.run(go())
    finally:
        asyncio.get_child_watcher().close()
        asyncio.set_child_watcher(None)  # back to the default for other tests
    assert (result.exit_code, result.output) == (
        2,
        b"via pidfd\n[cronmesh] exit status 2\n",
    )


SUBREAPER_SCRIPT = """
import asyncio, ctypes, os, sys, time
from cronmesh.core.executors import OutputBuffer, ShellExecutor

ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def our_zombies():
    found = 0
    for entry in os.scandir("/proc"):
        try:
            stat = open(f"/proc/{entry.name}/stat", "rb").read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        found += fields[0] == b"Z" and int(fields[1]) == os.getpid()
    return found


async def job(reap):
    return await ShellExecutor(reap_orphans=reap).run(
        {"shell": "true", "timeout": "100ms", "command": sys.argv[1]},
        OutputBuffer(), job_name="j", execution_id="e",
    )


async def main():
    for reap in (True, False):
        await job(reap)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and our_zombies() != (0 if reap else 2):
            await asyncio.sleep(0.02)
        print(our_zombies())

asyncio.run(main())
"""


def test_reap_orphans_leaves_no_zombies_when_we_are_the_reaper() -> None:
    # In a container the agent may be PID 1; a subreaper gets orphans the
    # same way. Run that in a child Python so this process stays unchanged.
    mark = marker()
    command = f"sleep {mark} & sleep {mark} & wait"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", SUBREAPER_SCRIPT, command],
        env=env,
        capture_output=True,
        timeout=30,
        check=True,
    )
    # With reaping: none. Without (the control run): its two sleeps.
    assert done.stdout.split() == [b"0", b"2"], done.stderr


# --------------------------------------------------------------------------
# HTTP


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    received: list[tuple[str, str, dict[str, str], bytes]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self.received.append((self.command, self.path, dict(self.headers), body))
        if self.path.startswith("/slow"):
            time.sleep(1.5)
        if self.path.startswith("/status/"):
            status = int(self.path.rsplit("/", 1)[1])
            reply = f"status {status}\n".encode()
        elif self.path == "/echo":
            status = 200
            reply = b"%s %s x-test=%s\n" % (
                self.command.encode(),
                body,
                self.headers.get("X-Test", "").encode(),
            )
        else:
            status, reply = 200, b"hello ok\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """Base URL of an HTTP server on 127.0.0.1 with an OS-chosen port."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_success_returns_body_and_status_line(server: str) -> None:
    path = f"/ok?id={marker()}"
    result = run_http({"method": "POST", "url": server + path, "expectCode": "200"})
    assert (result.success, result.exit_code, result.error) == (True, None, "")
    assert result.output == b"hello ok\n[cronmesh] HTTP 200 OK\n"
    # One run is one request: retries belong to the scheduler, not here.
    assert [r[:2] for r in _Handler.received if r[1] == path] == [("POST", path)]


def test_http_without_expect_code_any_status_succeeds(server: str) -> None:
    # Dkron only judges the status when expectCode is set.
    result = run_http({"method": "GET", "url": f"{server}/status/500"})
    assert result.success
    assert b"HTTP 500" in result.output


def test_http_expect_code_mismatch_fails(server: str) -> None:
    result = run_http(
        {"method": "GET", "url": f"{server}/status/404", "expectCode": "200"}
    )
    assert not result.success
    assert result.error == "status 404, expected 200"
    assert result.output.startswith(b"status 404\n")


def test_http_expect_code_accepts_a_list(server: str) -> None:
    result = run_http(
        {"method": "GET", "url": f"{server}/status/206", "expectCode": "200, 206"}
    )
    assert result.success


def test_http_expect_body_is_a_regex_search(server: str) -> None:
    url = f"{server}/ok"
    assert run_http({"method": "GET", "url": url, "expectBody": "l+o\\s+ok"}).success
    miss = run_http({"method": "GET", "url": url, "expectBody": "^ok"})
    assert not miss.success
    assert miss.error == "body does not match expectBody '^ok'"


def test_http_sends_method_headers_and_body(server: str) -> None:
    result = run_http(
        {
            "method": "put",
            "url": f"{server}/echo",
            "headers": '["X-Test: a:b", "", "Content-Type: text/plain"]',
            "body": "payload",
        }
    )
    assert result.output.startswith(b"PUT payload x-test=a:b\n")


def test_http_debug_shows_request_and_response(server: str) -> None:
    result = run_http({"method": "GET", "url": f"{server}/ok", "debug": "true"})
    assert b"> GET " in result.output
    assert b"< HTTP/1.1 200" in result.output


def test_http_connection_refused_is_a_failure() -> None:
    result = run_http(
        {"method": "POST", "url": REFUSED_URL, "expectCode": "200", "timeout": "15"}
    )
    assert (result.success, result.error) == (False, "connection refused")
    assert b"connection refused" in result.output


def test_http_timeout_covers_the_whole_exchange(server: str) -> None:
    started = time.monotonic()
    result = run_http({"method": "GET", "url": f"{server}/slow", "timeout": "1"})
    assert time.monotonic() - started < 1.4
    assert (result.success, result.error) == (False, "timeout after 1s")


def test_http_cancel_abandons_the_request(server: str) -> None:
    async def go() -> ExecResult:
        cancel = asyncio.Event()
        asyncio.get_running_loop().call_later(0.2, cancel.set)
        return await HttpExecutor().run(
            {"method": "GET", "url": f"{server}/slow"},
            OutputBuffer(),
            job_name="j",
            execution_id="e",
            cancel=cancel,
        )

    started = time.monotonic()
    result = asyncio.run(go())
    assert time.monotonic() - started < 1.2
    assert result.error == "killed"


def test_http_missing_tls_file_is_a_failure(tmp_path: Path) -> None:
    result = run_http(
        {
            "method": "GET",
            "url": "https://127.0.0.1:1/",
            "tlsRootCAsFile": str(tmp_path / "missing.pem"),
        }
    )
    assert not result.success
    assert result.error.startswith("tls:")
