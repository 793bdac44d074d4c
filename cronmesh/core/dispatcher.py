"""The dispatcher decides that a job runs now, where, records it, starts it.

Every run goes through `fire`: a scheduled fire, a manual run, a retry or a
dependent job. On the leader it checks that the job may run, picks the
target nodes from the live members and the job's tags (core/targets.py),
commits `execution_started` with one execution per target (with the fire
instant, and whether the job forbids overlap), and only then hands each
execution to its agent: this node's runner directly, other nodes over gRPC
(`send_run`). The guards live in the state machine, so they hold however
many callers race and across leader changes: a fire instant is accepted
once, a dependent run once per parent group, and a `forbid` job with a
running execution gets a 409. An agent that answers a hand-over with no,
or cannot be reached at all, gets its execution recorded failed; one that
was reached but never answered may have taken it, so the execution stays
running and `on_unanswered` passes it to the leader's liveness watch
(core/liveness.py), where heartbeats settle it.

After an execution ends (an `execution_done` event, seen on every server;
only the leader acts) the dispatcher starts the next attempt of a failed
execution, or the dependent jobs once the parent's group has succeeded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cronmesh.core.commitlog import CommandLog
from cronmesh.core.fsm import ApplyResult, Event, encode_command
from cronmesh.core.liveness import VERDICT_HANDOVER
from cronmesh.core.model import (
    CONCURRENCY_FORBID,
    Execution,
    Job,
    backoff_seconds,
    format_time,
    to_ns,
)
from cronmesh.core.runner import Runner
from cronmesh.core.targets import Candidate, parse_tags, select_targets
from cronmesh.errors import (
    ConflictError,
    CronmeshError,
    NotFoundError,
    RunRefusedError,
    TransportError,
)
from cronmesh.storage.state import StateStore

__all__ = ["Dispatcher", "FireOutcome"]

log = logging.getLogger("cronmesh.dispatcher")

RETRY_INTERVAL = 0.5
DEFAULT_BACKOFF_MAX = "1m"
# A target that does not take a hand-over is asked this often (an answered
# "no" ends it at once); then see `_dispatch`.
DISPATCH_ATTEMPTS = 3
DISPATCH_PAUSE = 0.5
# How a hand-over ended.
_TAKEN = "taken"
_REFUSED = "refused"
_UNREACHED = "unreached"  # no attempt reached the agent (no address or link)
_UNANSWERED = "unanswered"  # an attempt may have reached it; no answer came

SendRun = Callable[[str, Job, Execution, float], Awaitable[object]]
# Staged start times are kept this long to keep execution ids unique.
STAGED_IDS_KEPT = 10.0
# Kept start times are pruned when there are more than this.
STAGED_IDS_PRUNE = 4096


@dataclass
class FireOutcome:
    """What `fire` did: started executions, or why not."""

    execution: Execution | None = None
    skipped: str = ""
    result: ApplyResult | None = None
    executions: tuple[Execution, ...] = ()
    # The hand-overs of the started executions, running as tasks.
    dispatches: tuple[asyncio.Task[object], ...] = ()


def retry_backoff(attempt: int, elapsed: float) -> float:
    """Seconds to wait before attempt `attempt + 1` (Dkron's formula).

    Dkron waits (log2(elapsed / 0.5 s) + attempt) * 0.5 s, where `elapsed`
    is the time since the failed attempt started.
    """
    steps = math.log2(max(elapsed, RETRY_INTERVAL) / RETRY_INTERVAL) + attempt
    return max(0.0, math.floor(steps) * RETRY_INTERVAL)


def job_retry_delay(job: Job, attempt: int, elapsed: float) -> float:
    """The wait before retrying `job` after attempt `attempt` failed.

    With `retry_backoff` set: `initial` doubled per attempt, at most `max`
    (default 1m); otherwise Dkron's formula.
    """
    if not job.retry_backoff:
        return retry_backoff(attempt, elapsed)
    initial = backoff_seconds(job.retry_backoff.get("initial", "1s"), "initial")
    ceiling = backoff_seconds(job.retry_backoff.get("max", DEFAULT_BACKOFF_MAX), "max")
    return float(min(ceiling, initial * 2 ** max(attempt - 1, 0)))


class Dispatcher:
    """Starts runs of jobs on their target nodes; reacts to finished ones."""

    def __init__(
        self,
        node_name: str,
        store: StateStore,
        commit_log: CommandLog,
        runner: Runner,
        *,
        clock: Callable[[], datetime] | None = None,
        region: str = "global",
        rng: random.Random | None = None,
    ) -> None:
        self.node_name = node_name
        self.store = store
        self.log = commit_log
        self.runner = runner
        self.clock = clock or (lambda: datetime.now(UTC))
        self.region = region
        self.rng = rng or random.Random()
        self._tasks: set[asyncio.Task[object]] = set()
        self._last_start_ns = 0
        # Start times (ns) given to staged runs, for unique execution ids.
        self._staged_ns: set[int] = set()
        # Whether _staged_ns still lacks the runs staged by other leaders.
        self._learn_staged = True
        # Per instant (ns), where the search for its next free start begins:
        # the runs of one instant take consecutive microseconds, and
        # searching from the instant each time cost O(runs) per run (8,000
        # runs of one instant took 3.6 s of the loop).
        self._staged_next: dict[int, int] = {}
        self._staged_prune_at = STAGED_IDS_PRUNE
        self._active = True
        self.node_tags: Callable[[], dict[str, str]] = dict
        # The live members to pick targets from; by default this node only.
        self.members: Callable[[], list[Candidate]] = lambda: [
            Candidate(self.node_name, {"region": self.region, **self.node_tags()})
        ]
        # Hands an execution to another node; None: everything runs here.
        self.send_run: SendRun | None = None
        # Takes an execution whose hand-over got no answer at all (the agent
        # may have it): it stays running and this decides its fate. None:
        # it is recorded failed at once.
        self.on_unanswered: Callable[[Execution], None] | None = None
        # Ids of executions being handed over right now.
        self.handing_over: set[str] = set()
        self.on_started: list[Callable[[Execution], None]] = []
        # Metrics hook: seconds from a fire instant to its start committed.
        self.observe_fire_lag: Callable[[float], None] = lambda seconds: None

    @property
    def active(self) -> bool:
        """Whether this node leads (set by the agent)."""
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        if value and not self._active:
            self._learn_staged = True  # another leader may have staged runs
        self._active = value

    def _started_at(self) -> datetime:
        # Execution ids carry the start in ns; two runs of one node in the
        # same microsecond would collide, so keep them strictly increasing.
        now = self.clock()
        ns = to_ns(now)
        if ns <= self._last_start_ns or ns in self._staged_ns:
            ns = max(ns, self._last_start_ns) + 1000
            while ns in self._staged_ns:
                ns += 1000
            now = _from_ns(ns)
        self._last_start_ns = ns
        return now

    def _staged_start(self, instant: datetime) -> datetime:
        """The start time of a run staged for `instant`: the instant itself,
        or the first free microsecond after it (runs of one instant on one
        node need distinct ids)."""
        now_ns = to_ns(self.clock())
        if self._learn_staged:
            # The previous leader's staged runs keep ids made of their
            # instants: a run staged here for the same instant on the same
            # node must not take one (its agent would answer that it has
            # it, and it would never start). Limitation: only running ones
            # are learned; a staged run the old leader's agent already ended
            # (killed before its instant) keeps its id in its agent's memory.
            self._learn_staged = False
            for ref in self.store.running_refs():
                ns = int(ref.id.partition("-")[0])
                if ns >= now_ns:
                    self._staged_ns.add(ns)
        if len(self._staged_ns) > self._staged_prune_at:
            horizon = now_ns - int(STAGED_IDS_KEPT * 1e9)
            self._staged_ns = {ns for ns in self._staged_ns if ns > horizon}
            self._staged_next = {
                at: ns for at, ns in self._staged_next.items() if at > horizon
            }
            # What is left is in use: prune again only once it has doubled.
            self._staged_prune_at = max(STAGED_IDS_PRUNE, 2 * len(self._staged_ns))
        at = to_ns(instant)
        ns = self._staged_next.get(at, at)
        while ns in self._staged_ns or ns == self._last_start_ns:
            ns += 1000
        self._staged_ns.add(ns)
        self._staged_next[at] = ns + 1000
        return _from_ns(ns)

    def _start_in(self, execution: Execution) -> float:
        """Seconds until a staged execution's start (0 for any other)."""
        return max(0.0, (execution.started_at - self.clock()).total_seconds())

    async def _until_start(self, execution: Execution) -> None:
        delay = self._start_in(execution)
        if delay > 0:
            await asyncio.sleep(delay)

    def _targets(self, job: Job, node: str | None) -> tuple[list[str], str]:
        members = self.members()
        if node is not None and not job.retry_any_node:
            # A retry runs where the failed attempt ran, if that node lives
            # and still matches the job's tags (they may have changed).
            bare, _ = parse_tags(job.tags)
            same = [m for m in members if m.name == node]
            names, _ = select_targets(bare, self.region, same, self.rng)
            if names:
                return names, ""
        return select_targets(job.tags, self.region, members, self.rng)

    async def fire(
        self,
        job_name: str,
        *,
        fire_at: datetime | None = None,
        trigger: str = "schedule",
        attempt: int = 1,
        group: int | None = None,
        node: str | None = None,
        parent: tuple[str, int] | None = None,
        force: bool = False,
    ) -> FireOutcome:
        """Record and start one run of `job_name` on its target nodes.

        `node`: for a retry, where the failed attempt ran. `parent`: (job,
        group) of the parent run a dependent run follows. `force`: a manual
        run ignores `forbid`.

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
        targets, why_none = self._targets(job, node)
        # A scheduled fire the scheduler took before its instant is staged:
        # committed and handed over now, started by its agent at the
        # instant. A `forbid` job decides at its instant (its previous run
        # may still end), and a run with no target is recorded then.
        staged: datetime | None = None
        if trigger == "schedule" and fire_at is not None and fire_at > self.clock():
            staged = fire_at
        if staged is not None and (
            job.concurrency == CONCURRENCY_FORBID or not targets
        ):
            # Decided at the instant instead, by a fire of its own, so that
            # waiting holds no place in the scheduler's window.
            delay = (staged - self.clock()).total_seconds()
            self._later(
                delay,
                lambda: self.fire(job_name, fire_at=staged, trigger="schedule"),
            )
            return FireOutcome(skipped="decided at its instant")
        started = self._started_at() if staged is None else self._staged_start(staged)
        group_id = group if group is not None else to_ns(started)
        executions = [
            Execution(
                job_name=job.name,
                started_at=started,
                node_name=target,
                group=group_id,
                attempt=attempt,
                scheduled_at=fire_at,
                trigger=trigger,
            )
            for target in (targets or [self.node_name])
        ]
        payload = encode_command(
            "execution_started",
            executions=[e.to_json() for e in executions],
            fire=format_time(fire_at) if trigger == "schedule" else None,
            forbid=job.concurrency == CONCURRENCY_FORBID and not force,
            parent={"job": parent[0], "group": parent[1]} if parent else None,
        )
        result = await self.log.propose(payload)
        if not result.ok:
            if result.code == 409 and trigger == "manual":
                running = result.value
                running_id = (
                    running.id
                    if isinstance(running, Execution)
                    else running.get("id", "")
                    if isinstance(running, dict)
                    else ""
                )
                raise ConflictError(result.error, running_id)
            log.info(
                "run not started job=%s trigger=%s reason=%s",
                job_name,
                trigger,
                result.error,
            )
            return FireOutcome(skipped=result.error, result=result)
        if fire_at is not None and trigger == "schedule":
            # A staged run is committed before its instant and counts 0
            # here; its agent measures its real start (run_start_lag).
            lag = (self.clock() - fire_at).total_seconds()
            self.observe_fire_lag(max(0.0, lag))
        for execution in executions:
            for callback in self.on_started:
                callback(execution)
        if not targets:
            # Dkron skips such a run silently; we record it as failed.
            log.info("no node matches job=%s reason=%s", job.name, why_none)
            failed = executions[0]
            failed.finished_at = self.clock()
            failed.output = f"[cronmesh] not run: {why_none}\n"
            await self.runner.finish(failed)
            return FireOutcome(
                execution=failed, result=result, executions=tuple(executions)
            )
        dispatches = tuple(
            self._spawn(self._dispatch(job, execution)) for execution in executions
        )
        return FireOutcome(
            execution=executions[0],
            result=result,
            executions=tuple(executions),
            dispatches=dispatches,
        )

    async def _dispatch(self, job: Job, execution: Execution) -> None:
        """Hand a committed execution to its node; record it failed if the
        node refuses it or cannot be reached, or leave it to `on_unanswered`
        if it may have it but never answered."""
        verdict = ""
        if execution.node_name == self.node_name or self.send_run is None:
            try:
                await self.runner.accept(
                    job, execution, start_in=self._start_in(execution)
                )
                return
            except CronmeshError as exc:
                error = str(exc)
        else:
            error, outcome = await self._hand_over(job, execution)
            if outcome == _TAKEN:
                return
            if outcome == _UNANSWERED and self.on_unanswered is not None:
                # No answer is not "no": the agent may have the run (its
                # replies were lost, or it was too busy to send them).
                log.warning(
                    "hand-over unanswered, run kept running until its agent "
                    "settles it job=%s node=%s execution=%s error=%s",
                    job.name,
                    execution.node_name,
                    execution.id,
                    error,
                )
                self.on_unanswered(execution)
                return
            if outcome != _REFUSED:
                # Never reached, so almost surely not started; should the
                # agent report it after all, its report replaces this.
                verdict = VERDICT_HANDOVER
        log.warning(
            "could not start execution job=%s node=%s error=%s",
            job.name,
            execution.node_name,
            error,
        )
        # A staged run that cannot start ends at its instant, not before it
        # began (a retry counts from there too).
        await self._until_start(execution)
        execution.finished_at = self.clock()
        execution.output = f"[cronmesh] not run: {error}\n"
        execution.verdict = verdict
        await self.runner.report(execution)

    async def _hand_over(self, job: Job, execution: Execution) -> tuple[str, str]:
        """Send `execution` to its node, DISPATCH_ATTEMPTS times at most.

        Returns ("", _TAKEN) when the agent took it (a repeated hand-over of
        a run it has is answered, not started twice), or the last error and
        _REFUSED (the agent answered no), _UNREACHED (no attempt reached
        it) or _UNANSWERED (some attempt may have reached it, none got an
        answer).
        """
        assert self.send_run is not None
        self.handing_over.add(execution.id)
        try:
            return await self._hand_over_attempts(job, execution)
        finally:
            self.handing_over.discard(execution.id)

    async def _hand_over_attempts(
        self, job: Job, execution: Execution
    ) -> tuple[str, str]:
        assert self.send_run is not None
        error, outcome = "", _UNREACHED
        for attempt in range(DISPATCH_ATTEMPTS):
            try:
                await self.send_run(
                    execution.node_name, job, execution, self._start_in(execution)
                )
                return "", _TAKEN
            except RunRefusedError as exc:
                # A clear no: the agent does not run it (it checks what it
                # has before it refuses).
                return str(exc), _REFUSED
            except CronmeshError as exc:
                error = str(exc)
                if not isinstance(exc, TransportError):
                    outcome = _UNANSWERED  # a timeout: it may have arrived
                log.debug(
                    "dispatch failed job=%s node=%s attempt=%d error=%s",
                    job.name,
                    execution.node_name,
                    attempt + 1,
                    exc,
                )
            if attempt + 1 < DISPATCH_ATTEMPTS:
                await asyncio.sleep(DISPATCH_PAUSE)
        return error, outcome

    def on_event(self, event: Event) -> None:
        """FSM listener: retries and dependent jobs after an execution ends."""
        if event.kind != "execution_done" or not self.active:
            return
        execution = event.execution
        assert execution is not None
        job = self.store.get_job(event.job)
        if job is None:
            return
        if event.extra.get("replaced_verdict") and not execution.success:
            # The leader's hand-over verdict already started the retry.
            return
        if not execution.success and execution.attempt < job.retries + 1:
            elapsed = (self.clock() - execution.started_at).total_seconds()
            delay = job_retry_delay(job, execution.attempt, elapsed)
            log.info(
                "retrying job=%s node=%s attempt=%d in=%.1fs",
                job.name,
                execution.node_name,
                execution.attempt + 1,
                delay,
            )
            self._later(
                delay,
                lambda: self.fire(
                    job.name,
                    trigger="retry",
                    attempt=execution.attempt + 1,
                    group=execution.group,
                    node=execution.node_name,
                ),
            )
        elif execution.success and job.dependent_jobs:
            if not self._group_succeeded(job.name, execution.group):
                return
            for child in job.dependent_jobs:
                log.info("running dependent job=%s parent=%s", child, job.name)
                self._later(
                    0,
                    lambda child=child: self.fire(
                        child, trigger="dependent", parent=(job.name, execution.group)
                    ),
                )

    def _group_succeeded(self, job_name: str, group: int) -> bool:
        """Every execution of the group has finished, and every failed one
        was followed by a later attempt that succeeded (on any node: with
        `retry_any_node` a retry may move)."""
        runs = [
            run
            for run in self.store.executions(job_name, with_output=False)
            if run.group == group
        ]
        if not runs or any(run.running for run in runs):
            return False
        successes = [run.attempt for run in runs if run.success]
        return all(
            run.success or any(a > run.attempt for a in successes) for run in runs
        )

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[object]:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _later(self, delay: float, start: Callable[[], Awaitable[object]]) -> None:
        async def run() -> None:
            if delay:
                await asyncio.sleep(delay)
            if not self.active:
                return
            try:
                await start()
            except (NotFoundError, ConflictError) as exc:
                log.info("follow-up run not started error=%s", exc)
            except CronmeshError as exc:
                log.warning("follow-up run failed to start error=%s", exc)

        self._spawn(run())

    async def stop(self) -> None:
        self.active = False
        for task in list(self._tasks):
            task.cancel()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _from_ns(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1000)


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
