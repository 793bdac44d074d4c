"""An agent's outbox: executions it runs and results not yet acknowledged.

The leader commits an execution's start, then asks the target agent to run
it. The agent first records the execution here (state "running"), runs it,
writes the result here (state "done"), and only then reports it; the record
goes once a leader has committed the result. So a result survives a crash
of the agent after the job ended, and a leader that dies mid-run loses
nothing: the agent reports to whichever server leads next.

After a restart, a "running" record means the agent died during the run:
it is reported as failed ("interrupted"); a "done" one is reported as is.
Once a running execution's first process has started, its pid and start
time are kept beside the record (table "procs"), so that a restart can
stop what is left of it (cronmesh/core/orphans.py).

The outbox is an LMDB environment of its own (`outbox/` in the data dir),
opened without fsync on commit: a "running" record survives a crash of the
agent (it is in the page cache) but not necessarily a power loss, which
costs nothing on the hot path; a result is followed by an explicit fsync
before it is reported, so it survives both. Writes from one event-loop turn
share one transaction (and at most one fsync): a burst of 200 dispatches
costs a few commits, not 200.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import lmdb

from cronmesh.core.model import Execution
from cronmesh.errors import StorageError
from cronmesh.storage.env import DataDir

__all__ = ["Outbox", "OutboxRecord"]

log = logging.getLogger("cronmesh.outbox")

TABLE = "outbox"
PROCS_TABLE = "procs"

# A queued write: table, key, value (None deletes), fsync wanted, who waits.
_Write = tuple[Any, bytes, bytes | None, bool, asyncio.Future[None]]


class OutboxRecord:
    """One execution in the outbox."""

    __slots__ = ("done", "execution", "job", "process")

    def __init__(
        self,
        execution: Execution,
        job: dict[str, Any],
        done: bool,
        process: dict[str, Any] | None = None,
    ):
        self.execution = execution
        self.job = job
        self.done = done
        # What `note_process` kept for a running execution, if anything.
        self.process = process


class Outbox:
    """Durable per-agent record of executions until the leader has them."""

    def __init__(self, data: DataDir) -> None:
        # `data` holds the lock of the data dir, which covers this env too.
        path = data.path / "outbox"
        try:
            self.env = lmdb.open(
                str(path),
                map_size=256 << 20,
                max_dbs=4,
                subdir=True,
                sync=False,
                metasync=False,
            )
        except lmdb.Error as exc:
            raise StorageError(f"cannot open the outbox in {path}: {exc}") from exc
        self._db = self.env.open_db(TABLE.encode(), create=True)
        self._procs = self.env.open_db(PROCS_TABLE.encode(), create=True)
        self._pending: list[_Write] = []
        self._flush_scheduled = False

    def close(self) -> None:
        self.env.close()

    async def put_running(self, execution: Execution, job: dict[str, Any]) -> None:
        await self._write(
            execution.id, {"job": job, "execution": execution.to_json()}, durable=False
        )

    def note_process(self, exec_id: str, process: dict[str, Any]) -> None:
        """Keep who a running execution's first process is (no fsync; the
        caller does not wait: it joins this turn's transaction)."""
        loop = asyncio.get_running_loop()
        raw = json.dumps(process, separators=(",", ":")).encode()
        future = self._queue(loop, self._procs, exec_id, raw, durable=False)
        future.add_done_callback(_log_failure)

    async def put_done(self, execution: Execution) -> None:
        """Record the result durably (fsync) before it is reported; the
        run's process record, if any, goes in the same transaction."""
        loop = asyncio.get_running_loop()
        forget = self._queue(loop, self._procs, execution.id, None, durable=False)
        forget.add_done_callback(_log_failure)
        await self._write(
            execution.id, {"done": True, "execution": execution.to_json()}, durable=True
        )

    async def remove(self, exec_id: str) -> None:
        # A removal lost to a power cut only makes the result be reported
        # again, which the state machine answers as a duplicate.
        await self._write(exec_id, None, durable=False)

    def records(self) -> list[OutboxRecord]:
        found = []
        with self.env.begin(buffers=False) as txn, txn.cursor(db=self._db) as cur:
            for key, raw in cur:
                process = _process_doc(txn.get(key, db=self._procs))
                try:
                    doc = json.loads(raw)
                    execution = Execution.from_json(doc["execution"])
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning(
                        "dropping unreadable outbox record key=%r: %s", key, exc
                    )
                    continue
                found.append(
                    OutboxRecord(
                        execution, doc.get("job") or {}, bool(doc.get("done")), process
                    )
                )
        return found

    def __contains__(self, exec_id: str) -> bool:
        with self.env.begin() as txn:
            return txn.get(exec_id.encode(), db=self._db) is not None

    async def _write(
        self, exec_id: str, doc: dict[str, Any] | None, *, durable: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        raw = None if doc is None else json.dumps(doc, separators=(",", ":")).encode()
        await self._queue(loop, self._db, exec_id, raw, durable=durable)

    def _queue(
        self,
        loop: asyncio.AbstractEventLoop,
        db: Any,
        exec_id: str,
        raw: bytes | None,
        *,
        durable: bool,
    ) -> asyncio.Future[None]:
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((db, exec_id.encode(), raw, durable, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        try:
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        for db, key, raw, _, _ in batch:
                            if raw is None:
                                txn.delete(key, db=db)
                            else:
                                txn.put(key, raw, db=db)
                    break
                except lmdb.MapFullError:
                    self.env.set_mapsize(self.env.info()["map_size"] * 2)
            if any(durable for _, _, _, durable, _ in batch):
                self.env.sync(True)
        except lmdb.Error as exc:
            error = StorageError(f"outbox write failed: {exc}")
            for *_, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for *_, future in batch:
            if not future.done():
                future.set_result(None)


def _process_doc(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _log_failure(future: asyncio.Future[None]) -> None:
    # Nobody awaits these writes; a failed one only costs the record of a
    # process, so it is logged, not raised.
    if not future.cancelled() and future.exception() is not None:
        log.warning("outbox process record not written: %s", future.exception())
