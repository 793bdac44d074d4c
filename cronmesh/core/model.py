"""Jobs and executions, in Dkron's JSON shape.

A `Job` is what users write; `from_json` turns a decoded JSON object into one,
checking every field's type and value and naming the field in the error. The
checks that need the stored state (the parent exists, no cycle) live in the
state machine, which runs them again at apply time so that a replicated log
can never hold a half-valid change.

An `Execution` is one run of a job on one node. Its id is Dkron's:
`<started_at in ns since the epoch>-<node name>`.
"""

from __future__ import annotations

import difflib
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cronmesh.errors import ValidationError

__all__ = [
    "CONCURRENCY_ALLOW",
    "CONCURRENCY_FORBID",
    "MAX_NAME_LENGTH",
    "STATUS_FAILED",
    "STATUS_PARTIALLY_FAILED",
    "STATUS_RUNNING",
    "STATUS_SUCCESS",
    "Execution",
    "Job",
    "format_time",
    "parse_time",
    "validate_name",
]

CONCURRENCY_ALLOW = "allow"
CONCURRENCY_FORBID = "forbid"

STATUS_SUCCESS = "success"
STATUS_FAILED = "failed"
STATUS_PARTIALLY_FAILED = "partially_failed"
STATUS_RUNNING = "running"
JOB_STATUSES = (STATUS_SUCCESS, STATUS_FAILED, STATUS_PARTIALLY_FAILED, STATUS_RUNNING)

# LMDB keys are at most 511 bytes; a job name (in UTF-8 bytes) is part of
# every execution key, with the start time and the node name (<= 128 bytes).
MAX_NAME_LENGTH = 200


def format_time(value: datetime | None) -> str | None:
    """Render an aware datetime as RFC 3339 (UTC with `Z` when in UTC)."""
    if value is None:
        return None
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def parse_time(value: Any, name: str) -> datetime | None:
    """Parse an RFC 3339 string (or null) from field `name`."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValidationError(f"{name}: expected an RFC 3339 time string", name)
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValidationError(
            f"{name}: {value!r} is not an RFC 3339 time", name
        ) from exc
    if parsed.tzinfo is None:
        raise ValidationError(f"{name}: {value!r} has no UTC offset", name)
    # Go's zero time is how Dkron clients say "unset".
    if parsed.year == 1:
        return None
    return parsed


def validate_name(name: Any, field_name: str = "name") -> str:
    """Check a job name with Dkron's rule: lowercase letters, digits, `_`, `-`."""
    if not isinstance(name, str):
        raise ValidationError(f"{field_name}: expected a string", field_name)
    if name == "":
        raise ValidationError(f"{field_name}: cannot be empty", field_name)
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_LENGTH:
        raise ValidationError(
            f"{field_name}: longer than {MAX_NAME_LENGTH} bytes in UTF-8", field_name
        )
    for char in name:
        if char in "0123456789_-" or unicodedata.category(char) == "Ll":
            continue
        raise ValidationError(
            f"{field_name}: contains illegal character {char!r} (allowed: "
            "lowercase letters, digits, '_' and '-')",
            field_name,
        )
    return name


