"""Restore a backup: Dkron's array of jobs, or cronmesh's backup document.

Three shapes are accepted:

- Dkron's: the JSON array `GET /v1/jobs` answers (what Dkron's own
  `/v1/restore` takes);
- ours: `{"cronmesh_backup": 1, "jobs": [...], "last_fire": {...},
  "executions": {...}}`, as `GET /v1/backup` writes it (api/backup.py);
- `{"jobs": [...]}`, an older shape of ours.

The whole file is checked first: every job (fields, schedule, executor),
names used once, every parent in the file or in the cluster, no cycle
through parents (with the cluster's jobs included), every execution well
formed and of a job of the file. One problem and nothing is written: the
400 answer lists every rejected job. Then the content is written by ONE
`restore` command of the state machine, all or nothing through Raft.

A restore larger than one Raft entry may be (MAX_COMMAND_BYTES) is sent in
parts first (`restore_part`, staged in their own table, invisible), and the
`restore` command then names them: the parts are many entries, the restore
is still one. We split rather than raise gRPC's message limit, because one
entry of hundreds of megabytes would have to travel whole in one message
to every follower.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cronmesh.core.commitlog import NotLeaderError
from cronmesh.core.fsm import ApplyResult, encode_command
from cronmesh.core.model import Execution, Job, execution_id, format_time, parse_time
from cronmesh.errors import ConflictError, CronmeshError, ValidationError

if TYPE_CHECKING:
    from cronmesh.agent import Agent

__all__ = [
    "FORMAT_VERSION",
    "PART_BYTES",
    "RestoreRejected",
    "restore_jobs",
    "settled_read",
]

log = logging.getLogger("cronmesh.restore")

FORMAT_VERSION = 1  # "cronmesh_backup" of the documents we write and read
PART_BYTES = 1 << 20  # a restore larger than this goes in parts of this size

OUTCOME_TRIES = 20  # read barriers tried after a leader change, 0.5 s apart

Validate = Callable[..., Job]  # Agent.validate_job


class RestoreRejected(ValidationError):
    """A backup file with problems; `rejected` names each one."""

    def __init__(self, message: str, rejected: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.rejected = rejected


@dataclass
class _Content:
    """What a backup file holds, as the `restore` command carries it."""

    jobs: list[Any]
    executions: dict[str, Any] = field(default_factory=dict)
    last_fire: dict[str, Any] = field(default_factory=dict)


def parse_backup(data: bytes) -> _Content:
    """The jobs, executions and last fires of a backup file (not checked yet).

    Raises:
        ValidationError: not JSON, or not one of the accepted shapes.
    """
    try:
        document = json.loads(data)
    except UnicodeDecodeError as exc:
        raise ValidationError(f"file: not UTF-8 JSON: {exc.reason}") from exc
    except ValueError as exc:
        raise ValidationError(
            f"file: invalid JSON (corrupt or truncated?): {exc}"
        ) from exc
    except RecursionError as exc:
        raise ValidationError("file: JSON nested too deeply") from exc
    if isinstance(document, list):
        return _Content(document)
    if not isinstance(document, dict) or not isinstance(document.get("jobs"), list):
        raise ValidationError(
            "file: expected a JSON array of jobs (Dkron) or a cronmesh backup "
            '{"cronmesh_backup": 1, "jobs": [...]}'
        )
    version = document.get("cronmesh_backup", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValidationError(
            f"cronmesh_backup: version {version!r} is not {FORMAT_VERSION}, the one "
            "this cronmesh reads"
        )
    executions = document.get("executions") or {}
    last_fire = document.get("last_fire") or {}
    for key, value in (("executions", executions), ("last_fire", last_fire)):
        if not isinstance(value, dict):
            raise ValidationError(f"{key}: expected an object keyed by job name")
    return _Content(document["jobs"], executions, last_fire)


@dataclass
class _Plan:
    """A checked backup, ready to propose."""

    jobs: list[str]  # names, in file order
    executions: int
    commands: list[bytes]  # restore_part commands (maybe none), then restore
    restore_id: str
    staged: bool = False  # parts go first


async def restore_jobs(
    agent: Agent, data: bytes, *, dry_run: bool = False
) -> dict[str, Any]:
    """Check all of `data`, then store it in one command (unless `dry_run`).

    Returns the answer of `POST /v1/restore`: each job with `created` or
    `updated`, the totals, and how many executions were restored.

    Raises:
        RestoreRejected: a problem in the file; nothing was written.
        ConflictError: another restore replaced this one's parts.
    """
    # The parents and the created/updated report come from this server's
    # state: first make it as new as the leader's.
    await settled_read(agent)
    parents = {j.name: j.parent_job for j in agent.store.list_jobs()}
    # Decoding and checking thousands of jobs takes CPU seconds; in a thread,
    # this server's loop keeps answering Raft meanwhile (a leader that goes
    # quiet for an election timeout loses its leadership).
    plan = await asyncio.to_thread(_plan, agent.validate_job, data, parents)
    if dry_run:
        report = [
            {"name": name, "result": "updated" if name in parents else "created"}
            for name in plan.jobs
        ]
        return _answer(report, plan.executions, dry_run=True)
    result = await _propose(agent, plan)
    if not result.ok:
        if result.code == 409:
            raise ConflictError(result.error)
        if result.code == 400:
            raise RestoreRejected(f"file: nothing was restored: {result.error}", [])
        raise CronmeshError(f"nothing was restored: {result.error}")
    value = result.value
    return _answer(list(value["jobs"]), int(value["executions"]), dry_run=False)


def _plan(validate: Validate, data: bytes, parents: dict[str, str]) -> _Plan:
    """Parse and check a backup, and encode the commands that restore it."""
    content = parse_backup(data)
    jobs, executions, rejected = _check(validate, parents, content)
    if rejected:
        names = "; ".join(f"{r['name'] or r['index']}: {r['error']}" for r in rejected)
        raise RestoreRejected(
            f"file: {len(rejected)} problem(s), nothing was restored: {names}",
            rejected,
        )
    names = [j["name"] for j in jobs]
    restore_id = secrets.token_hex(8)
    command = encode_command(
        "restore",
        id=restore_id,
        jobs=jobs,
        executions=executions,
        last_fire=content.last_fire,
    )
    if len(command) <= PART_BYTES:
        return _Plan(names, len(executions), [command], restore_id)
    parts = list(_parts(jobs, executions, content.last_fire))
    commands = [
        encode_command("restore_part", id=restore_id, seq=seq, part=part)
        for seq, part in enumerate(parts)
    ]
    commands.append(encode_command("restore", staged=restore_id, parts=len(parts)))
    return _Plan(names, len(executions), commands, restore_id, staged=True)


def _answer(
    report: list[dict[str, str]], executions: int, *, dry_run: bool
) -> dict[str, Any]:
    results = [r["result"] for r in report]
    return {
        "dry_run": dry_run,
        "jobs": report,
        "created": results.count("created"),
        "updated": results.count("updated"),
        "rejected": 0,
        "executions": executions,
    }


# -- checks
def _check(
    validate: Validate, parents: dict[str, str], content: _Content
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(valid jobs as JSON, valid executions as JSON, rejected entries)."""
    rejected: list[dict[str, Any]] = []

    def reject(index: int | None, name: Any, error: str) -> None:
        rejected.append(
            {"index": index, "name": name, "result": "rejected", "error": error}
        )

    jobs: dict[str, dict[str, Any]] = {}
    refused: set[Any] = set()  # names of jobs rejected above: no follow-on errors
    for position, item in enumerate(content.jobs):
        try:
            job = validate(item, keep_runtime=True)
        except ValidationError as exc:
            name = item.get("name") if isinstance(item, dict) else None
            reject(position, name, str(exc))
            if isinstance(name, str):
                refused.add(name)
            continue
        if job.name in jobs:
            reject(position, job.name, "appears more than once in the file")
            continue
        jobs[job.name] = job.to_json()
    for name, problem in _parent_problems(parents, jobs).items():
        reject(None, name, problem)
    executions: list[dict[str, Any]] = []
    for name, items in content.executions.items():
        if name in refused:
            continue
        problem = _check_executions(name, items, jobs, executions)
        if problem:
            reject(None, name, problem)
    for name, value in content.last_fire.items():
        if name in refused:
            continue
        try:
            if name not in jobs:
                raise ValidationError(f"last_fire: job {name!r} is not in the file")
            content.last_fire[name] = format_time(parse_time(value, "last_fire"))
        except ValidationError as exc:
            reject(None, name, str(exc))
    return list(jobs.values()), executions, rejected


