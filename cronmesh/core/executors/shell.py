"""The ``shell`` executor: runs a command as a local process, Dkron-compatible.

Config keys (all strings): ``command`` (required), ``shell``, ``env``, ``cwd``,
``payload`` (base64, fed to stdin), ``timeout`` (Go duration), ``mem_limit``
(bytes, or with a B/K/KB/M/MB/G/GB/T/TB suffix) and ``su`` (``user[:group]``).

The job's environment is the agent's, overridden by ``env_extra``, then by
``env``, then by ``ENV_JOB_NAME`` (which Dkron sets), ``CRONMESH_JOB_NAME``
and ``CRONMESH_EXECUTION_ID``. Its output is stdout and stderr interleaved;
cronmesh appends one ``[cronmesh] ...`` line for a non-zero exit, a signal, a
timeout, a kill, a memory overrun or a failure to start.
"""

# Theory of operation: process groups.
#
# A job is rarely one process. ``sh -c "a | b"`` is three, and
# ``sleep 100 & wait`` leaves a grandchild that outlives its parent's pid.
# Killing only the pid we spawned (the Dkron bug reported in #1385) leaves
# those running, still holding our output pipe, so the job never "ends".
#
# So every job starts as the leader of a new session, which also makes it the
# leader of a new process group whose id is its pid. Every descendant inherits
# that group unless it leaves on purpose (setsid/setpgid, e.g. a daemon). One
# ``killpg(pid, SIGKILL)`` then reaches the whole tree at once, with no race
# against processes forking while we walk a tree. SIGKILL because a job that
# overran its timeout gets no say; Dkron does the same.
#
# When do we kill the group? On timeout, on an explicit cancel, on exceeding
# mem_limit, and on every abnormal way out of ``run`` (an exception, or the
# task being cancelled). When the leader exits normally we do NOT kill the
# group: like Dkron we keep reading while any member of the group may still
# write (``sleep 100 & exit 0`` runs until the sleep ends), and a process that
# detached its output (a deliberately daemonised helper) is left alone. A
# process that left the group but kept the pipe (``setsid daemon &``) would
# keep the job running forever in Dkron; we stop reading once the group is
# empty and say so in the output.
#
# Starting: a job without cwd, su or payload (the common case) is started by
# libc's posix_spawn (vfork, then exec; no Python runs in the child) from a
# few spawn threads, with the GIL released; its exit is watched through a
# pidfd and its output pipe read from the event loop (``_SpawnedJob``). The
# others go through asyncio's ``subprocess_exec`` (Popen), which can chdir,
# change credentials and feed stdin. Both give the job the same session,
# group, environment, descriptors and signal dispositions (except glibc's
# two internal signals, see ``_RESTORE_SIGNALS``).
#
# Reaping: ``_SpawnedJob`` waitpid()s its leader when the pidfd says it
# exited; on the asyncio path the event loop's child watcher waitpid()s it,
# whether or not anyone awaits it. Orphaned grandchildren are re-parented
# to init (or the nearest subreaper), which reaps them. When the agent IS
# init (PID 1 in a container) or a subreaper, orphans come back to us and no
# watcher asks for them, so ``reap_orphans`` waits for them by process group.
# On Python 3.11 the default watcher runs one thread per child;
# ``install_pidfd_child_watcher`` swaps in the thread-free pidfd watcher that
# 3.12 uses by default.
#
# Output: stdout and stderr share ONE pipe, so the kernel keeps their relative
# order, and chunks go to the sink from the protocol callback as they arrive,
# with no task or thread per execution. Per-execution tasks exist only for
# what was asked for: a cancel watcher (``cancel``) and a memory watcher
# (``mem_limit``).

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ctypes
import errno
import grp
import os
import pwd
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cronmesh.core.executors.base import (
    MAX_OUTPUT_BYTES,
    ExecResult,
    OutputBuffer,
    OutputSink,
    TeeSink,
    check_string_config,
    parse_go_bool,
)
from cronmesh.core.executors.gate import GATE_FD, GATE_NAME, GATE_SCRIPT, StartGate
from cronmesh.errors import ValidationError

__all__ = [
    "ShellConfig",
    "ShellExecutor",
    "dropped_tail",
    "format_go_duration",
    "install_pidfd_child_watcher",
    "parse_go_duration",
    "parse_mem_limit",
    "parse_shell_config",
    "split_command",
    "split_command_at",
]

# After a SIGKILL, how long (seconds) we keep reading output that is still
# buffered in the pipe before giving up on it.
KILL_GRACE = 2.0
# Once the job's first process exited, how often (seconds) we check whether
# its process group is empty while the output pipe is still open.
PIPE_CHECK_INTERVAL = 1.0
# How often (seconds) the memory watcher samples the job's resident set.
MEM_POLL_INTERVAL = 0.5

