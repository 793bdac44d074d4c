"""The backup document `GET /v1/backup` writes and `POST /v1/restore` reads.

    {
      "cronmesh_backup": 1,                 format version
      "created_at": "2026-12-04T18:00:00Z",
      "node": "s1",                         the server that wrote it
      "applied_index": 1234,                its state as of this log index
      "jobs": [ {job as GET /v1/jobs shows it, counters included, no "next"} ],
      "last_fire": {"job": "RFC 3339"},     the last fire instant committed
      "executions": {"job": [ {execution as the API shows it, output
                              included} ]}  only with ?executions=true
    }

`jobs` alone is what Dkron's restore takes (`jq .jobs`). Executions still
running when the backup is read are left out: they have no result yet, and
a restored cluster could never finish them.

The state is read in one LMDB read transaction, so the document is one
consistent state; it is then encoded and sent job by job.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cronmesh.api.restore import FORMAT_VERSION
from cronmesh.core.model import format_time
from cronmesh.storage.state import StateStore

__all__ = ["Captured", "capture", "render"]


@dataclass
class Captured:
    """The rows of a backup, read in one transaction and not yet encoded."""

    applied_index: int
    jobs: list[dict[str, Any]] = field(default_factory=list)
    last_fire: dict[str, str] = field(default_factory=dict)
    # job name -> [(execution row JSON without output, output bytes)]
    executions: dict[str, list[tuple[bytes, bytes]]] = field(default_factory=dict)

    @property
    def execution_count(self) -> int:
        return sum(len(rows) for rows in self.executions.values())


def capture(store: StateStore, *, executions: bool) -> Captured:
    """Read every job (and its finished executions) in one transaction.

    Limitation: the whole state is held in memory while it is sent, as a
    Raft snapshot is; a state of several GiB needs that much memory.
    """
    with store.view() as view:
        found = Captured(view.applied_index())
        running = set(view.running_keys()) if executions else set()
        for job in view.iter_jobs():
            found.jobs.append(job.to_json())
            last = view.last_fire(job.name)
            if last is not None:
                found.last_fire[job.name] = format_time(last) or ""
            if not executions:
                continue
            rows = found.executions[job.name] = []
            for key in view.iter_execution_keys(job.name):
                if key in running:
                    continue
                row = view.txn.get(key, db=view.t["execs"])
                output = view.txn.get(key, db=view.t["outputs"])
                rows.append((bytes(row), b"" if output is None else bytes(output)))
    return found


def render(captured: Captured, node: str, *, executions: bool) -> Iterator[bytes]:
    """The document in pieces of about one job each."""
    created = format_time(datetime.now(UTC).replace(microsecond=0))
    head = {
        "cronmesh_backup": FORMAT_VERSION,
        "created_at": created,
        "node": node,
        "applied_index": captured.applied_index,
    }
    yield _dump(head)[:-1].encode() + b',\n"jobs": ['
    for position, job in enumerate(captured.jobs):
        yield (b",\n" if position else b"\n") + _dump(job).encode()
    yield b'\n],\n"last_fire": ' + _dump(captured.last_fire).encode()
    if executions:
        yield b',\n"executions": {'
        for position, (name, rows) in enumerate(captured.executions.items()):
            items = []
            for row, output in rows:
                item = json.loads(row)
                item["output"] = output.decode(errors="replace")
                items.append(_dump(item))
            sep = b",\n" if position else b"\n"
            body = "[" + ",\n".join(items) + "]"
            yield sep + _dump(name).encode() + b": " + body.encode()
        yield b"\n}"
    yield b"\n}\n"


def _dump(value: Any) -> str:
    # ensure_ascii: a lone surrogate in an old row still gives valid bytes.
    return json.dumps(value, separators=(",", ":"))