def _parent_problems(
    parents: dict[str, str], jobs: dict[str, dict[str, Any]]
) -> dict[str, str]:
    """Per job name: a missing parent, or a cycle through parents.

    The cluster's jobs count too: a file may hang a job under an existing
    one, or make an existing job's parent a child of its own child.
    """
    parent_of = dict(parents)
    parent_of.update({name: job["parent_job"] for name, job in jobs.items()})
    problems: dict[str, str] = {}
    for name in jobs:
        chain = [name]
        parent = parent_of.get(name, "")
        while parent:
            if parent not in parent_of:
                if len(chain) == 1:
                    problems[name] = (
                        f"parent_job: parent job {parent!r} is neither in the "
                        "file nor in the cluster"
                    )
                break
            if parent in chain:
                cycle = " -> ".join([*chain[chain.index(parent) :], parent])
                problems[name] = f"parent_job: cycle through parents: {cycle}"
                break
            chain.append(parent)
            parent = parent_of.get(parent, "")
    return problems


def _check_executions(
    name: str, items: Any, jobs: dict[str, Any], into: list[dict[str, Any]]
) -> str | None:
    """Check the executions of job `name`; the valid ones go to `into`."""
    if name not in jobs:
        return f"executions: job {name!r} is not in the file"
    if not isinstance(items, list):
        return "executions: expected a list"
    checked = []
    for position, item in enumerate(items):
        try:
            checked.append(_execution(name, item))
        except ValidationError as exc:
            return f"executions[{position}]: {exc}"
    into += checked
    return None