_SHELL = ("/bin/sh", "-c")
_NS = 1
_US = 1_000
_MS = 1_000_000
_S = 1_000_000_000
_GO_UNITS = {
    "ns": _NS,
    "us": _US,
    "\u00b5s": _US,  # micro sign
    "\u03bcs": _US,  # Greek small letter mu
    "ms": _MS,
    "s": _S,
    "m": 60 * _S,
    "h": 3600 * _S,
}
_GO_DURATION_PART = re.compile(r"(\d*)(?:\.(\d*))?(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_GO_MAX_DURATION = 2**63 - 1
_MEM_UNITS = {
    "": 1,
    "B": 1,
    "BYTES": 1,
    "K": 1024,
    "KB": 1024,
    "M": 1024**2,
    "MB": 1024**2,
    "G": 1024**3,
    "GB": 1024**3,
    "T": 1024**4,
    "TB": 1024**4,
}
_MEM_LIMIT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([A-Z]*)")


# --------------------------------------------------------------------------
# Config parsing


@dataclass(frozen=True)
class ShellConfig:
    """A validated shell executor config."""

    command: str
    # What we exec: ("/bin/sh", "-c", command) or the split command.
    argv: tuple[str, ...]
    # Pairs from ``env``, in order; later pairs win.
    env: tuple[tuple[str, str], ...]
    # Working directory; None inherits the agent's.
    cwd: str | None
    # Bytes for stdin; None means stdin is /dev/null.
    payload: bytes | None
    # Nanoseconds; 0 means no timeout.
    timeout_ns: int
    # Bytes of resident memory for the whole process group; 0 means no limit.
    mem_limit: int
    # (user, group or None) to run as, or None for the agent's own user.
    su: tuple[str, str | None] | None


def parse_shell_config(config: dict[str, str]) -> ShellConfig:
    """Validate a shell executor config and return its parsed form.

    Raises:
        ValidationError: naming ``executor_config.<key>``.
    """
    config = check_string_config(config)
    command = config.get("command", "")
    if not command.strip():
        raise _invalid("command", "is required")
    _reject_nul(config, ("command", "env", "cwd", "su"))
    shell_flag = config.get("shell", "")
    use_shell = bool(shell_flag) and parse_go_bool(shell_flag, "executor_config.shell")
    if use_shell:
        argv: tuple[str, ...] = (*_SHELL, command)
    else:
        try:
            argv = tuple(split_command(command))
        except ValueError as exc:
            raise _invalid("command", str(exc)) from exc
        if not argv:
            raise _invalid("command", "has no program to run before | ; & < >")
    return ShellConfig(
        command=command,
        argv=argv,
        env=_parse_env(config.get("env", "")),
        cwd=config.get("cwd") or None,
        payload=_parse_payload(config.get("payload", "")),
        timeout_ns=_parse_timeout(config.get("timeout", "")),
        mem_limit=_parse_mem_field(config.get("mem_limit", "")),
        su=_parse_su(config.get("su", "")),
    )


def _invalid(key: str, problem: str) -> ValidationError:
    field = f"executor_config.{key}"
    return ValidationError(f"{field}: {problem}", field=field)


def _reject_nul(config: dict[str, str], keys: tuple[str, ...]) -> None:
    for key in keys:
        if "\x00" in config.get(key, ""):
            raise _invalid(key, "must not contain a NUL character")


def _parse_env(text: str) -> tuple[tuple[str, str], ...]:
    # Dkron splits on every comma, so a value cannot contain one; empty items
    # (a trailing comma) are skipped, as Go's exec package does.
    pairs: list[tuple[str, str]] = []
    for item in text.split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _invalid(
                "env", f"{item!r} is not KEY=VALUE (items are comma-separated)"
            )
        pairs.append((key, value))
    return tuple(pairs)


def _parse_payload(text: str) -> bytes | None:
    if not text:
        return None
    # Go's StdEncoding needs padding but skips CR and LF; so do we.
    cleaned = text.replace("\r", "").replace("\n", "")
    try:
        return base64.b64decode(cleaned, validate=True)
    except binascii.Error as exc:
        raise _invalid("payload", f"is not valid base64 ({exc})") from exc


def _parse_timeout(text: str) -> int:
    if not text:
        return 0
    try:
        ns = parse_go_duration(text)
    except ValueError as exc:
        raise _invalid("timeout", str(exc)) from exc
    if ns < 0:
        raise _invalid("timeout", f"{text!r} is negative")
    return ns


def _parse_mem_field(text: str) -> int:
    if not text:
        return 0
    try:
        return parse_mem_limit(text)
    except ValueError as exc:
        raise _invalid("mem_limit", str(exc)) from exc


def _parse_su(text: str) -> tuple[str, str | None] | None:
    if not text:
        return None
    user, sep, group = text.partition(":")
    if not user or (sep and not group) or ":" in group:
        raise _invalid("su", f"{text!r} is not user or user:group")
    return user, group or None


def split_command(line: str) -> list[str]:
    """Split a command line into argv the way Dkron's go-shellwords does.

    See `split_command_at`, which also returns what was dropped.
    """
    return split_command_at(line)[0]


def dropped_tail(config: dict[str, str]) -> str:
    """What a shell job will NOT run: the command's tail from the first
    unquoted ``| ; & < >`` when ``shell`` is not true ("" if nothing)."""
    try:
        use_shell = parse_go_bool(config.get("shell", "") or "false", "shell")
        return "" if use_shell else split_command_at(config.get("command", ""))[1]
    except (ValueError, ValidationError):
        return ""


def split_command_at(line: str) -> tuple[list[str], str]:
    """Split a command line into argv the way Dkron's go-shellwords does.

    Words split on space, tab, CR and LF. Single quotes are literal; double
    quotes group but still honour backslash; a backslash escapes the next
    character, except that ``\\t`` and ``\\n`` become a tab and a newline.
    ``$VAR`` and backticks are kept literally (nothing is expanded). Parsing
    STOPS at the first unquoted ``| ; & < >`` and the rest is dropped, so
    ``echo test | tr a-z A-Z`` becomes ``["echo", "test"]``. A word starting
    with a digit right before ``>`` (``2>``) is dropped too. ``$(`` opens a
    group closed by ``)``, kept literally; any other ``(`` or ``)`` is an error.

    Raises:
        ValueError: unbalanced quotes, a trailing backslash, a bare ``(``/``)``.
    """
    words: list[str] = []
    buf: list[str] = []
    have_word = False  # an empty '' or "" still makes a word
    escaped = single = double = backtick = dollar = False
    tail = ""
    for position, ch in enumerate(line):
        if escaped:
            buf.append({"t": "\t", "n": "\n"}.get(ch, ch))
            escaped = False
            have_word = True
            continue
        if ch == "\\":
            if single:
                buf.append(ch)
            else:
                escaped = True
            continue
        quoted = single or double or backtick or dollar
        if ch in " \t\r\n":
            if quoted:
                buf.append(ch)
            elif have_word:
                words.append("".join(buf))
                buf.clear()
                have_word = False
            continue
        if ch == "`" and not (single or double or dollar):
            backtick = not backtick
        elif ch == ")" and not (single or double or backtick):
            if not dollar:
                raise ValueError("invalid command line: ')' without '$('")
            dollar = False
        elif ch == "(" and not (single or double or backtick):
            if dollar or not buf or buf[-1] != "$":
                raise ValueError("invalid command line: '(' not preceded by '$'")
            dollar = True
            buf.append(ch)
            continue
        elif ch == '"' and not (single or dollar):
            have_word = have_word or double
            double = not double
            continue
        elif ch == "'" and not (double or dollar):
            have_word = have_word or single
            single = not single
            continue
        elif ch in ";&|<>" and not quoted:
            if ch == ">" and buf and buf[0].isascii() and buf[0].isdigit():
                have_word = False  # "2>": the fd number is not an argument
            tail = line[position:]
            break
        have_word = True
        buf.append(ch)
    if have_word:
        words.append("".join(buf))
    if escaped or single or double or backtick or dollar:
        raise ValueError("invalid command line: unterminated quote or escape")
    return words, tail.strip()


def parse_go_duration(text: str) -> int:
    """Parse a Go ``time.ParseDuration`` string into nanoseconds.

    Accepts an optional sign, then one or more ``<number><unit>`` parts with
    units ns, us, µs, ms, s, m, h (``"1m30s"``, ``"1.5h"``, ``"500ms"``);
    a bare ``"0"`` is allowed. Fractions are truncated to whole nanoseconds.

    Raises:
        ValueError: for anything Go would reject.
    """
    rest = text
    sign = 1
    if rest[:1] in ("+", "-"):
        sign = -1 if rest[0] == "-" else 1
        rest = rest[1:]
    if rest == "0":
        return 0
    if not rest:
        raise ValueError(f"invalid duration {text!r}")
    total = 0
    pos = 0
    while pos < len(rest):
        part = _GO_DURATION_PART.match(rest, pos)
        if part is None or not (part.group(1) or part.group(2)):
            raise ValueError(
                f"invalid duration {text!r} (expected e.g. 30s, 1m30s, 500ms, 2h)"
            )
        whole, frac, unit = part.group(1), part.group(2) or "", part.group(3)
        scale = _GO_UNITS[unit]
        total += int(whole or "0") * scale
        if frac:
            total += int(frac) * scale // 10 ** len(frac)
        pos = part.end()
    if total > _GO_MAX_DURATION:
        raise ValueError(f"invalid duration {text!r} (too large)")
    return sign * total


def format_go_duration(ns: int) -> str:
    """Format nanoseconds the way Go's ``Duration.String`` does (``1m30s``)."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < _US:
        return f"{sign}{ns}ns"
    if ns < _MS:
        return f"{sign}{_decimal(ns, _US)}\u00b5s"
    if ns < _S:
        return f"{sign}{_decimal(ns, _MS)}ms"
    hours, ns = divmod(ns, 3600 * _S)
    minutes, ns = divmod(ns, 60 * _S)
    seconds = f"{_decimal(ns, _S)}s"
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{sign}{minutes}m{seconds}"
    return f"{sign}{seconds}"


def _decimal(value: int, unit: int) -> str:
    whole, frac = divmod(value, unit)
    if not frac:
        return str(whole)
    digits = str(frac).rjust(len(str(unit)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"


def parse_mem_limit(text: str) -> int:
    """Parse a memory limit into bytes, as Dkron does.

    A plain integer is bytes; otherwise a number (decimals allowed) and a
    case-insensitive unit: B, BYTES, K/KB, M/MB, G/GB, T/TB (powers of 1024).

    Raises:
        ValueError: for other text, or a limit that is not positive.
    """
    match = _MEM_LIMIT.fullmatch(text.strip().upper())
    if match is None or match.group(2) not in _MEM_UNITS:
        raise ValueError(
            f"{text!r} is not a memory size (e.g. 536870912, 512MB, 1G; "
            "units B, KB, MB, GB, TB)"
        )
    limit = int(float(match.group(1)) * _MEM_UNITS[match.group(2)])
    if limit <= 0:
        raise ValueError(f"{text!r} must be greater than 0 bytes")
    return limit


# --------------------------------------------------------------------------
# Running


class _JobProtocol(asyncio.SubprocessProtocol):
    """Streams the job's single output pipe and reports exit and the end."""

    def __init__(
        self, out: TeeSink, loop: asyncio.AbstractEventLoop, pipe_check: float
    ) -> None:
        self.out = out
        self.loop = loop
        self.pipe_check = pipe_check
        self.pgid = 0
        self.exited: asyncio.Future[None] = loop.create_future()
        # Resolved once the process exited AND every pipe is closed, or when
        # we gave up on a pipe held open by a process outside the group.
        self.finished: asyncio.Future[None] = loop.create_future()
        self.abandoned = False
        self.sink_error: Exception | None = None
        self.on_sink_error: Callable[[], None] = lambda: None
        self._check: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self.pgid = transport.get_pid()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if self.sink_error is not None:
            self.out.buffer.write(data)
            return
        try:
            self.out.write(data)
        except Exception as exc:  # re-raised from run() after cleanup
            self.sink_error = exc
            self.on_sink_error()

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)
        self._check = self.loop.call_later(self.pipe_check, self._check_pipe)

    def _check_pipe(self) -> None:
        # The leader is gone but the pipe is open. While members of its group
        # live, they may hold it (``sleep 100 &``): wait, as Dkron does. Once
        # the group is empty, whoever holds it left the group on purpose
        # (setsid, a daemon) and could hold it forever: stop reading.
        if self.finished.done():
            return
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            self.abandon()
            return
        except PermissionError:
            pass  # the group exists but runs as another user (su)
        self._check = self.loop.call_later(self.pipe_check, self._check_pipe)

    def abandon(self) -> None:
        """Stop waiting for the output pipe to close."""
        if not self.finished.done():
            self.abandoned = True
            self.finished.set_result(None)

    def stop(self) -> None:
        """Cancel the pending pipe check, if any."""
        if self._check is not None:
            self._check.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in (self.exited, self.finished):
            if not fut.done():
                fut.set_result(None)


