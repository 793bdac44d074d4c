"""What every executor shares: the result type, the sink protocol, the
executor protocol, the capped output buffer and the executor registry.

An executor turns a job's ``executor_config`` (a flat ``str -> str`` map, as in
Dkron) into one run. It never raises for things that go wrong *in the job*
(non-zero exit, refused connection, timeout): those come back as an
``ExecResult`` with ``success=False``. It raises ``ValidationError`` only from
``validate`` for a malformed config, and lets programming errors and event-loop
cancellation propagate, after cleaning up.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cronmesh.core.output import keep_end
from cronmesh.errors import ValidationError

__all__ = [
    "MAX_OUTPUT_BYTES",
    "ExecResult",
    "Executor",
    "OutputBuffer",
    "OutputSink",
    "TeeSink",
    "check_string_config",
    "get_executor",
    "note_line",
    "parse_go_bool",
]

# Dkron keeps the last 256,000 bytes of a job's output; so do we.
MAX_OUTPUT_BYTES = 256_000

_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


@dataclass
class ExecResult:
    """The outcome of one executor run."""

    # True when the job did what it was asked (exit 0, expected HTTP answer).
    success: bool
    # The (possibly truncated) combined output, including the lines we append.
    output: bytes
    # The process exit code; None for HTTP, a signal death or a kill by us.
    exit_code: int | None
    # A short human reason on failure: "exit status 3", "timeout after 2s".
    error: str = ""


class OutputSink(Protocol):
    """Receives a job's output while it runs."""

    def write(self, chunk: bytes) -> None:
        """Take the next chunk; chunks arrive in order and are never empty."""
        ...


class Executor(Protocol):
    """A way of running a job: ``shell`` or ``http``."""

    name: str

    def validate(self, config: dict[str, str]) -> None:
        """Check a config; raise ValidationError naming
        ``executor_config.<key>``."""
        ...

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
    ) -> ExecResult:
        """Run the job once, streaming output to ``sink``.

        ``on_start(pid, reaped)`` is called once a local process (the leader
        of the job's own process group) has started; ``reaped()`` says
        whether it has been reaped since. Executors that start no process
        never call it.
        """
        ...


