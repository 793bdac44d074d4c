"""The runner: runs executions on this node and reports how they ended.

An execution reaches the runner after its start was committed. The runner
picks the executor, keeps the output in a capped buffer that the API reads
while the job runs, and when the executor returns it proposes
`execution_done`. If that proposal fails (no leader, storage error) it keeps
trying, so a finished execution is never silently dropped while the agent
lives.

Limitation: results waiting to be reported live in memory only; a crash
between the end of a job and its report loses that report, and the restart
marks the execution failed as interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cronmesh.core.commitlog import CommandLog
from cronmesh.core.executors import OutputBuffer, get_executor
from cronmesh.core.fsm import encode_command
from cronmesh.core.model import Execution, Job
from cronmesh.errors import CronmeshError

__all__ = ["LiveExecution", "Runner"]

log = logging.getLogger("cronmesh.runner")


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


class Runner:
    """Runs committed executions locally and reports their results."""

    def __init__(
        self, node_name: str, commit_log: CommandLog, *, max_output: int
    ) -> None:
        self.node_name = node_name
        self.log = commit_log
        self.max_output = max_output
        self.live: dict[str, LiveExecution] = {}
        self.retry_delay = 0.5

    def start(self, job: Job, execution: Execution) -> LiveExecution:
        """Run `execution` (already committed as started) in the background."""
        live = LiveExecution(execution, job, OutputBuffer(self.max_output))
        self.live[execution.id] = live
        live.task = asyncio.create_task(self._run(live), name=f"run-{execution.id}")
        return live

    def output_of(self, exec_id: str) -> str | None:
        live = self.live.get(exec_id)
        return None if live is None else live.buffer.getvalue().decode(errors="replace")

    def kill(self, exec_id: str) -> bool:
        live = self.live.get(exec_id)
        if live is None:
            return False
        live.cancel.set()
        return True

    async def _run(self, live: LiveExecution) -> None:
        execution, job = live.execution, live.job
        try:
            executor = get_executor(job.executor)
            result = await executor.run(
                job.executor_config,
                live.buffer,
                job_name=job.name,
                execution_id=execution.id,
                cancel=live.cancel,
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
        execution.finished_at = utcnow()
        execution.success = success
        execution.output = output
        try:
            await self.report(execution)
        finally:
            self.live.pop(execution.id, None)

    def _tail(self, live: LiveExecution, message: str) -> str:
        text = live.buffer.getvalue().decode(errors="replace")
        return f"{text}\n[cronmesh] {message}\n" if text else f"[cronmesh] {message}\n"

    async def report(self, execution: Execution) -> None:
        """Propose `execution_done` until the log takes it."""
        payload = encode_command("execution_done", execution=execution.to_json())
        while True:
            try:
                result = await self.log.propose(payload)
            except CronmeshError as exc:
                log.warning(
                    "cannot report execution yet execution=%s error=%s",
                    execution.id,
                    exc,
                )
                await asyncio.sleep(self.retry_delay)
                continue
            if not result.ok:
                log.debug(
                    "execution report refused execution=%s error=%s",
                    execution.id,
                    result.error,
                )
            return

    async def stop(self, grace: float) -> None:
        """Let running executions finish for up to `grace` seconds, then kill."""
        deadline = time.monotonic() + grace
        while self.live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for live in list(self.live.values()):
            live.cancel.set()
        tasks = [live.task for live in self.live.values() if live.task is not None]
        if tasks:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*tasks, return_exceptions=True), 5
                )