class _Kill:
    """Why, if at all, we killed a job's process group; the first reason wins."""

    def __init__(self, pgid: int, loop: asyncio.AbstractEventLoop) -> None:
        self.pgid = pgid
        self.reason = ""  # "timeout" | "killed" | "memory" | "aborted"
        self.error = ""
        self.message = ""
        self.happened: asyncio.Future[None] = loop.create_future()

    def kill(self, reason: str, error: str, message: str) -> None:
        """Record the first reason and SIGKILL the whole group (idempotent)."""
        if not self.reason:
            self.reason, self.error, self.message = reason, error, message
            self.happened.set_result(None)
        kill_group(self.pgid)


def kill_group(pgid: int) -> None:
    """Send SIGKILL to process group ``pgid``; a group already gone is fine."""
    # Limitation: a process that moved to another group or session (setsid,
    # setpgid, a shell with job control) escapes this kill; cgroups would not.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_rss(pgid: int, page_size: int) -> int:
    """Resident bytes of every process in group ``pgid``, from /proc.

    Limitation: this scans all of /proc (about 1 ms per 100 processes) on
    every sample, so thousands of mem_limit jobs at once would cost CPU.
    """
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited while we looked
        # Fields after the ")" closing the command name: 3=state, 5=pgrp, 24=rss.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 21 and int(fields[2]) == pgid:
            total += int(fields[21]) * page_size
    return total


