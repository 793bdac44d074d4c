"""An agent's outbox: executions it runs and results not yet acknowledged.

The leader commits an execution's start, then asks the target agent to run
it. The agent first records the execution here (state "running"), runs it,
writes the result here (state "done"), and only then reports it; the record
goes once a leader has committed the result. So a result survives a crash
of the agent after the job ended, and a leader that dies mid-run loses
nothing: the agent reports to whichever server leads next.

After a restart, a "running" record means the agent died during the run:
it is reported as failed ("interrupted"); a "done" one is reported as is.

Writes from one event-loop turn share one transaction (and one fsync): a
burst of 200 dispatches costs a few commits, not 200.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from cronmesh.core.model import Execution
from cronmesh.storage.env import DataDir

__all__ = ["Outbox", "OutboxRecord"]

log = logging.getLogger("cronmesh.outbox")

TABLE = "outbox"


class OutboxRecord:
    """One execution in the outbox."""

    __slots__ = ("done", "execution", "job")

    def __init__(self, execution: Execution, job: dict[str, Any], done: bool):
        self.execution = execution
        self.job = job
        self.done = done


class Outbox:
    """Durable per-agent record of executions until the leader has them."""

    def __init__(self, data: DataDir) -> None:
        self.data = data
        self._db = data.db(TABLE)
        self._pending: list[tuple[bytes, bytes | None, asyncio.Future[None]]] = []
        self._flush_scheduled = False

    async def put_running(self, execution: Execution, job: dict[str, Any]) -> None:
        await self._write(execution.id, {"job": job, "execution": execution.to_json()})

    async def put_done(self, execution: Execution) -> None:
        """Record the result (the job document is not needed any more)."""
        await self._write(
            execution.id, {"done": True, "execution": execution.to_json()}
        )

    async def remove(self, exec_id: str) -> None:
        await self._write(exec_id, None)

    def records(self) -> list[OutboxRecord]:
        found = []
        with self.data.read() as txn, txn.cursor(db=self._db) as cur:
            for key, raw in cur:
                try:
                    doc = json.loads(raw)
                    execution = Execution.from_json(doc["execution"])
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning(
                        "dropping unreadable outbox record key=%r: %s", key, exc
                    )
                    continue
                found.append(
                    OutboxRecord(execution, doc.get("job") or {}, bool(doc.get("done")))
                )
        return found

    def __contains__(self, exec_id: str) -> bool:
        with self.data.read() as txn:
            return txn.get(exec_id.encode(), db=self._db) is not None

    async def _write(self, exec_id: str, doc: dict[str, Any] | None) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        raw = None if doc is None else json.dumps(doc, separators=(",", ":")).encode()
        self._pending.append((exec_id.encode(), raw, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []

        def write(txn: Any) -> None:
            for key, raw, _ in batch:
                if raw is None:
                    txn.delete(key, db=self._db)
                else:
                    txn.put(key, raw, db=self._db)

        try:
            self.data.write(write)
        except Exception as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for _, _, future in batch:
            if not future.done():
                future.set_result(None)
