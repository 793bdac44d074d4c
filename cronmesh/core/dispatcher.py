"""The dispatcher decides that a job runs now, records it, and starts it.

Every run goes through `fire`: a scheduled fire, a manual run, a retry or a
dependent job. It checks that the job may run, commits `execution_started`
(with the fire instant, and whether the job forbids overlap), and only then
hands the execution to the runner. Both guards live in the state machine,
so they hold however many callers race: a fire instant is accepted once,
and a `forbid` job with a running execution gets a 409.

After an execution ends (an `execution_done` event) the dispatcher starts
the next attempt of a failed run, or the dependent jobs of a successful one.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cronmesh.core.commitlog import CommandLog
from cronmesh.core.fsm import ApplyResult, Event, encode_command
from cronmesh.core.model import CONCURRENCY_FORBID, Execution, format_time, to_ns
from cronmesh.core.runner import Runner
from cronmesh.errors import ConflictError, NotFoundError
from cronmesh.storage.state import StateStore

__all__ = ["Dispatcher", "FireOutcome"]

log = logging.getLogger("cronmesh.dispatcher")

RETRY_INTERVAL = 0.5


@dataclass
class FireOutcome:
    """What `fire` did: started an execution, or why not."""

    execution: Execution | None = None
    skipped: str = ""
    result: ApplyResult | None = None


def retry_backoff(attempt: int, elapsed: float) -> float:
    """Seconds to wait before attempt `attempt + 1` (Dkron's formula).

    Dkron waits (log2(elapsed / 0.5 s) + attempt) * 0.5 s, where `elapsed`
    is the time since the failed attempt started.
    """
    steps = math.log2(max(elapsed, RETRY_INTERVAL) / RETRY_INTERVAL) + attempt
    return max(0.0, math.floor(steps) * RETRY_INTERVAL)


class Dispatcher:
    """Starts runs of jobs; reacts to finished executions."""

    def __init__(
        self,
        node_name: str,
        store: StateStore,
        commit_log: CommandLog,
        runner: Runner,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.node_name = node_name
        self.store = store
        self.log = commit_log
        self.runner = runner
        self.clock = clock or (lambda: datetime.now(UTC))
        self._tasks: set[asyncio.Task[object]] = set()
        self._last_start_ns = 0
        self.active = True
        self.node_tags: Callable[[], dict[str, str]] = dict

    def _started_at(self) -> datetime:
        # Execution ids carry the start in ns; two runs of one node in the
        # same microsecond would collide, so keep them strictly increasing.
        now = self.clock()
        ns = to_ns(now)
        if ns <= self._last_start_ns:
            ns = self._last_start_ns + 1000
            now = datetime.fromtimestamp(ns / 1e9, UTC).replace(
                microsecond=(ns // 1000) % 1_000_000
            )
        self._last_start_ns = ns
        return now

    async def fire(
        self,
        job_name: str,
        *,
        fire_at: datetime | None = None,
        trigger: str = "schedule",
        attempt: int = 1,
        group: int | None = None,
    ) -> FireOutcome:
        """Record and start one run of `job_name`.

        Raises:
            NotFoundError: the job does not exist.
            ConflictError: a manual run of a `forbid` job that is running.
        """
        job = self.store.get_job(job_name)
        if job is None:
            raise NotFoundError(f"job {job_name!r} not found")
        if trigger != "manual":
            # Dkron's isRunnable: only an explicit manual run overrides these.
            when = fire_at or self.clock()
            reason = _not_runnable(job.disabled, job.starts_at, job.expires_at, when)
            if reason:
                log.debug("skipping fire job=%s reason=%s", job_name, reason)
                return FireOutcome(skipped=reason)
        # node_tags() builds the agent's tags: only ask when the job has some.
        mismatch = tags_mismatch(job.tags, self.node_tags()) if job.tags else ""
        started = self._started_at()
        execution = Execution(
            job_name=job.name,
            started_at=started,
            node_name=self.node_name,
            group=group if group is not None else to_ns(started),
            attempt=attempt,
            scheduled_at=fire_at,
            trigger=trigger,
        )
        payload = encode_command(
            "execution_started",
            execution=execution.to_json(),
            fire=format_time(fire_at) if trigger == "schedule" else None,
            forbid=job.concurrency == CONCURRENCY_FORBID,
        )
        result = await self.log.propose(payload)
        if result.ok and mismatch:
            # Dkron skips such a run silently; we record it as failed.
            log.info("no node matches job=%s reason=%s", job.name, mismatch)
            execution.finished_at = self.clock()
            execution.output = (
                f"[cronmesh] not run: no alive node matches: {mismatch}\n"
            )
            await self.runner.report(execution)
            return FireOutcome(execution=execution, result=result)
        if not result.ok:
            if result.code == 409 and trigger == "manual":
                running = result.value
                raise ConflictError(
                    result.error, running.id if isinstance(running, Execution) else ""
                )
            log.info(
                "run not started job=%s trigger=%s reason=%s",
                job_name,
                trigger,
                result.error,
            )
            return FireOutcome(skipped=result.error, result=result)
        self.runner.start(job, execution)
        return FireOutcome(execution=execution, result=result)

    def on_event(self, event: Event) -> None:
        """FSM listener: retries and dependent jobs after an execution ends."""
        if event.kind != "execution_done" or not self.active:
            return
        execution = event.execution
        assert execution is not None
        if execution.node_name != self.node_name:
            return
        job = self.store.get_job(event.job)
        if job is None:
            return
        if not execution.success and execution.attempt < job.retries + 1:
            elapsed = (self.clock() - execution.started_at).total_seconds()
            delay = retry_backoff(execution.attempt, elapsed)
            log.info(
                "retrying job=%s attempt=%d in=%.1fs",
                job.name,
                execution.attempt + 1,
                delay,
            )
            self._later(
                delay,
                self.fire(
                    job.name,
                    trigger="retry",
                    attempt=execution.attempt + 1,
                    group=execution.group,
                ),
            )
        elif execution.success:
            for child in job.dependent_jobs:
                log.info("running dependent job=%s parent=%s", child, job.name)
                self._later(0, self.fire(child, trigger="dependent"))

    def _later(self, delay: float, coro: object) -> None:
        async def run() -> None:
            if delay:
                await asyncio.sleep(delay)
            try:
                await coro  # type: ignore[misc]
            except (NotFoundError, ConflictError) as exc:
                log.info("follow-up run not started error=%s", exc)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        self.active = False
        for task in list(self._tasks):
            task.cancel()


def tags_mismatch(wanted: dict[str, str], have: dict[str, str]) -> str:
    """Why a node with tags `have` cannot run a job targeting `wanted` ("" if it can).

    A value may end in `:N` (run on N matching nodes); with one node only
    the value before it counts.
    """
    for key, value in wanted.items():
        expected = (
            value.rsplit(":", 1)[0] if value.rsplit(":", 1)[-1].isdigit() else value
        )
        if have.get(key) != expected:
            return (
                f"tag {key}={expected} (this node has {have.get(key, 'no such tag')!r})"
            )
    return ""


def _not_runnable(
    disabled: bool,
    starts_at: datetime | None,
    expires_at: datetime | None,
    fire_at: datetime | None,
) -> str:
    if disabled:
        return "job is disabled"
    if fire_at is not None and starts_at is not None and fire_at < starts_at:
        return "before starts_at"
    if fire_at is not None and expires_at is not None and fire_at > expires_at:
        return "after expires_at"
    return ""
