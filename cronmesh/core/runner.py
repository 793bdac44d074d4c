"""The runner: runs executions on this node and reports how they ended.

An execution reaches the runner after its start was committed: the leader
hands it over (gRPC AgentRun, or a direct call when it runs here). The
runner first records it in the node's outbox (durable), then runs the
executor, keeps the output in a capped buffer that the API reads while the
job runs, writes the result to the outbox, and proposes `execution_done`
until a leader has committed it; only then does the outbox record go.

So a result is never lost: not when the leader dies during the run (the
report goes to the next leader), not when this agent crashes after the job
ended (the restart reports it from the outbox), and a crash during the run
is reported as an interrupted, failed execution after the restart, once
whatever is left of its process group is stopped (core/orphans.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cronmesh.core.commitlog import MAX_COMMAND_BYTES, CommandLog
from cronmesh.core.executors import Executor, OutputBuffer, get_executor
from cronmesh.core.executors.gate import StartGate
from cronmesh.core.fsm import encode_command
from cronmesh.core.model import Execution, Job, format_time, to_ns
from cronmesh.core.orphans import (
    ORPHAN_GRACE,
    ProcessMark,
    ProcessMarker,
    find_orphans,
    stop_orphans,
)
from cronmesh.core.output import trim_text
from cronmesh.errors import CronmeshError
from cronmesh.storage.outbox import Outbox, OutboxRecord

__all__ = ["LiveExecution", "Runner"]

log = logging.getLogger("cronmesh.runner")

REPORT_RETRY_MAX = 5.0
# Ids of executions that ended here, remembered so a repeated hand-over of
# one (the leader lost the answer and asks again) starts nothing after its
# result left the outbox.
RECENTLY_ENDED = 4096
# Results per executions_done command (keeps one log entry well under 4 MB).
MAX_REPORT_BATCH = 64
# Report batches on their way to the leader at once, per node.
REPORT_PIPELINE = 2
# Bytes of output per batch, counted as the command carries them: JSON
# escapes a control or non-ASCII character into up to 12 bytes, and a
# command over MAX_COMMAND_BYTES is refused (retried for ever, it would hold
# one of the REPORT_PIPELINE places for good).
MAX_REPORT_BYTES = 1 << 20
# A staged run due sooner than this is not gated (its process might not be
# up in time): it waits on a timer and starts at its instant.
GATE_MIN_LEAD = 0.05


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class LiveExecution:
    """An execution running on this node right now."""

    execution: Execution
    job: Job
    buffer: OutputBuffer
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    finished: bool = False
    note: str = ""  # why the runner itself cancelled it, added to the output
    # A staged run: the event loop's time (loop.time()) to start it at.
    start_at: float | None = None


class Runner:
    """Runs committed executions locally and reports their results."""

    def __init__(
        self,
        node_name: str,
        commit_log: CommandLog,
        *,
        max_output: int,
        outbox: Outbox | None = None,
    ) -> None:
        self.node_name = node_name
        self.log = commit_log
        self.max_output = max_output
        self.outbox = outbox
        self.live: dict[str, LiveExecution] = {}
        # Results written to the outbox and not yet committed by a leader.
        self.unreported: dict[str, Execution] = {}
        # Limitation: kept in memory only; a hand-over repeated across a
        # restart of this agent, after the result was delivered, runs again.
        self.ended: OrderedDict[str, None] = OrderedDict()
        self.retry_delay = 0.5
        # Seconds between SIGTERM and SIGKILL for orphans found at restart.
        self.orphan_grace = ORPHAN_GRACE
        self.marker = None if outbox is None else ProcessMarker(self._write_mark)
        self._reports: set[asyncio.Task[None]] = set()
        self._batch: list[tuple[Execution, asyncio.Future[None]]] = []
        self._batch_scheduled = False
        self._delivering = 0  # report batches on their way (REPORT_PIPELINE)
        self._executors: dict[str, Executor] = {}
        # Start gates of staged runs, by their instant (ms since the epoch).
        self._gates: dict[int, StartGate] = {}
        self.on_finished: list[Any] = []
        # Metrics hook: seconds from a scheduled run's instant to its start
        # here (for a run held at a gate, the gate's opening).
        self.observe_start_lag: Callable[[float], None] = lambda seconds: None

    async def accept(
        self, job: Job, execution: Execution, *, start_in: float = 0.0
    ) -> bool:
        """Record `execution` in the outbox and start it, at once or, for a
        staged run, `start_in` seconds from now (idempotent: a repeated
        hand-over of a known execution starts nothing).

        Returns True when this call started it (or set it to start).
        """
        if self.has(execution.id):
            return False
        if self.outbox is not None:
            await self.outbox.put_running(execution, job.to_json())
            if execution.id in self.live:  # a concurrent hand-over won
                return False
        self.start(job, execution, start_in=start_in)
        return True

    def has(self, exec_id: str) -> str:
        """What this node has of an execution: "running", "done" (result
        kept or being reported), or "" (nothing)."""
        live = self.live.get(exec_id)
        if live is not None and not live.finished:
            return "running"
        if live is not None or exec_id in self.unreported or exec_id in self.ended:
            return "done"
        if self.outbox is not None and exec_id in self.outbox:
            return "running"
        return ""

    def start(
        self, job: Job, execution: Execution, *, start_in: float = 0.0
    ) -> LiveExecution:
        """Run `execution` in the background (its outbox record, if any, is
        already written), from `start_in` seconds on."""
        live = LiveExecution(execution, job, OutputBuffer(self.max_output))
        if start_in > 0:
            live.start_at = asyncio.get_running_loop().time() + start_in
        self.live[execution.id] = live
        live.task = asyncio.create_task(self._run(live), name=f"run-{execution.id}")
        return live

    def running_ids(self) -> list[str]:
        """Executions whose executor has not returned yet."""
        return [i for i, live in self.live.items() if not live.finished]

    def output_of(self, exec_id: str) -> str | None:
        live = self.live.get(exec_id)
        return None if live is None else live.buffer.getvalue().decode(errors="replace")

    def read_output(self, exec_id: str, offset: int) -> tuple[bytes, int, bool] | None:
        """New output of a live execution since `offset`: (bytes, offset,
        finished); None when it does not run here."""
        live = self.live.get(exec_id)
        if live is None:
            return None
        data, end = live.buffer.read_from(offset)
        return data, end, live.finished

    def kill(self, exec_id: str) -> bool:
        live = self.live.get(exec_id)
        if live is None or live.finished:
            return False
        log.info("killing execution job=%s execution=%s", live.job.name, exec_id)
        if live.start_at is not None:
            early = live.start_at - asyncio.get_running_loop().time()
            if early > 0:
                live.note = (
                    f"killed {early:.3f}s before its instant: the job never ran "
                    "(its record ends at its instant)"
                )
        live.cancel.set()
        return True

    def _executor(self, name: str) -> Executor:
        """The executor `name`, keeping this runner's `max_output` (the shared
        instances keep 256,000 bytes whatever --max-output says)."""
        executor = self._executors.get(name)
        if executor is None:
            executor = get_executor(name)
            limit = getattr(executor, "max_output", self.max_output)
            if limit != self.max_output:
                executor = type(executor)(max_output=self.max_output)  # type: ignore[call-arg]
            self._executors[name] = executor
        return executor

    async def _run(self, live: LiveExecution) -> None:
        execution, job = live.execution, live.job
        try:
            executor = self._executor(job.executor)
            extra: dict[str, Any] = {}
            gate = None
            if live.start_at is not None:
                gate = self._gate(executor, execution, live.start_at)
                if gate is None:
                    await _until(live.start_at, live.cancel)
                else:
                    extra["gate"] = gate
            if execution.trigger == "schedule" and execution.scheduled_at is not None:
                instant = execution.scheduled_at.timestamp()
                if gate is None:
                    self.observe_start_lag(time.time() - instant)
                else:
                    gate.released.add_done_callback(
                        lambda _: self.observe_start_lag(time.time() - instant)
                    )
            result = await executor.run(
                job.executor_config,
                live.buffer,
                job_name=job.name,
                execution_id=execution.id,
                cancel=live.cancel,
                on_start=lambda pid, reaped: self._note_process(
                    execution.id, pid, reaped
                ),
                **extra,
            )
            success = result.success
            output = result.output.decode(errors="replace")
            if not success:
                log.info(
                    "job failed job=%s execution=%s error=%s",
                    job.name,
                    execution.id,
                    result.error,
                )
        except asyncio.CancelledError:
            success, output = (
                False,
                self._tail(live, "the agent stopped during the run"),
            )
            live.cancel.set()
        except CronmeshError as exc:
            success, output = False, self._tail(live, str(exc))
            log.info(
                "job failed job=%s execution=%s error=%s", job.name, execution.id, exc
            )
        if live.note:
            output = f"{output}[cronmesh] {live.note}\n"
        execution.finished_at = utcnow()
        if execution.finished_at < execution.started_at:
            # Killed before its instant (a staged run): it ends where it
            # would have begun, not before (as Dispatcher._dispatch does).
            execution.finished_at = execution.started_at
        execution.success = success
        execution.output = output
        live.finished = True
        if self.marker is not None:
            self.marker.drop(execution.id)
        try:
            await self.finish(execution)
        finally:
            # Followers of the output get a last read before the entry goes.
            self._later_drop(execution.id)

    def _gate(
        self, executor: Executor, execution: Execution, start_at: float
    ) -> StartGate | None:
        """The start gate a staged run at `start_at` (loop time) waits at:
        one per instant (the runs of an instant have starts a few
        microseconds apart, see Dispatcher._staged_start), opened by one
        timer; None when the executor takes none or the instant is near."""
        if not getattr(executor, "gates", False):
            return None
        loop = asyncio.get_running_loop()
        if start_at - loop.time() < GATE_MIN_LEAD:
            return None
        key = to_ns(execution.started_at) // 1_000_000  # the instant, in ms
        gate = self._gates.get(key)
        if gate is None or gate.is_open or gate.full:
            gate = StartGate(loop, start_at)
            self._gates[key] = gate
            loop.call_at(start_at, self._open_gate, key, gate)
        return gate

    def _open_gate(self, key: int, gate: StartGate) -> None:
        gate.open()
        if self._gates.get(key) is gate:
            del self._gates[key]

    def _note_process(self, exec_id: str, pid: int, reaped: Callable[[], bool]) -> None:
        """The run's first process started: if the run lasts, the marker
        keeps who it is in the outbox, for a restart after a crash."""
        if self.marker is not None:
            self.marker.note(exec_id, pid, reaped)

    def _write_mark(self, exec_id: str, mark: ProcessMark) -> None:
        # No fsync: the mark must survive the agent, not the machine.
        if self.outbox is not None:
            self.outbox.note_process(exec_id, mark.to_json())

    def _later_drop(self, exec_id: str) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(1.0, self.live.pop, exec_id, None)

    def _tail(self, live: LiveExecution, message: str) -> str:
        text = live.buffer.getvalue().decode(errors="replace")
        return f"{text}\n[cronmesh] {message}\n" if text else f"[cronmesh] {message}\n"

    async def finish(self, execution: Execution) -> None:
        """Keep the result durably, then report it in the background."""
        if self.outbox is not None:
            try:
                await self.outbox.put_done(execution)
            except CronmeshError as exc:
                log.error(
                    "cannot keep result in the outbox execution=%s error=%s",
                    execution.id,
                    exc,
                )
        self.unreported[execution.id] = execution
        self.ended[execution.id] = None
        while len(self.ended) > RECENTLY_ENDED:
            self.ended.popitem(last=False)
        for callback in self.on_finished:
            callback(execution)
        task = asyncio.create_task(self._report_and_forget(execution))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report_and_forget(self, execution: Execution) -> None:
        await self._report_batched(execution)
        self.unreported.pop(execution.id, None)
        if self.outbox is not None:
            with contextlib.suppress(CronmeshError):
                await self.outbox.remove(execution.id)

    async def _report_batched(self, execution: Execution) -> None:
        """Report `execution` together with others: at most REPORT_PIPELINE
        batches are on their way at once, and results that end meanwhile
        wait and travel in the next one (one `executions_done` command: one
        log entry, one forwarding call). A lone result leaves at once; under
        load the batches grow with the leader's commit time instead of the
        number of calls (hundreds of concurrent calls timed out at a busy
        leader and were retried, which made it busier)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._batch.append((execution, future))
        if not self._batch_scheduled:
            self._batch_scheduled = True
            loop.call_soon(self._send_batch)
        await future

    def _send_batch(self) -> None:
        self._batch_scheduled = False
        while self._batch and self._delivering < REPORT_PIPELINE:
            size = count = 0
            for execution, _ in self._batch:
                size += _encoded_len(execution.output)
                if count and (count >= MAX_REPORT_BATCH or size > MAX_REPORT_BYTES):
                    break
                count += 1
            batch, self._batch = self._batch[:count], self._batch[count:]
            self._delivering += 1
            task = asyncio.create_task(self._deliver_batch(batch))
            self._reports.add(task)
            task.add_done_callback(self._reports.discard)

    async def _deliver_batch(
        self, batch: list[tuple[Execution, asyncio.Future[None]]]
    ) -> None:
        try:
            if len(batch) == 1:
                await self.report(batch[0][0])
            else:
                payload = encode_command(
                    "executions_done",
                    executions=[execution.to_json() for execution, _ in batch],
                )
                await self._propose_until_taken(payload, f"{len(batch)} executions")
        finally:
            for _, future in batch:
                if not future.done():
                    future.set_result(None)
            self._delivering -= 1
            if self._batch and not self._batch_scheduled:
                self._batch_scheduled = True
                asyncio.get_running_loop().call_soon(self._send_batch)

    async def report(self, execution: Execution) -> None:
        """Propose `execution_done` until a leader takes it.

        An output that makes the command too large for a log entry (a large
        `max_output` of escaped characters) is cut, keeping its end, until
        it fits: retrying a command Raft refuses would never end.
        """
        payload = encode_command("execution_done", execution=execution.to_json())
        while len(payload) > MAX_COMMAND_BYTES and execution.output:
            keep = len(execution.output.encode("utf-8", "surrogatepass")) // 2
            log.info(
                "report too large, output cut execution=%s bytes=%d keep=%d",
                execution.id,
                len(payload),
                keep,
            )
            shorter = trim_text(execution.output, keep)
            execution.output = shorter if len(shorter) < len(execution.output) else ""
            payload = encode_command("execution_done", execution=execution.to_json())
        await self._propose_until_taken(payload, execution.id)

    async def _propose_until_taken(self, payload: bytes, what: str) -> None:
        delay = self.retry_delay
        warned = False
        while True:
            try:
                result = await self.log.propose(payload)
            except Exception as exc:
                # Any failure means "not taken": the callers treat a return
                # as delivered and drop the result from the outbox, so an
                # unexpected error (not a CronmeshError) must retry too.
                level = logging.DEBUG if warned else logging.WARNING
                log.log(
                    level,
                    "cannot report yet what=%s error=%s",
                    what,
                    exc,
                    exc_info=not isinstance(exc, CronmeshError) and not warned,
                )
                warned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, REPORT_RETRY_MAX)
                continue
            if not result.ok:
                log.debug("report refused what=%s error=%s", what, result.error)
            return

    async def recover(self, restarted_at: datetime) -> int:
        """After a restart: report what the outbox holds; an execution that
        was running when the agent stopped is reported as failed."""
        if self.outbox is None:
            return 0
        count = 0
        records = [
            r
            for r in self.outbox.records()
            if r.execution.id not in self.live and r.execution.id not in self.unreported
        ]
        stopped = await self._stop_orphans([r for r in records if not r.done])
        for record in records:
            execution = record.execution
            if not record.done:
                # A staged run cut before its instant ends at it, not earlier.
                execution.finished_at = max(utcnow(), execution.started_at)
                execution.success = False
                execution.output = (
                    f"[cronmesh] interrupted: the agent stopped while this "
                    f"execution ran; it restarted at {format_time(restarted_at)}\n"
                )
                if execution.id in stopped:
                    execution.output += stopped[execution.id]
                count += 1
            await self.finish(execution)
        if count:
            log.info("marked interrupted executions failed count=%d", count)
        return count

    async def _stop_orphans(self, records: list[OutboxRecord]) -> dict[str, str]:
        """Stop the process groups interrupted executions left running;
        return a line for the output of each one stopped."""
        runs: list[tuple[str, ProcessMark | None]] = []
        for record in records:
            mark = None
            if record.process is not None:
                # An unreadable mark falls back to the environment search.
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    mark = ProcessMark.from_json(record.process)
            runs.append((record.execution.id, mark))
        orphans = find_orphans(runs) if runs else []
        if not orphans:
            return {}
        how = await stop_orphans(orphans, self.orphan_grace)
        return {
            o.execution_id: (
                f"[cronmesh] its process group (pgid {o.pgid}) was still running "
                f"and was stopped with {how[o.execution_id]}\n"
            )
            for o in orphans
            if o.execution_id in how
        }

    async def resend(self, exec_ids: list[str]) -> None:
        """The leader does not know these as running: if a result is kept
        here, report it again (a lost report)."""
        for exec_id in exec_ids:
            execution = self.unreported.get(exec_id)
            if execution is not None:
                await self.report(execution)

    async def stop(self, grace: float) -> None:
        """Let running executions finish for up to `grace` seconds, then kill.

        Only running jobs are waited for, not a leader: results not yet
        reported stay in the outbox for the next start.
        """
        deadline = time.monotonic() + grace
        while self.running_ids() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for exec_id in self.running_ids():
            live = self.live[exec_id]
            log.info(
                "shutdown grace ran out, killing job=%s execution=%s",
                live.job.name,
                exec_id,
            )
            live.note = f"the agent stopped: its shutdown grace of {grace:g}s ran out"
            live.cancel.set()
        tasks = [live.task for live in self.live.values() if live.task is not None]
        if tasks:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*tasks, return_exceptions=True), 5
                )
        for gate in self._gates.values():
            gate.close()  # their runs were killed above
        self._gates.clear()
        if self.marker is not None:
            self.marker.close()
        # Give reports in flight a moment; what is left goes next start.
        if self._reports:
            await asyncio.wait(list(self._reports), timeout=2.0)
        if self._reports:
            log.warning(
                "results not reported before stopping count=%d; kept in the "
                "outbox for the next start",
                len(self._reports),
            )
        for task in list(self._reports):
            task.cancel()


async def _until(when: float, cancel: asyncio.Event) -> None:
    """Sleep until the event loop's time `when`, or until `cancel` is set
    (the executor then sees it and starts nothing)."""
    delay = when - asyncio.get_running_loop().time()
    if delay > 0 and not cancel.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await cancel.wait()


def _encoded_len(text: str) -> int:
    """Bytes `text` takes in a command (encode_command's JSON, escaped)."""
    return len(json.dumps(text))
