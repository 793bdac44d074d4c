"""Restore jobs from a backup: Dkron's array of jobs, or cronmesh's document.

The whole file is checked before anything is written, and the jobs are then
written by one `restore` command, so a restore is all or nothing.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from cronmesh.core.fsm import encode_command
from cronmesh.errors import NotFoundError, ValidationError

if TYPE_CHECKING:
    from cronmesh.agent import Agent

__all__ = ["parse_backup", "restore_jobs"]


def parse_backup(data: bytes) -> list[Any]:
    """The list of job objects in a backup file."""
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise ValidationError(f"file: invalid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ValidationError("file: JSON nested too deeply") from exc
    if isinstance(document, dict) and isinstance(document.get("jobs"), list):
        return list(document["jobs"])
    if isinstance(document, list):
        return document
    raise ValidationError('file: expected a JSON array of jobs or {"jobs": [...]}')


async def restore_jobs(
    agent: Agent, data: bytes, *, dry_run: bool = False
) -> dict[str, Any]:
    """Validate every job of `data`, then store them all in one command."""
    jobs = parse_backup(data)
    rejected = []
    valid = []
    for position, item in enumerate(jobs):
        try:
            valid.append(agent.validate_job(item, keep_runtime=True).to_json())
        except ValidationError as exc:
            name = item.get("name") if isinstance(item, dict) else None
            rejected.append({"index": position, "name": name, "error": str(exc)})
    seen: set[str] = set()
    for job in valid:
        if job["name"] in seen:
            rejected.append(
                {
                    "index": None,
                    "name": job["name"],
                    "error": "appears more than once in the file",
                }
            )
        seen.add(job["name"])
    if rejected:
        raise ValidationError(
            f"file: {len(rejected)} of {len(jobs)} jobs are invalid; nothing was "
            f"restored: "
            + "; ".join(f"{r['name'] or r['index']}: {r['error']}" for r in rejected)
        )
    if dry_run:
        existing = {j.name for j in agent.store.list_jobs()}
        return {
            "dry_run": True,
            "jobs": [
                {
                    "name": j["name"],
                    "result": "updated" if j["name"] in existing else "created",
                }
                for j in valid
            ],
        }
    result = await agent.propose(encode_command("restore", jobs=valid))
    if result.code == 404:
        raise NotFoundError(result.error)
    if not result.ok:
        raise ValidationError(result.error)
    return {"jobs": result.value}
