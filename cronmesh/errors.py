"""The exceptions cronmesh raises, under one base class.

    CronmeshError
    ├── ValidationError      the caller sent something malformed (HTTP 400, exit 2)
    │   └── ScheduleError    a schedule or time zone that cannot be parsed
    ├── NotFoundError        a job or execution that does not exist (HTTP 404)
    ├── ConflictError        the request clashes with stored state (HTTP 409)
    ├── StorageError         LMDB failed, the data dir is locked or the disk is full
    ├── UnavailableError     the node is stopping: no new runs (HTTP 503)
    ├── TransportError       a peer could not be reached
    ├── RemoteError          a peer answered with something we cannot use
    │   └── RunRefusedError  an agent answered a hand-over with no
    └── InvariantViolation   a bug: an internal rule was broken
"""

from __future__ import annotations

__all__ = [
    "ConflictError",
    "CronmeshError",
    "InvariantViolation",
    "NotFoundError",
    "RemoteError",
    "RunRefusedError",
    "ScheduleError",
    "StorageError",
    "TransportError",
    "UnavailableError",
    "ValidationError",
]


class CronmeshError(Exception):
    """Base class of every error cronmesh raises on purpose."""


class ValidationError(CronmeshError, ValueError):
    """Input from a caller is malformed; the message names the field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ScheduleError(ValidationError):
    """A schedule expression or time zone that cannot be parsed."""


class NotFoundError(CronmeshError, LookupError):
    """A job or execution that does not exist."""


class ConflictError(CronmeshError):
    """The request clashes with what is stored (a running forbid job, children)."""

    def __init__(self, message: str, execution_id: str = "") -> None:
        super().__init__(message)
        self.execution_id = execution_id


class StorageError(CronmeshError):
    """The storage layer failed: LMDB error, lock held, disk full."""


class UnavailableError(CronmeshError):
    """This node takes no such request now (it is stopping); another may."""


class TransportError(CronmeshError):
    """A peer could not be reached."""


class RemoteError(CronmeshError):
    """A peer answered with something we cannot use."""


class RunRefusedError(RemoteError):
    """An agent answered that it will not run an execution (it does not have it)."""


class InvariantViolation(CronmeshError, AssertionError):
    """An internal rule was broken: this is a bug in cronmesh."""