class OutputBuffer:
    """A sink that keeps only the last ``max_bytes`` bytes written to it.

    When output had to be dropped, ``getvalue()`` starts with one marker line
    saying how many bytes were cut, followed by the kept tail; the marker
    counts in ``max_bytes`` (see ``cronmesh.core.output``). A lock makes
    ``write`` safe to call from a thread as well as from the event loop.
    """

    def __init__(self, max_bytes: int = MAX_OUTPUT_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._total = 0
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        """Every byte ever written, kept or not."""
        return self._total

    @property
    def cut(self) -> int:
        """How many bytes from the start were dropped."""
        return self._total - len(self._buf)

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``, dropping the oldest bytes beyond ``max_bytes``."""
        with self._lock:
            self._total += len(chunk)
            if len(chunk) >= self.max_bytes:
                self._buf[:] = chunk[-self.max_bytes :]
                return
            self._buf += chunk
            excess = len(self._buf) - self.max_bytes
            if excess > 0:
                # CPython deletes from the front of a bytearray in O(1).
                del self._buf[:excess]

    def endswith_newline(self) -> bool:
        """True when nothing was written or the last byte is a newline."""
        with self._lock:
            return not self._buf or self._buf[-1:] == b"\n"

    def read_from(self, offset: int) -> tuple[bytes, int]:
        """The bytes written after `offset` that are still kept, and the new
        offset (for following the output while it is written)."""
        with self._lock:
            start = max(offset, self._total - len(self._buf))
            skip = start - (self._total - len(self._buf))
            return bytes(self._buf[skip:]), self._total

    def getvalue(self) -> bytes:
        """The kept output, at most ``max_bytes`` and led by a cut marker when
        bytes were dropped."""
        with self._lock:
            return keep_end(bytes(self._buf), self.cut, self.max_bytes)


class TeeSink:
    """Writes each chunk to the executor's own buffer and to the caller's sink.

    The buffer is written first so that a failing sink never loses output
    from the result.
    """

    def __init__(self, buffer: OutputBuffer, sink: OutputSink) -> None:
        self.buffer = buffer
        self.sink = sink

    def write(self, chunk: bytes) -> None:
        """Forward a non-empty chunk to both targets."""
        if chunk:
            self.buffer.write(chunk)
            self.sink.write(chunk)

    def note(self, text: str) -> None:
        """Append a ``[cronmesh] ...`` line of our own, on a line of its own."""
        self.write(note_line(text, at_line_start=self.buffer.endswith_newline()))


def note_line(text: str, *, at_line_start: bool = True) -> bytes:
    """Format a line cronmesh appends to a job's output."""
    lead = "" if at_line_start else "\n"
    return f"{lead}[cronmesh] {text}\n".encode()


def parse_go_bool(value: str, field: str) -> bool:
    """Parse a boolean the way Go's ``strconv.ParseBool`` does.

    Args:
        value: one of 1 t T TRUE true True 0 f F FALSE false False.
        field: the field name to put in the error.

    Raises:
        ValidationError: for any other text.
    """
    if value in _GO_TRUE:
        return True
    if value in _GO_FALSE:
        return False
    raise ValidationError(
        f"{field}: {value!r} is not a boolean "
        "(use true/false, t/f, 1/0, TRUE/FALSE, True/False)",
        field=field,
    )


def check_string_config(config: object) -> dict[str, str]:
    """Check that an executor config is a map of strings to strings.

    Dkron binds ``executor_config`` to a string map, so a JSON ``true`` or
    ``5`` is rejected rather than converted.

    Raises:
        ValidationError: naming the first offending key.
    """
    if not isinstance(config, dict):
        raise ValidationError(
            "executor_config: must be an object of strings", field="executor_config"
        )
    for key, value in config.items():
        if not isinstance(key, str) or not isinstance(value, str):
            field = f"executor_config.{key}"
            raise ValidationError(
                f"{field}: must be a string, got {type(value).__name__} "
                f"(write {_json_hint(value)})",
                field=field,
            )
    return config


def _json_hint(value: object) -> str:
    """Show how a non-string value should have been written."""
    if isinstance(value, bool):
        return '"true"' if value else '"false"'
    return f'"{value}"'


def unknown_config_keys(executor: str, config: dict[str, str]) -> list[str]:
    """One warning per key of `config` that executor `executor` does not
    read (a typo, mostly: a misspelt `timeout` means no timeout)."""
    try:
        known = getattr(get_executor(executor), "config_keys", None)
    except ValidationError:
        return []
    if not known or not isinstance(config, dict):
        return []
    warnings = []
    for key in sorted(str(k) for k in config if k not in known):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        if not close:  # keys differ in case only (Dkron's expectCode)
            lower = {k.lower(): k for k in known}
            close = [lower[key.lower()]] if key.lower() in lower else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        warnings.append(
            f"executor_config.{key}: the {executor} executor does not read it, "
            f"ignored{hint}"
        )
    return warnings


@functools.cache
def get_executor(name: str) -> Executor:
    """Return the executor registered under ``name`` (one shared instance).

    Raises:
        ValidationError: for an unknown name, with ``field="executor"``.
    """
    # Imported here because both modules import this one.
    from cronmesh.core.executors.http import HttpExecutor
    from cronmesh.core.executors.shell import ShellExecutor

    known: dict[str, type[HttpExecutor] | type[ShellExecutor]] = {
        "http": HttpExecutor,
        "shell": ShellExecutor,
    }
    factory = known.get(name)
    if factory is None:
        names = ", ".join(sorted(known))
        raise ValidationError(
            f"executor: unknown executor {name!r} (known: {names})", field="executor"
        )
    return factory()
