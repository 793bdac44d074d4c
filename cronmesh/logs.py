"""How the agent writes its log to stderr.

Log calls in cronmesh write a short lowercase message followed by
`key=value` fields (`agent started node=n1 http=...`). Three forms:

  - journald (JOURNAL_STREAM names stderr, so it is a journal stream): the
    syslog priority prefix `<6>` that journald turns into the entry's
    priority, then `LEVEL message key=value`; no timestamp, the journal
    keeps its own.
  - a terminal or a file: `2026-01-02T03:04:05.678Z LEVEL message ...`.
  - `--log-json`: one JSON object per line with `time`, `level`, `logger`,
    `msg`, the trailing `key=value` fields as members, and `exc` for a
    traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import IO, Any

__all__ = [
    "JsonFormatter",
    "TextFormatter",
    "setup_logging",
    "split_fields",
    "writes_to_journal",
]

_FIELD = re.compile(r"^[A-Za-z_][\w.-]*=\S*$")
# syslog priorities (sd-daemon(3) prefixes) by logging level.
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def split_fields(message: str) -> tuple[str, dict[str, str]]:
    """The text and the trailing `key=value` fields of a message.

    Only a run of fields at the end counts, and only when every word of
    it is `key=value`; otherwise the whole message is text.
    """
    words = message.split(" ")
    start = len(words)
    while start > 0 and _FIELD.match(words[start - 1]):
        start -= 1
    if start == len(words) or "\n" in message:
        return message, {}
    fields = dict(word.split("=", 1) for word in words[start:])
    return " ".join(words[:start]), fields


def _time(record: logging.LogRecord) -> str:
    stamp = datetime.fromtimestamp(record.created, UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """`[<prio>]` `[time ]LEVEL message key=value`, traceback indented."""

    def __init__(self, *, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname} {record.getMessage()}"
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "\n" + "\n".join("    " + t for t in trace.splitlines())
        if self.journald:
            prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
            return "\n".join(prefix + part for part in line.splitlines())
        return f"{_time(record)} {line}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        text, fields = split_fields(record.getMessage())
        data: dict[str, Any] = {
            "time": _time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": text,
        }
        for key, value in fields.items():
            data.setdefault(key, value)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def writes_to_journal(stream: IO[str]) -> bool:
    """Whether `stream` is the journal stream systemd gave us: JOURNAL_STREAM
    names its device and inode (systemd.exec(5)), so a redirected stderr
    does not count."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    device, sep, inode = expected.partition(":")
    if not sep:
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{info.st_dev}:{info.st_ino}" == f"{device}:{inode}"


def setup_logging(
    level: str, *, json_lines: bool = False, stream: IO[str] | None = None
) -> None:
    """Send every logger's records to stderr in the chosen form.

    Args:
        level: debug, info, warning, error or critical.
        json_lines: `--log-json`.
        stream: where to write (default: sys.stderr).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(journald=writes_to_journal(handler.stream)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request with its whole URL at info; a webhook URL
    # often holds a secret (Slack's do), and the line is noise anyway.
    logging.getLogger("httpx").setLevel(logging.WARNING)