def _execution(job: str, item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ValidationError("expected a JSON object")
    if item.get("job_name", job) != job:
        raise ValidationError(f"job_name {item.get('job_name')!r} is not {job!r}")
    for key in ("node_name", "output"):
        if not isinstance(item.get(key, ""), str):
            raise ValidationError(f"{key}: expected a string")
    if not item.get("node_name"):
        raise ValidationError("node_name: required")
    try:
        execution = Execution.from_json({**item, "job_name": job})
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            raise
        raise ValidationError(f"malformed execution: {exc!r}") from exc
    if execution.finished_at is None:
        raise ValidationError(
            "finished_at: required (a backup holds finished runs only)"
        )
    wanted = execution_id(execution.started_at, execution.node_name)
    if item.get("id", wanted) != wanted:
        raise ValidationError(
            f"id: {item.get('id')!r} does not match started_at and node_name "
            f"({wanted!r})"
        )
    return execution.to_json()


# -- writing
async def _propose(agent: Agent, plan: _Plan) -> ApplyResult:
    """Stage the parts (if any), then propose the one `restore` command."""
    if plan.staged:
        size = sum(len(c) for c in plan.commands)
        log.info(
            "restore in parts id=%s parts=%d bytes=%d",
            plan.restore_id,
            len(plan.commands) - 1,
            size,
        )
    try:
        for seq, command in enumerate(plan.commands[:-1]):
            staged = await agent.log.propose(command)
            if not staged.ok:
                raise CronmeshError(f"staging part {seq}: {staged.error}")
        try:
            # Through the agent: a follower answers once it has the result.
            return await agent.propose(plan.commands[-1])
        except CronmeshError:
            # Lost with the leader, or committed just before it went?
            outcome = await _outcome(agent, plan.restore_id)
            if outcome is None:
                raise
            return outcome
    except CronmeshError:
        if plan.staged:
            await _abandon(agent, plan.restore_id)
        raise


async def _outcome(agent: Agent, restore_id: str) -> ApplyResult | None:
    """The result of restore `restore_id` if it was committed (None if not),
    once a leader confirms this server has every committed entry."""
    try:
        await settled_read(agent, OUTCOME_TRIES)
    except CronmeshError:
        return None
    with agent.store.view() as view:
        answer = view.restored(restore_id)
    if answer is None:
        return None
    log.info("restore committed before the leader changed id=%s", restore_id)
    return ApplyResult(value=json.loads(answer))


async def settled_read(agent: Agent, tries: int = 10) -> None:
    """A read barrier (`?consistent`), tried again while a leader is elected.

    Raises:
        NotLeaderError: still no leader confirmed the read after `tries`.
    """
    for attempt in range(tries):
        try:
            await agent.consistent_read()
            return
        except NotLeaderError:
            if attempt == tries - 1:
                raise
            await asyncio.sleep(0.5)


async def _abandon(agent: Agent, restore_id: str) -> None:
    try:
        await agent.log.propose(encode_command("restore_abort", id=restore_id))
    except CronmeshError as exc:
        # The next restore drops them anyway (restore_part 0).
        log.info("restore parts left behind id=%s error=%s", restore_id, exc)


def _parts(
    jobs: list[dict[str, Any]],
    executions: list[dict[str, Any]],
    last_fire: dict[str, Any],
) -> Iterable[dict[str, Any]]:
    """Pack the items into parts of about PART_BYTES each (an item larger
    than that goes alone; the Raft driver refuses it past its own limit)."""
    items: list[tuple[str, Any]] = [("jobs", j) for j in jobs]
    items += [("executions", e) for e in executions]
    items += [("last_fire", (k, v)) for k, v in last_fire.items()]
    part: dict[str, Any] = {"jobs": [], "executions": [], "last_fire": {}}
    size = 0
    for kind, item in items:
        item_size = len(json.dumps(item)) + 8
        if size and size + item_size > PART_BYTES:
            yield part
            part = {"jobs": [], "executions": [], "last_fire": {}}
            size = 0
        if kind == "last_fire":
            part["last_fire"][item[0]] = item[1]
        else:
            part[kind].append(item)
        size += item_size
    if size:
        yield part