class ShellExecutor:
    """Runs ``executor_config.command`` as a local process group.

    Args:
        max_output: bytes of output kept in the result (the end is kept).
        mem_poll_interval: seconds between mem_limit samples.
        kill_grace: seconds to keep reading output after a SIGKILL.
        pipe_check_interval: seconds between checks, once the job's first
            process exited, for an output pipe held open by a process that
            left the job's process group.
        reap_orphans: reap the job's orphaned processes ourselves; needed
            when this process is PID 1 or a child subreaper. None means "when
            we are PID 1".
    """

    name = "shell"
    # `run` takes a StartGate (core/executors/gate.py).
    gates = True
    # The executor_config keys it reads (others are named in a warning).
    config_keys = frozenset(
        ("command", "shell", "env", "cwd", "payload", "timeout", "mem_limit", "su")
    )

    def __init__(
        self,
        *,
        max_output: int = MAX_OUTPUT_BYTES,
        mem_poll_interval: float = MEM_POLL_INTERVAL,
        kill_grace: float = KILL_GRACE,
        pipe_check_interval: float = PIPE_CHECK_INTERVAL,
        reap_orphans: bool | None = None,
    ) -> None:
        self.max_output = max_output
        self.mem_poll_interval = mem_poll_interval
        self.kill_grace = kill_grace
        self.pipe_check_interval = pipe_check_interval
        self.reap_orphans = os.getpid() == 1 if reap_orphans is None else reap_orphans

    def validate(self, config: dict[str, str]) -> None:
        """Raise ValidationError if ``config`` cannot be run.

        Only what can be checked anywhere is checked: cwd, su users and the
        program's existence are node-local and reported when the job runs.
        """
        parse_shell_config(config)

    async def run(
        self,
        config: dict[str, str],
        sink: OutputSink,
        *,
        job_name: str,
        execution_id: str,
        env_extra: dict[str, str] | None = None,
        cancel: asyncio.Event | None = None,
        on_start: Callable[[int, Callable[[], bool]], None] | None = None,
        gate: StartGate | None = None,
    ) -> ExecResult:
        """Run the command once and return how it went.

        ``gate``: a staged run starts its process now, held back until the
        gate opens (see core/executors/gate.py); a job the gate cannot
        hold (one that needs Popen, or whose program is not found, so that
        the usual error is reported) waits for the gate and starts then.
        Its timeout counts from the gate's opening either way.

        ``on_start(pid, reaped)`` is called right after the job's first
        process started; its pid is also its process group's id, and
        ``reaped()`` says whether that process has been reaped (from then
        on the pid may belong to another process). It must not raise.

        Output is streamed to ``sink`` as it arrives. Failures of the job
        (bad config, missing program, non-zero exit, timeout, kill, memory)
        come back as a failed ExecResult. If ``cancel`` is set, or the task
        running this coroutine is cancelled, the process group is killed.

        Raises:
            asyncio.CancelledError: after killing the group, if cancelled.
            Exception: whatever ``sink.write`` raised, after killing the group.
        """
        out = TeeSink(OutputBuffer(self.max_output), sink)
        try:
            cfg = _cached_config(config)
        except ValidationError as exc:
            return _fail(out, f"invalid config: {exc}", str(exc))
        if gate is not None and gate.is_open:
            gate = None
        if gate is not None and not _can_gate(cfg):
            await _wait_gate(gate, cancel)
            gate = None
        if cancel is not None and cancel.is_set():
            return _fail(out, "job killed on request before it started", "killed")
        if cfg.mem_limit and not os.path.exists("/proc/self/stat"):
            # Limitation: mem_limit is measured through Linux's /proc only.
            return _fail(out, "mem_limit needs Linux /proc", "mem_limit unsupported")
        try:
            spawn_kwargs = _spawn_kwargs(cfg, job_name, execution_id, env_extra)
        except LookupError as exc:
            if gate is not None:
                await _wait_gate(gate, cancel)
            return _fail(out, f"cannot start: {exc}", str(exc))
        if gate is not None and not _findable(cfg.argv[0], spawn_kwargs["env"]):
            # Started ungated at the instant, it fails with the usual error.
            await _wait_gate(gate, cancel)
            gate = None
            if cancel is not None and cancel.is_set():
                return _fail(out, "job killed on request before it started", "killed")
        loop = asyncio.get_running_loop()
        protocol = _JobProtocol(out, loop, self.pipe_check_interval)
        transport: asyncio.SubprocessTransport
        try:
            if _can_posix_spawn(cfg):
                transport = await _SpawnedJob.start(
                    loop, protocol, cfg, spawn_kwargs, gate
                )
            else:
                # Limitation: if this task is cancelled during the spawn itself,
                # asyncio kills only the new pid, not its group.
                transport, _ = await loop.subprocess_exec(
                    lambda: protocol, *cfg.argv, **spawn_kwargs
                )
        except OSError as exc:
            reason = _start_error(exc, cfg)
            return _fail(out, f"cannot start: {reason}", reason)
        if on_start is not None:
            # Both transports set the return code when they reap the process
            # (asyncio's with the pidfd child watcher the agent installs).
            on_start(
                transport.get_pid(), lambda: transport.get_returncode() is not None
            )
        return await self._supervise(cfg, transport, protocol, cancel, gate)

    async def _supervise(
        self,
        cfg: ShellConfig,
        transport: asyncio.SubprocessTransport,
        protocol: _JobProtocol,
        cancel: asyncio.Event | None,
        gate: StartGate | None = None,
    ) -> ExecResult:
        loop = asyncio.get_running_loop()
        killer = _Kill(transport.get_pid(), loop)
        protocol.on_sink_error = lambda: killer.kill("aborted", "sink failed", "")
        helpers = self._start_helpers(cfg, killer, cancel)
        held = 0.0  # seconds until the gate opens, when the timeout starts
        try:
            if gate is not None and not gate.is_open:
                if gate.at is not None:
                    # Nothing to wake at the opening: all runs of an instant
                    # open together, and their agent has better things to do.
                    held = max(0.0, gate.at - loop.time())
                else:
                    await asyncio.wait(
                        [gate.released, protocol.finished, killer.happened],
                        return_when=asyncio.FIRST_COMPLETED,
                    )
            if cfg.payload is not None:
                stdin = transport.get_pipe_transport(0)
                assert isinstance(stdin, asyncio.WriteTransport)
                stdin.write(cfg.payload)
                stdin.close()  # flushes first, then the job sees EOF
            timeout = held + cfg.timeout_ns / 1e9 if cfg.timeout_ns else None
            done, _ = await asyncio.wait(
                [protocol.finished, killer.happened],
                timeout=timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:
                took = format_go_duration(cfg.timeout_ns)
                killer.kill(
                    "timeout",
                    f"timeout after {took}",
                    f"job timed out after {took}; killed its process group "
                    "with SIGKILL",
                )
            if not protocol.finished.done():
                await asyncio.wait([protocol.finished], timeout=self.kill_grace)
                protocol.abandon()  # SIGKILLed, yet someone holds the pipe
        finally:
            protocol.stop()
            for task in helpers:
                task.cancel()
            if not protocol.finished.done():
                # An exception or a cancellation got us here: kill, then close.
                killer.kill("aborted", "aborted", "")
                await asyncio.wait([protocol.exited], timeout=self.kill_grace)
            transport.close()
            if self.reap_orphans:
                _reap_group(loop, killer.pgid, protocol.exited.done)
        if protocol.sink_error is not None:
            raise protocol.sink_error
        if protocol.abandoned:
            protocol.out.note(
                "stopped reading output: a process that left the job's process "
                "group still holds the output pipe open"
            )
        return _outcome(protocol.out, transport.get_returncode(), killer)

    def _start_helpers(
        self, cfg: ShellConfig, killer: _Kill, cancel: asyncio.Event | None
    ) -> list[asyncio.Task[None]]:
        helpers = []
        if cancel is not None:
            helpers.append(asyncio.ensure_future(_watch_cancel(cancel, killer)))
        if cfg.mem_limit:
            watch = _watch_memory(killer, cfg.mem_limit, self.mem_poll_interval)
            helpers.append(asyncio.ensure_future(watch))
        return helpers


async def _watch_cancel(cancel: asyncio.Event, killer: _Kill) -> None:
    await cancel.wait()
    killer.kill("killed", "killed", "job killed on request; killed its process group")


async def _watch_memory(killer: _Kill, limit: int, interval: float) -> None:
    # Dkron samples the resident memory of the job's process tree once a
    # second; we sample the process group. RLIMIT_AS was rejected: it limits
    # virtual size per process, so runtimes that reserve address space up
    # front (Go, the JVM) fail at any limit, and a job that hits it just sees
    # malloc fail, with no way for us to say why it died.
    # Limitation: a spike shorter than one interval goes unnoticed.
    page_size = os.sysconf("SC_PAGE_SIZE")
    while True:
        await asyncio.sleep(interval)
        used = _group_rss(killer.pgid, page_size)
        if used > limit:
            killer.kill(
                "memory",
                "memory limit exceeded",
                f"job used {used} bytes of resident memory, over mem_limit "
                f"{limit} bytes; killed its process group",
            )
            return


def _reap_group(
    loop: asyncio.AbstractEventLoop,
    pgid: int,
    leader_reaped: Callable[[], bool],
    tries: int = 50,
    interval: float = 0.1,
) -> None:
    """Reap our exited children in group ``pgid``, retrying for a while.

    Only orphans re-parented to us can match, and only once the leader itself
    was reaped by the child watcher (reaping it here would steal its status).
    Limitation: a group member that outlives the job by more than
    ``tries * interval`` seconds (5 s) becomes a zombie of ours when it exits.
    """
    if leader_reaped():
        while True:
            try:
                status = os.waitid(os.P_PGID, pgid, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                return  # no child of ours is left in the group
            if status is None:
                break  # some are still running
    if tries > 0:
        loop.call_later(
            interval, _reap_group, loop, pgid, leader_reaped, tries - 1, interval
        )


# --------------------------------------------------------------------------
# The fast spawn: os.posix_spawn (vfork and exec, no Python in the child), a
# pidfd for the exit and one non-blocking pipe read from the event loop. It
# does what loop.subprocess_exec does for a job without cwd, su or payload;
# those keep the asyncio path, because posix_spawn in Python 3.11 cannot
# chdir or change credentials, and stdin writing needs a write transport.

# Limitation: glibc's posix_spawn leaves its internal signals 32 and 33 (below
# SIGRTMIN, unusable by glibc programs) ignored in the job; Popen does not.
# Signals Popen resets to the default in the child (restore_signals=True):
# Python ignores SIGPIPE, and an ignored signal stays ignored across exec.
_RESTORE_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ")
    if hasattr(signal, name)
)
_READ_SIZE = 256 * 1024
# Popen closes every inherited descriptor in the child (close_fds); posix_spawn
# cannot, so we close the inheritable ones by number. Python opens its own
# descriptors non-inheritable, so these are the few the agent inherited from
# its parent; the list is refreshed at most this often (seconds).
# Limitation: a descriptor made inheritable after a scan (by a C library, or
# os.set_inheritable) reaches fast-spawned jobs until the next scan.
FD_SCAN_INTERVAL = 1.0
_fd_scan: tuple[float, tuple[int, ...]] = (-FD_SCAN_INTERVAL, ())


def _inheritable_fds() -> tuple[int, ...]:
    global _fd_scan
    now = time.monotonic()
    if now - _fd_scan[0] < FD_SCAN_INTERVAL:
        return _fd_scan[1]
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    found.append(fd)
            except OSError:
                continue  # the listing's own descriptor, now closed
    _fd_scan = (now, tuple(found))
    return _fd_scan[1]


def _probe_pidfd() -> bool:
    if not hasattr(os, "posix_spawn") or not hasattr(os, "pidfd_open"):
        return False
    if not os.path.isdir("/proc/self/fd"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


_PIDFD = _probe_pidfd()


def _can_posix_spawn(cfg: ShellConfig) -> bool:
    return _PIDFD and cfg.cwd is None and cfg.su is None and cfg.payload is None


def _can_gate(cfg: ShellConfig) -> bool:
    return _can_posix_spawn(cfg) and os.access(_SHELL[0], os.X_OK)


def _findable(program: str, env: dict[bytes, bytes]) -> bool:
    """Whether ``program`` resolves to a file the kernel itself executes,
    searched as ``_spawn_path`` (and the gate's shell, with the same PATH)
    search it: an ELF binary, or a script whose ``#!`` interpreter is an
    executable file.

    Anything else must not be gated: the gate's shell runs a file that
    execve refuses as ENOEXEC (a script without ``#!``) as a shell script
    itself, and reports a failed exec as its own exit status 126 or 127,
    where the direct start fails with the usual "cannot start" error.
    """
    if os.path.dirname(program):
        candidates = [program]
    else:
        path_dirs = os.get_exec_path(env)  # type: ignore[arg-type]
        candidates = [os.path.join(d, program) for d in path_dirs]
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return _kernel_execs(path)
    return False


def _kernel_execs(path: str) -> bool:
    """Whether execve takes the executable file ``path`` as it is.

    Limitation: a damaged ELF file still counts (the kernel refuses it with
    ENOEXEC); gated, it fails with exit status 126 and the shell's message.
    So does a program removed or replaced between the staging and the
    instant (exit status 127 or 126): it is looked at when the run is staged.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(256)
    except OSError:
        return False
    if head.startswith(b"\x7fELF"):
        return True
    if not head.startswith(b"#!"):
        return False
    # As the kernel reads the line: the name ends at a space or a tab, so a
    # `\r` (a script saved with CRLF line ends) is part of it.
    line = head[2:].split(b"\n", 1)[0].lstrip(b" \t")
    name = line.replace(b"\t", b" ").split(b" ", 1)[0]
    if not name:
        return False
    interpreter = os.fsdecode(name)
    return os.path.isfile(interpreter) and os.access(interpreter, os.X_OK)


async def _wait_gate(gate: StartGate, cancel: asyncio.Event | None) -> None:
    """Until ``gate`` opens or ``cancel`` is set."""
    if gate.is_open:
        return
    waits: list[asyncio.Future[Any]] = [gate.released]
    if cancel is not None:
        waits.append(asyncio.ensure_future(cancel.wait()))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits[1:]:
            waiter.cancel()


class _SpawnedJob(asyncio.SubprocessTransport):
    """A job started by ``os.posix_spawn``, driving a ``_JobProtocol``.

    Implements the part of ``asyncio.SubprocessTransport`` that the shell
    executor uses, with the same callbacks in the same order: data, exit,
    then ``connection_lost`` once the process exited and the pipe closed.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol: _JobProtocol,
        pid: int,
        out_fd: int,
        pidfd: int,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self._pid = pid
        self._out = out_fd
        self._pidfd = pidfd
        self._returncode: int | None = None
        self._closed = False
        self._lost = False
        protocol.connection_made(self)
        loop.add_reader(out_fd, self._read)
        loop.add_reader(pidfd, self._reap)

    @classmethod
    async def start(
        cls,
        loop: asyncio.AbstractEventLoop,
        protocol: _JobProtocol,
        cfg: ShellConfig,
        kwargs: dict[str, Any],
        gate: StartGate | None = None,
    ) -> _SpawnedJob:
        """Spawn ``cfg.argv`` in a new session; OSError if it cannot start.

        With ``gate``, the process starts held at it (core/executors/gate.py).
        The spawn runs in a spawn thread (see ``_Spawner``, ``_SpawnPool``).
        If this task is cancelled meanwhile, whatever it started is killed.
        """
        argv, gate_fd = cfg.argv, -1
        if gate is not None:
            argv = ("/bin/sh", "-c", GATE_SCRIPT, GATE_NAME, *cfg.argv)
            gate_fd = gate.hold()
        # A cancellation while the thread spawns cancels `spawned`; the pool
        # then kills and reaps whatever the thread started.
        spawned = _SPAWN_POOL.submit(loop, _spawn_job, argv, kwargs["env"], gate_fd)
        try:
            pid, read_fd = await spawned
        finally:
            if gate is not None:
                gate.unhold()
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            kill_group(pid)
            os.waitpid(pid, 0)
            os.close(read_fd)
            raise
        return cls(loop, protocol, pid, read_fd, pidfd)

    def _read(self) -> None:
        try:
            data = os.read(self._out, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # a broken pipe ends the output like EOF
        if data:
            self._protocol.pipe_data_received(1, data)
            return
        self._close_out()
        self._protocol.pipe_connection_lost(1, None)
        self._maybe_lost()

    def _close_out(self) -> None:
        if self._out >= 0:
            self._loop.remove_reader(self._out)
            os.close(self._out)
            self._out = -1

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self._pid, os.WNOHANG)
        except ChildProcessError:
            # Someone else reaped it (a waitpid(-1) child watcher); asyncio
            # reports 255 in that case too.
            pid, status = self._pid, -1
        if pid == 0:
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        self._returncode = 255 if status == -1 else os.waitstatus_to_exitcode(status)
        self._protocol.process_exited()
        self._maybe_lost()

    def _maybe_lost(self) -> None:
        if self._returncode is not None and self._out < 0 and not self._lost:
            self._lost = True
            self._protocol.connection_lost(None)

    def get_pid(self) -> int:
        return self._pid

    def get_returncode(self) -> int | None:
        return self._returncode

    def get_pipe_transport(self, fd: int) -> None:
        return None

    def send_signal(self, signal_number: int) -> None:
        if self._returncode is None:
            os.kill(self._pid, signal_number)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop reading; SIGKILL the process if it still runs (as asyncio does).

        The pidfd stays watched until the process is reaped.
        """
        if self._closed:
            return
        self._closed = True
        if self._out >= 0:
            self._close_out()
            self._protocol.pipe_connection_lost(1, None)
        if self._returncode is None:
            try:
                os.kill(self._pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._maybe_lost()


def _reap_pid(loop: asyncio.AbstractEventLoop, pid: int, tries: int = 100) -> None:
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return
    if not reaped and tries > 0:
        loop.call_later(0.05, _reap_pid, loop, pid, tries - 1)


class _Spawner:
    """glibc's posix_spawn called through ctypes, so the GIL is released.

    ``os.posix_spawn`` holds the GIL while the kernel runs the vfork child up
    to its exec; on a busy machine that wait, not the work, dominates (about
    2 ms a spawn at load 9 on 2 cores). Released, a few threads overlap those
    waits: 400 spawns went from 770-1060 ms to 280-350 ms at p99 there.
    Part of that gain under contention is the kernel giving 5 threads more
    CPU time than 1.
    """

    # glibc's values (spawn.h); only used when glibc is the C library.
    SETSIGDEF = 0x04
    SETSID = 0x80
    # Opaque glibc structs (80, 336 and 128 bytes on x86_64): room to spare.
    STRUCT_BYTES = 1024

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.spawn_fn = libc.posix_spawn
        self.spawn_fn.argtypes = [
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        self.libc = libc
        self.sigdefault = ctypes.create_string_buffer(self.STRUCT_BYTES)
        libc.sigemptyset(self.sigdefault)
        for number in _RESTORE_SIGNALS:
            libc.sigaddset(self.sigdefault, int(number))

    def spawn(
        self, path: str, argv: tuple[str, ...], envp: list[bytes], fds: list[Any]
    ) -> int:
        """Start ``path``; raise OSError with the errno posix_spawn returned."""
        libc = self.libc
        actions = ctypes.create_string_buffer(self.STRUCT_BYTES)
        attr = ctypes.create_string_buffer(self.STRUCT_BYTES)
        libc.posix_spawn_file_actions_init(actions)
        libc.posix_spawnattr_init(attr)
        try:
            for action in fds:
                if action[0] == os.POSIX_SPAWN_OPEN:
                    _, fd, name, flags, mode = action
                    libc.posix_spawn_file_actions_addopen(
                        actions, fd, os.fsencode(name), flags, mode
                    )
                elif action[0] == os.POSIX_SPAWN_DUP2:
                    libc.posix_spawn_file_actions_adddup2(actions, *action[1:])
                else:
                    libc.posix_spawn_file_actions_addclose(actions, action[1])
            libc.posix_spawnattr_setflags(
                attr, ctypes.c_short(self.SETSID | self.SETSIGDEF)
            )
            libc.posix_spawnattr_setsigdefault(attr, self.sigdefault)
            c_argv = (ctypes.c_char_p * (len(argv) + 1))(
                *(os.fsencode(a) for a in argv), None
            )
            c_envp = (ctypes.c_char_p * (len(envp) + 1))(*envp, None)
            pid = ctypes.c_int()
            code = self.spawn_fn(
                ctypes.byref(pid),
                os.fsencode(path),
                ctypes.addressof(actions),
                ctypes.addressof(attr),
                ctypes.addressof(c_argv),
                ctypes.addressof(c_envp),
            )
        finally:
            libc.posix_spawn_file_actions_destroy(actions)
            libc.posix_spawnattr_destroy(attr)
        if code:
            raise OSError(code, os.strerror(code), path)
        return pid.value


def _make_spawner() -> _Spawner | None:
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        return _Spawner()
    except (AttributeError, OSError, ValueError):
        return None


_SPAWNER = _make_spawner()


class _SpawnPool:
    """Threads that start jobs and hand the results to the event loop in batches.

    ``run_in_executor`` would wake the loop once per spawn through its
    self-pipe. Hundreds of wakeups during one busy turn fill that pipe, and
    the byte a signal writes to the same pipe is then lost: a SIGTERM that
    never arrives. Here a thread wakes a loop only when that loop had no
    result waiting, so one byte covers a whole batch.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._results: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        self._threads: list[threading.Thread] = []

    def submit(
        self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any
    ) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` in a spawn thread; its result, in ``loop``."""
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            if len(self._threads) < self.size:
                thread = threading.Thread(
                    target=self._work, name="cronmesh-spawn", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        self._requests.put((loop, future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            loop, future, fn, args = self._requests.get()
            try:
                result, error = fn(*args), None
            except BaseException as exc:
                result, error = None, exc
            with self._lock:
                waiting = self._results.setdefault(loop, [])
                wake = not waiting
                waiting.append((future, result, error))
            if wake:
                try:
                    loop.call_soon_threadsafe(self._deliver, loop)
                except RuntimeError:  # the loop is closed: nobody will supervise
                    for _, started, _ in self._take(loop):
                        if started is not None:
                            _kill_spawned(started)
                            with contextlib.suppress(ChildProcessError):
                                os.waitpid(started[0], 0)

    # Limitation: results waiting for a loop that closes before it runs the
    # delivery (a spawn finishing during the loop's own shutdown) are never
    # delivered, so such a job runs on unsupervised.
    def _take(self, loop: asyncio.AbstractEventLoop) -> list[Any]:
        with self._lock:
            return self._results.pop(loop, [])

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        for future, result, error in self._take(loop):
            if future.cancelled():
                if result is not None:  # started for a task that is gone
                    _kill_spawned(result)
                    _reap_pid(loop, result[0])
            elif error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)


def _kill_spawned(started: tuple[int, int]) -> None:
    pid, read_fd = started
    kill_group(pid)
    os.close(read_fd)


# Threads that start jobs; each waits for one vfork child at a time.
SPAWN_THREADS = 4
_SPAWN_POOL = _SpawnPool(SPAWN_THREADS)


def _spawn_job(
    argv: tuple[str, ...], env: dict[bytes, bytes], gate_fd: int = -1
) -> tuple[int, int]:
    """Start ``argv`` with its output on a new pipe: (pid, our read end).
    ``gate_fd`` (if not -1) becomes the child's descriptor 3.

    The pipe is made here, in the spawn thread, so that jobs waiting for a
    thread hold no descriptors.
    """
    # Only our end is non-blocking: the job's output must block when full.
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        os.set_blocking(read_fd, False)
        pid = _spawn_path(argv, env, write_fd, gate_fd)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return pid, read_fd


def _spawn_path(
    argv: tuple[str, ...], env: dict[bytes, bytes], write_fd: int, gate_fd: int = -1
) -> int:
    """posix_spawn ``argv`` with Popen's PATH search; return the pid.

    Like Popen (and execvpe), a name without a slash is looked up in the
    PATH of the job's environment; the first error other than "not found"
    is the one reported, with the program's name as the file name. Runs in
    a spawn thread.
    """
    program = argv[0]
    if os.path.dirname(program):
        candidates: list[str] = [program]
    else:
        candidates = [os.path.join(d, program) for d in os.get_exec_path(env)]
    file_actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, write_fd, 1),
        (os.POSIX_SPAWN_DUP2, write_fd, 2),
        *((os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds()),
    ]
    if gate_fd >= 0:
        file_actions.append((os.POSIX_SPAWN_DUP2, gate_fd, GATE_FD))
    envp = [key + b"=" + value for key, value in env.items()]
    first_error = 0
    for path in candidates:
        if len(candidates) > 1 and not os.path.exists(path):
            continue  # what execve would say (ENOENT), without a vfork
        try:
            if _SPAWNER is not None:
                return _SPAWNER.spawn(path, argv, envp, file_actions)
            return os.posix_spawn(
                path,
                argv,
                env,
                file_actions=file_actions,
                setsid=True,
                setsigdef=_RESTORE_SIGNALS,
            )
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR) and not first_error:
                first_error = exc.errno or errno.ENOENT
    code = first_error or errno.ENOENT
    raise OSError(code, os.strerror(code), program)


def _spawn_kwargs(
    cfg: ShellConfig, job_name: str, execution_id: str, env_extra: dict[str, str] | None
) -> dict[str, Any]:
    """Keyword arguments for ``subprocess_exec``; LookupError for a bad su."""
    encode = os.fsencode
    env = _agent_environ()
    for key, value in (env_extra or {}).items():
        env[encode(key)] = encode(value)
    for key, value in cfg.env:
        env[encode(key)] = encode(value)
    # Dkron sets ENV_JOB_NAME after the job's own env, so it cannot be spoofed.
    env[b"ENV_JOB_NAME"] = encode(job_name)
    env[b"CRONMESH_JOB_NAME"] = encode(job_name)
    env[b"CRONMESH_EXECUTION_ID"] = encode(execution_id)
    kwargs: dict[str, Any] = {
        "stdin": asyncio.subprocess.PIPE
        if cfg.payload is not None
        else asyncio.subprocess.DEVNULL,
        "stdout": asyncio.subprocess.PIPE,
        "stderr": asyncio.subprocess.STDOUT,
        "env": env,
        "cwd": cfg.cwd,
        "start_new_session": True,
    }
    if cfg.su is not None:
        kwargs.update(_credentials(*cfg.su))
    return kwargs


def _agent_environ() -> dict[bytes, bytes]:
    """A copy of the agent's environment, as bytes (what exec takes).

    ``dict(os.environ)`` decodes every variable, about 100 µs per job with
    a few dozen variables; ``os.environ``'s own bytes mapping copies in one
    step. Both Popen and posix_spawn accept bytes keys and values.
    """
    data = getattr(os.environ, "_data", None)  # CPython's bytes store on POSIX
    if os.name == "posix" and isinstance(data, dict):
        return dict(data)
    return {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()}


# Parsed configs by their items: every run of a job parses the same config.
_CONFIGS: dict[tuple[tuple[str, str], ...], ShellConfig] = {}
_CONFIGS_MAX = 4096


def _cached_config(config: dict[str, str]) -> ShellConfig:
    """``parse_shell_config``, remembered for valid configs (a pure function)."""
    if not isinstance(config, dict):
        return parse_shell_config(config)
    try:
        key = tuple(config.items())
        found = _CONFIGS.get(key)
    except TypeError:  # an unhashable value: let the parser name it
        return parse_shell_config(config)
    if found is None:
        found = parse_shell_config(config)
        if len(_CONFIGS) >= _CONFIGS_MAX:
            _CONFIGS.clear()
        _CONFIGS[key] = found
    return found


def _credentials(user: str, group: str | None) -> dict[str, Any]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise LookupError(f"su: unknown user {user!r}") from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise LookupError(f"su: unknown group {group!r}") from None
    # Like Go's Credential with no groups: supplementary groups are cleared.
    return {"user": entry.pw_uid, "group": gid, "extra_groups": []}


def _start_error(exc: OSError, cfg: ShellConfig) -> str:
    # The child reports the path that failed: the cwd or the program.
    failed = exc.filename
    if cfg.cwd is not None and failed == cfg.cwd:
        return f"working directory {cfg.cwd!r}: {exc.strerror}"
    program = cfg.argv[0]
    if isinstance(exc, FileNotFoundError):
        return f"command not found: {program}"
    return f"{program}: {exc.strerror or exc}"


def _fail(out: TeeSink, message: str, error: str) -> ExecResult:
    out.note(message)
    return ExecResult(False, out.buffer.getvalue(), None, error)


def _outcome(out: TeeSink, returncode: int | None, killer: _Kill) -> ExecResult:
    if killer.reason:
        if killer.message:
            out.note(killer.message)
        return ExecResult(False, out.buffer.getvalue(), None, killer.error)
    if returncode is None:  # defensive: finished implies an exit status
        return _fail(out, "job ended without an exit status", "unknown exit")
    if returncode < 0:
        name = _signal_name(-returncode)
        return _fail(out, f"killed by signal {name}", f"signal {name}")
    if returncode > 0:
        out.note(f"exit status {returncode}")
        return ExecResult(
            False, out.buffer.getvalue(), returncode, f"exit status {returncode}"
        )
    return ExecResult(True, out.buffer.getvalue(), 0)


def _signal_name(number: int) -> str:
    try:
        return f"{signal.Signals(number).name} ({number})"
    except ValueError:
        return str(number)


def install_pidfd_child_watcher() -> bool:
    """Make asyncio reap child processes through pidfds instead of threads.

    Python 3.11's default child watcher starts one thread per child process,
    which costs a thread per running job. Call this once from inside the
    agent's running event loop, before the first job starts (Linux 5.3+).
    Python 3.12 and later already do this by default.

    Returns:
        True if pidfds are in use afterwards, False if unavailable here.
    """
    if sys.version_info >= (3, 12):
        return hasattr(os, "pidfd_open")
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return False
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.set_child_watcher(watcher)
    return True