def check_text(value: str, key: str) -> str:
    """`value` itself, if it can be stored and sent as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(
            f"{key}: not valid Unicode text (a lone surrogate at {exc.start})", key
        ) from exc
    return value


def _string(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValidationError(f"{key}: expected a string", key)
    return check_text(value, key)


def _bool(data: dict[str, Any], key: str) -> bool:
    value = data.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValidationError(f"{key}: expected true or false", key)
    return value


def _uint(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(f"{key}: expected a whole number >= 0", key)
    return value


def _string_map(value: Any, key: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError(f"{key}: expected an object of strings", key)
    for k, v in value.items():
        check_text(k, key)
        if not isinstance(v, str):
            raise ValidationError(
                f"{key}.{k}: expected a string, got {type(v).__name__} "
                f'(write it as "{json_hint(v)}")',
                f"{key}.{k}",
            )
        check_text(v, f"{key}.{k}")
    return dict(value)


def json_hint(value: Any) -> str:
    """How a non-string value would look written as a string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _processors(value: Any) -> dict[str, dict[str, str]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError("processors: expected an object", "processors")
    return {
        str(name): _string_map(config, f"processors.{name}")
        for name, config in value.items()
    }


@dataclass
class Job:
    """A job as Dkron defines it; the runtime fields are kept by the store."""

    name: str
    schedule: str = ""
    displayname: str = ""
    timezone: str = ""
    owner: str = ""
    owner_email: str = ""
    disabled: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    # Ours: {"initial": "2s", "max": "1m"} (Go durations); empty: Dkron's.
    retry_backoff: dict[str, str] = field(default_factory=dict)
    # Ours: a retry may run on any matching node, not only the failed one.
    retry_any_node: bool = False
    parent_job: str = ""
    dependent_jobs: list[str] = field(default_factory=list)
    concurrency: str = CONCURRENCY_ALLOW
    executor: str = ""
    executor_config: dict[str, str] = field(default_factory=dict)
    processors: dict[str, dict[str, str]] = field(default_factory=dict)
    ephemeral: bool = False
    starts_at: datetime | None = None
    expires_at: datetime | None = None
    # Runtime fields: written by the state machine only.
    status: str = ""
    success_count: int = 0
    error_count: int = 0
    last_success: datetime | None = None
    last_error: datetime | None = None
    # Ours, read-only: when the current schedule took effect (the job was
    # created, its schedule or time zone changed, or it was enabled), by the
    # clock of the server that took the write; None when not known (a job
    # stored by an older version). A new leader plans a job that has not
    # fired since then from this instant, not from the moment it took over.
    schedule_since: datetime | None = None

    @classmethod
    def from_json(cls, data: Any, *, keep_runtime: bool = False) -> Job:
        """Build a job from decoded JSON, checking each field's type.

        Runtime fields (counters, status, dependent_jobs, schedule_since)
        are ignored unless `keep_runtime` is set, as when restoring a backup.

        Raises:
            ValidationError: a field has the wrong type or value; the message
                and `.field` name it.
        """
        if not isinstance(data, dict):
            raise ValidationError("job: expected a JSON object")
        concurrency = _string(data, "concurrency") or CONCURRENCY_ALLOW
        if concurrency not in (CONCURRENCY_ALLOW, CONCURRENCY_FORBID):
            raise ValidationError(
                f"concurrency: {concurrency!r} is not 'allow' or 'forbid'",
                "concurrency",
            )
        job = cls(
            name=validate_name(data.get("name")),
            schedule=_string(data, "schedule").strip(),
            displayname=_string(data, "displayname"),
            timezone=_string(data, "timezone"),
            owner=_string(data, "owner"),
            owner_email=_string(data, "owner_email"),
            disabled=_bool(data, "disabled"),
            tags=_string_map(data.get("tags"), "tags"),
            metadata=_string_map(data.get("metadata"), "metadata"),
            retries=_uint(data, "retries"),
            retry_backoff=_retry_backoff(data.get("retry_backoff")),
            retry_any_node=_bool(data, "retry_any_node"),
            parent_job=_string(data, "parent_job"),
            concurrency=concurrency,
            executor=_string(data, "executor"),
            executor_config=_string_map(data.get("executor_config"), "executor_config"),
            processors=_processors(data.get("processors")),
            ephemeral=_bool(data, "ephemeral"),
            starts_at=parse_time(data.get("starts_at"), "starts_at"),
            expires_at=parse_time(data.get("expires_at"), "expires_at"),
        )
        for key, value in job.tags.items():
            if not key.strip():
                raise ValidationError(
                    f"tags: {key!r} is not a tag name (an empty name matches no node)",
                    "tags",
                )
            _head, sep, count = value.partition(":")
            if sep and (not count.isdigit() or int(count) == 0):
                raise ValidationError(
                    f"tags.{key}: {value!r}: the part after ':' must be a number "
                    "of nodes, at least 1",
                    "tags",
                )
        if job.parent_job:
            validate_name(job.parent_job, "parent_job")
            if job.parent_job == job.name:
                raise ValidationError(
                    "parent_job: a job cannot be its own parent", "parent_job"
                )
        if keep_runtime:
            job.status = _string(data, "status")
            if job.status not in ("", *JOB_STATUSES):
                raise ValidationError(
                    f"status: {job.status!r} is not one of {JOB_STATUSES}", "status"
                )
            job.success_count = _uint(data, "success_count")
            job.error_count = _uint(data, "error_count")
            job.last_success = parse_time(data.get("last_success"), "last_success")
            job.last_error = parse_time(data.get("last_error"), "last_error")
            job.schedule_since = parse_time(
                data.get("schedule_since"), "schedule_since"
            )
            deps = data.get("dependent_jobs") or []
            if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
                raise ValidationError(
                    "dependent_jobs: expected a list of job names", "dependent_jobs"
                )
            job.dependent_jobs = list(deps)
        return job

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> Job:
        """A job from a row the state store wrote (`to_json` of a valid job).

        Such a row was checked by `from_json` before it was stored, so this
        skips the checks: it gives what `from_json(data, keep_runtime=True)`
        gives for it, several times faster. Never use it on client input.
        """
        get = data.get
        processors = get("processors") or {}
        return cls(
            name=data["name"],
            schedule=get("schedule") or "",
            displayname=get("displayname") or "",
            timezone=get("timezone") or "",
            owner=get("owner") or "",
            owner_email=get("owner_email") or "",
            disabled=bool(get("disabled")),
            tags=dict(get("tags") or {}),
            metadata=dict(get("metadata") or {}),
            retries=get("retries") or 0,
            retry_backoff=dict(get("retry_backoff") or {}),
            retry_any_node=bool(get("retry_any_node")),
            parent_job=get("parent_job") or "",
            dependent_jobs=list(get("dependent_jobs") or []),
            concurrency=get("concurrency") or CONCURRENCY_ALLOW,
            executor=get("executor") or "",
            executor_config=dict(get("executor_config") or {}),
            processors={str(k): dict(v or {}) for k, v in processors.items()},
            ephemeral=bool(get("ephemeral")),
            starts_at=parse_time(get("starts_at"), "starts_at"),
            expires_at=parse_time(get("expires_at"), "expires_at"),
            status=get("status") or "",
            success_count=get("success_count") or 0,
            error_count=get("error_count") or 0,
            last_success=parse_time(get("last_success"), "last_success"),
            last_error=parse_time(get("last_error"), "last_error"),
            schedule_since=parse_time(get("schedule_since"), "schedule_since"),
        )

    def to_json(self) -> dict[str, Any]:
        """The job as Dkron's API shows it (without `next`, which is live).

        `id` first, then every field in declaration order; dicts and lists
        are copies. Written out field by field: it runs on every execution.
        """
        return {
            "id": self.name,
            "name": self.name,
            "schedule": self.schedule,
            "displayname": self.displayname,
            "timezone": self.timezone,
            "owner": self.owner,
            "owner_email": self.owner_email,
            "disabled": self.disabled,
            "tags": dict(self.tags),
            "metadata": dict(self.metadata),
            "retries": self.retries,
            "retry_backoff": dict(self.retry_backoff),
            "retry_any_node": self.retry_any_node,
            "parent_job": self.parent_job,
            "dependent_jobs": list(self.dependent_jobs),
            "concurrency": self.concurrency,
            "executor": self.executor,
            "executor_config": dict(self.executor_config),
            "processors": {k: dict(v) for k, v in self.processors.items()},
            "ephemeral": self.ephemeral,
            "starts_at": format_time(self.starts_at),
            "expires_at": format_time(self.expires_at),
            "status": self.status,
            "success_count": self.success_count,
            "error_count": self.error_count,
            "last_success": format_time(self.last_success),
            "last_error": format_time(self.last_error),
            "schedule_since": format_time(self.schedule_since),
        }

    def copy(self) -> Job:
        return Job.from_stored(self.to_json())


# Every field a job document may carry: Dkron's (including the live `next`)
# and ours. Anything else is ignored, as Dkron does, but said (job_warnings).
JOB_FIELDS = frozenset(
    {
        *Job(name="x").to_json(),
        "next",
    }
)


def unknown_job_fields(data: Any) -> list[str]:
    """One warning per field of `data` that no job has (a typo, mostly)."""
    if not isinstance(data, dict):
        return []
    warnings = []
    for key in sorted(str(k) for k in data if k not in JOB_FIELDS):
        close = difflib.get_close_matches(key, JOB_FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        warnings.append(f"{key}: not a job field, ignored{hint}")
    return warnings


@dataclass
class Execution:
    """One run of a job on one node (Dkron's execution fields plus ours)."""

    job_name: str
    started_at: datetime
    node_name: str
    group: int
    attempt: int = 1
    finished_at: datetime | None = None
    success: bool = False
    output: str = ""
    # Ours: the fire instant this run belongs to (None for manual runs),
    # and what started it ("schedule", "manual", "retry", "dependent").
    scheduled_at: datetime | None = None
    trigger: str = "schedule"
    # Ours: "" when the agent reported the result; "handover" when the
    # leader failed the run while its hand-over was unanswered (the agent's
    # own later report may then replace it, see core/fsm.py).
    verdict: str = ""

    @property
    def id(self) -> str:
        return execution_id(self.started_at, self.node_name)

    @property
    def running(self) -> bool:
        return self.finished_at is None

    @property
    def status(self) -> str:
        if self.finished_at is None:
            return STATUS_RUNNING
        return STATUS_SUCCESS if self.success else STATUS_FAILED

    def to_json(self, *, with_output: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "job_name": self.job_name,
            "started_at": format_time(self.started_at),
            "finished_at": format_time(self.finished_at),
            "success": self.success,
            "node_name": self.node_name,
            "group": self.group,
            "attempt": self.attempt,
            "status": self.status,
            "scheduled_at": format_time(self.scheduled_at),
            "trigger": self.trigger,
        }
        if self.verdict:
            data["verdict"] = self.verdict
        if with_output:
            data["output"] = self.output
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Execution:
        started = parse_time(data["started_at"], "started_at")
        if started is None:
            raise ValidationError("started_at: required", "started_at")
        return cls(
            job_name=data["job_name"],
            started_at=started,
            node_name=data["node_name"],
            group=int(data["group"]),
            attempt=int(data.get("attempt", 1)),
            finished_at=parse_time(data.get("finished_at"), "finished_at"),
            success=bool(data.get("success", False)),
            output=data.get("output", ""),
            scheduled_at=parse_time(data.get("scheduled_at"), "scheduled_at"),
            trigger=data.get("trigger", "schedule"),
            verdict=str(data.get("verdict", "")),
        )


def to_ns(value: datetime) -> int:
    """Nanoseconds since the epoch of an aware datetime (µs precision)."""
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + (
        delta.microseconds * 1000
    )


def execution_id(started_at: datetime, node_name: str) -> str:
    return f"{to_ns(started_at)}-{node_name}"


def backoff_seconds(text: str, where: str) -> float:
    """A Go duration ("500ms", "1m30s") in seconds, for retry_backoff."""
    from cronmesh.core.schedule import go_duration_seconds

    try:
        seconds = go_duration_seconds(text)
    except ValueError as exc:
        raise ValidationError(f"{where}: {exc}", "retry_backoff") from exc
    if seconds <= 0:
        raise ValidationError(
            f"{where}: must be positive, got {text!r}", "retry_backoff"
        )
    return seconds


def _retry_backoff(value: Any) -> dict[str, str]:
    if value is None or value == {}:
        return {}
    if not isinstance(value, dict):
        raise ValidationError(
            'retry_backoff: expected {"initial": "<duration>", "max": "<duration>"}',
            "retry_backoff",
        )
    unknown = set(value) - {"initial", "max"}
    if unknown:
        raise ValidationError(
            f"retry_backoff: unknown key {sorted(unknown)[0]!r} "
            "(expected initial and max)",
            "retry_backoff",
        )
    out: dict[str, str] = {}
    for key in ("initial", "max"):
        if key in value:
            if not isinstance(value[key], str):
                raise ValidationError(
                    f'retry_backoff.{key}: expected a duration string like "5s"',
                    "retry_backoff",
                )
            backoff_seconds(value[key], f"retry_backoff.{key}")
            out[key] = value[key]
    if (
        "initial" in out
        and "max" in out
        and backoff_seconds(out["max"], "retry_backoff.max")
        < backoff_seconds(out["initial"], "retry_backoff.initial")
    ):
        raise ValidationError(
            "retry_backoff: max must not be shorter than initial", "retry_backoff"
        )
    return out
