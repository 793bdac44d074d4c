"""The scheduler: one task that sleeps until the next job is due.

Each scheduled job has one entry: its parsed schedule and its next fire
instant. A heap orders the entries by that instant; the task sleeps until
the head is due (or a job changes), fires every due job through the
dispatcher, and computes each one's next instant. A job change bumps the
entry's generation, so stale heap items are dropped when popped instead of
searched for.

Time. Fire instants are wall-clock instants (cron is about the wall clock),
but the task sleeps at most `MAX_SLEEP` seconds at a time and compares how
far the wall clock and the monotonic clock moved. A difference of more than
`JUMP_THRESHOLD` seconds is a clock jump: every entry is recomputed from its
last committed fire. The state machine refuses a fire instant that is not
later than the last one committed, so a clock moved backwards can never run
one instant twice.

Missed fires. When the next instant is already past (the agent was down,
the clock jumped forward, the loop was late), each missed instant within
`catch_up` seconds runs once, late; older ones are skipped and counted in
`missed`. So a catch-up burst is bounded by the window, and no job is left
stranded however long the outage (compare Kubernetes' "too many missed start
times"). A job that has not fired since its schedule took effect (it was
created, edited or enabled: `Job.schedule_since`, replicated) is planned from
that instant, so its first instants passing during a failover are missed
fires like any other, not lost.

Overload. At most `window.limit` fires are in flight at once (from the fire
to the hand-over of its runs, at most `HANDOVER_HOLD` seconds of that); the
limit follows the event loop's lag (cronmesh/core/admission.py). Fires over
it wait in arrival order, one per job: when a job's next instant comes due
while the previous one still waits, the older one is skipped and counted in
`shed`. A leader offered more than it can do runs fewer fires on time
instead of losing its lead to a stalled loop.

Staging. A job that may overlap itself (any concurrency but `forbid`) is
taken from the heap up to `stage_ahead` seconds before its instant (at most
90 % of the gap to its previous instant): the dispatcher commits the run and
hands it over then, and the agent starts it at the instant. So the instant
itself costs a process start, not a Raft commit, a hand-over and an outbox
write on top (docs/benchmarks.md, "Cluster"). A `forbid` job is taken at its
instant: whether it may run depends on its previous run, which may still
end. A staged run is committed when it is staged, so an edit or a disable
of the job within that last stretch applies from the next instant (a delete
stops it, as it stops any run of the deleted job).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cronmesh.core.admission import Window, WindowSettings
from cronmesh.core.dispatcher import Dispatcher
from cronmesh.core.fsm import Event
from cronmesh.core.model import CONCURRENCY_FORBID, Job
from cronmesh.core.schedule import Schedule, parse_schedule
from cronmesh.errors import CronmeshError
from cronmesh.storage.state import StateStore

__all__ = ["Scheduler"]

log = logging.getLogger("cronmesh.scheduler")

MAX_SLEEP = 5.0
JUMP_THRESHOLD = 2.0
DEFAULT_CATCH_UP = 60.0
# Seconds before its instant a run is staged at most (see the docstring).
STAGE_AHEAD = 1.0
# Fraction of the gap between two instants a run is staged ahead at most.
STAGE_GAP_SHARE = 0.9
# Missed instants older than the window are counted one by one up to this
# many; past that the count is a lower bound.
MAX_CATCH_UP_STEPS = 10_000
# A fire keeps its place in the window until its runs are handed over, but
# no longer than this: one unreachable agent must not hold every slot.
HANDOVER_HOLD = 1.0
# Seconds between two warnings about shed fires.
SHED_LOG_EVERY = 10.0


@dataclass
class _Entry:
    schedule: Schedule
    next_fire: datetime | None
    generation: int
    one_shot: bool
    stage: bool = False  # may be taken before its instant (not `forbid`)
    # The instant taken early whose moment has not come yet (`next_fire`
    # already names the one after it).
    staged: datetime | None = None


class Scheduler:
    """Fires jobs at their instants while this node leads."""

    def __init__(
        self,
        store: StateStore,
        dispatcher: Dispatcher,
        *,
        catch_up: float = DEFAULT_CATCH_UP,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        window: WindowSettings | None = None,
        stage_ahead: float = STAGE_AHEAD,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.catch_up = catch_up
        self.stage_ahead = stage_ahead
        self.wall = wall
        self.mono = mono
        self.entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, int, str, int]] = []
        self._seq = 0
        # Generations come from one counter: a job deleted and re-created
        # under its name must not find its old heap items valid again.
        self._generation = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._fires: set[asyncio.Task[object]] = set()
        self.missed = 0
        self.fired = 0
        self.window = Window(window)
        # Due fires waiting for a place in the window: job -> its instants,
        # jobs in arrival order; and the scheduler turn that last added to
        # each job's list (instants of one turn are a catch-up burst that
        # all run; an instant that waited a turn is shed by the next one).
        self._waiting: dict[str, list[datetime]] = {}
        self._added: dict[str, int] = {}
        # Per job, the waiting instants that came due together in one turn
        # (a catch-up burst): never shed, at most skipped as too old.
        self._burst: dict[str, set[datetime]] = {}
        self._turn = 0
        self.shed = 0
        self._shed_logged = (0.0, 0)  # (monotonic time, shed count) of the last warning
        self.last_lag = 0.0
        # Whether this node leads now: a waiting fire starts on the leader
        # only, even in the moment between the lead's loss and stop().
        self.leading: Callable[[], bool] = lambda: True
        # When this node began to lead (start()); None while it does not.
        self.lead_start: datetime | None = None

    # -- life cycle
    def start(self) -> None:
        """Load every job and start the timing task."""
        self.lead_start = self._now()
        for job in self.store.list_jobs():
            self._load(job)
        self._task = asyncio.create_task(self._loop(), name="scheduler")
        log.info("scheduler started jobs=%d", len(self.entries))

    async def stop(self) -> None:
        # Before awaiting: a fire in flight that ends meanwhile would start
        # the waiting ones.
        self._waiting.clear()
        self._added.clear()
        self._burst.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.lead_start = None
        self.entries.clear()
        self._heap.clear()
        self._waiting.clear()
        self._added.clear()
        self._burst.clear()

    @property
    def running(self) -> bool:
        return self._task is not None

    # -- reacting to the state machine
    def on_event(self, event: Event) -> None:
        if self._task is None:
            return
        if event.kind == "job_set":
            job = self.store.get_job(event.job)
            if job is not None:
                previous = event.previous
                same = previous is not None and (
                    previous.schedule,
                    previous.timezone,
                ) == (job.schedule, job.timezone)
                if not same:
                    self._drop_waiting(event.job)
                self._load(job, changed=True, same_schedule=same)
        elif event.kind == "job_deleted":
            self.entries.pop(event.job, None)
            self._drop_waiting(event.job)
        else:
            return
        self._wake.set()

    def _drop_waiting(self, name: str) -> None:
        """Forget the waiting fires of a deleted job, or of an edited job's
        old schedule: it starts from now on its new one (see `_load`)."""
        dropped = self._waiting.pop(name, None)
        self._added.pop(name, None)
        self._burst.pop(name, None)
        if dropped:
            log.debug("waiting fires dropped job=%s count=%d", name, len(dropped))

    def next_fire(self, name: str) -> datetime | None:
        entry = self.entries.get(name)
        if entry is None:
            return None
        if entry.staged is not None and entry.staged > self._now():
            return entry.staged
        return entry.next_fire

    # -- entries
    def _load(
        self, job: Job, *, changed: bool = False, same_schedule: bool = False
    ) -> None:
        self.entries.pop(job.name, None)
        if not job.schedule:
            return
        try:
            schedule = parse_schedule(job.schedule, job.timezone, job.name)
        except CronmeshError as exc:
            log.warning("unschedulable job job=%s error=%s", job.name, exc)
            return
        last = self.store.last_fire(job.name)
        since = job.schedule_since
        # Not fired since its schedule took effect (created, edited, enabled).
        fresh = last is None or (since is not None and since > last)
        one_shot = bool(getattr(schedule, "once", False))
        instant = getattr(schedule, "instant", None)
        if one_shot and last is not None and (instant is None or instant <= last):
            return  # its instant ran (moved to a later one, it runs again)
        self._generation += 1
        generation = self._generation
        stage = self.stage_ahead > 0 and job.concurrency != CONCURRENCY_FORBID
        entry = _Entry(schedule, None, generation, one_shot, stage)
        self.entries[job.name] = entry
        after = self._start_after(last, since, fresh, changed)
        ahead = 0.0 if last is None else (last - self._now()).total_seconds()
        if changed and same_schedule and ahead > 0:
            # A run staged for an instant still ahead was committed (it
            # runs): an edit that kept the schedule goes on after it, as an
            # unchanged job does; taking it again would only have the state
            # machine refuse it ("already ran").
            after = last
            if ahead <= self.stage_ahead:  # not a clock that went back
                entry.staged = last
        self._plan(job.name, entry, after)

    def _start_after(
        self,
        last: datetime | None,
        since: datetime | None,
        fresh: bool,
        changed: bool,
    ) -> datetime | None:
        """The instant to plan a job from (None: from now).

        A job that fired since its schedule took effect continues from its
        last committed fire, catching up (an edit seen while leading starts
        it from now). One that did not continues from `since`, so an
        instant that passed while no server led (a failover) runs late
        within the catch-up window like any missed fire; but a write taken
        while this node led starts from now, as the leader saw it at once.
        """
        if not fresh:
            return None if changed else last
        if since is None or (
            changed and self.lead_start is not None and since >= self.lead_start
        ):
            return None
        # Not from `since` itself: a job disabled for long would walk every
        # instant since; so its instants older than the window are skipped
        # without being counted in `missed`.
        # Limitation: `since` is the clock of the server that took the write;
        # when it runs s seconds behind the leader's, instants up to s seconds
        # before the write can run after a failover (within the window).
        return max(since, self._now() - timedelta(seconds=self.catch_up))

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.wall(), UTC)

    def _plan(self, name: str, entry: _Entry, after: datetime | None) -> None:
        """Set `entry.next_fire` to the first instant after `after` (or now)."""
        now = self._now()
        nxt = entry.schedule.next_after(after or now)
        if nxt is not None and nxt < now:
            nxt = self._catch_up(entry.schedule, nxt, now)
        entry.next_fire = nxt
        if nxt is not None:
            take_at = nxt.timestamp()
            if entry.stage and nxt > now:
                start = after if after is not None and after < nxt else now
                gap = (nxt - start).total_seconds()
                take_at -= min(self.stage_ahead, STAGE_GAP_SHARE * gap)
            self._seq += 1
            item = (take_at, self._seq, name, entry.generation)
            heapq.heappush(self._heap, item)

    def _catch_up(
        self, schedule: Schedule, first: datetime, now: datetime
    ) -> datetime | None:
        """The instant to fire next when `first` is already past.

        Missed instants within the catch-up window each run once, late;
        older ones are skipped and counted in `missed`.
        """
        # Limitation: when the node is overloaded, these late runs add work
        # exactly while it is behind (see docs/benchmarks.md, 2000 jobs).
        window_start = now - timedelta(seconds=self.catch_up)
        nxt: datetime | None = first
        for _ in range(MAX_CATCH_UP_STEPS):
            if nxt is None or nxt >= window_start:
                return nxt
            self.missed += 1
            nxt = schedule.next_after(nxt)
        # Too many to count one by one: jump to the window.
        return schedule.next_after(window_start)

    # -- the task
    async def _loop(self) -> None:
        wall0, mono0 = self.wall(), self.mono()
        while True:
            delay = MAX_SLEEP
            if self._heap:
                delay = min(MAX_SLEEP, max(0.0, self._heap[0][0] - self.wall()))
            if delay > 0:
                self._wake.clear()
                # Not wait_for: on Python 3.11 it swallows a cancel that
                # comes with a wake-up, and stop() would wait forever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
            wall1, mono1 = self.wall(), self.mono()
            if abs((wall1 - wall0) - (mono1 - mono0)) > JUMP_THRESHOLD:
                self._clock_jumped(wall1 - wall0 - (mono1 - mono0))
            wall0, mono0 = wall1, mono1
            self._fire_due(wall1)

    def _clock_jumped(self, by: float) -> None:
        log.info("clock jump detected seconds=%.1f: recomputing schedules", by)
        jobs = {job.name: job for job in self.store.list_jobs()}
        self.entries.clear()
        self._heap.clear()
        for job in jobs.values():
            self._load(job)

    def _fire_due(self, now: float) -> None:
        self._turn += 1
        while self._heap and self._heap[0][0] <= now:
            _, _, name, generation = heapq.heappop(self._heap)
            entry = self.entries.get(name)
            if (
                entry is None
                or entry.generation != generation
                or entry.next_fire is None
            ):
                continue
            instant = entry.next_fire
            entry.staged = instant if instant.timestamp() > now else None
            self.fired += 1
            self._enqueue(name, instant)
            if not entry.one_shot:
                self._plan(name, entry, instant)
            else:
                entry.next_fire = None
        self._admit()
        self._warn_shed()

    def _enqueue(self, name: str, instant: datetime) -> None:
        waiting = self._waiting.get(name)
        if waiting is None:
            self._waiting[name] = [instant]
        elif self._added[name] == self._turn:
            # A second instant of this job in one turn: a catch-up burst.
            self._burst.setdefault(name, set()).update((waiting[-1], instant))
            waiting.append(instant)
        else:
            burst = self._burst.get(name, set())
            kept = [at for at in waiting if at in burst]
            shed = len(waiting) - len(kept)
            if shed:
                self.shed += shed
                log.debug(
                    "fires shed job=%s count=%d window=%d",
                    name,
                    shed,
                    self.window.limit,
                )
            waiting[:] = [*kept, instant]  # keeps the job's place in line
        self._added[name] = self._turn

    def _admit(self) -> None:
        """Start waiting fires while the window has room."""
        if not self.leading():
            return
        oldest = self._now() - timedelta(seconds=self.catch_up)
        while self._waiting and self.window.try_acquire():
            name = next(iter(self._waiting))
            waiting = self._waiting.pop(name)
            instant = waiting.pop(0)
            burst = self._burst.get(name)
            if burst is not None:
                burst.discard(instant)
                if not burst:
                    del self._burst[name]
            if waiting:
                self._waiting[name] = waiting  # the rest of a burst, to the back
            else:
                del self._added[name]
            if instant < oldest:
                # Waited past the catch-up window: skipped like any late fire.
                self.missed += 1
                self.window.release()
                continue
            task = asyncio.create_task(self._fire(name, instant))
            self._fires.add(task)
            task.add_done_callback(self._fires.discard)

    def on_lag(self, lag: float) -> None:
        """LoopLag listener: resize the window, start what now fits."""
        self.last_lag = lag
        self.window.adjust(lag)
        self._admit()

    def _warn_shed(self) -> None:
        at, count = self._shed_logged
        now = self.mono()
        if self.shed > count and now - at >= SHED_LOG_EVERY:
            log.warning(
                "overloaded: shed %d fires in %.0fs (window=%d in_flight=%d "
                "waiting=%d loop_lag=%.3fs)",
                self.shed - count,
                now - at if at else 0.0,
                self.window.limit,
                self.window.in_flight,
                len(self._waiting),
                self.last_lag,
            )
            self._shed_logged = (now, self.shed)

    async def _fire(self, name: str, instant: datetime) -> None:
        try:
            outcome = await self.dispatcher.fire(
                name, fire_at=instant, trigger="schedule"
            )
            if outcome.dispatches:
                await asyncio.wait(outcome.dispatches, timeout=HANDOVER_HOLD)
        except CronmeshError as exc:
            log.warning("fire failed job=%s error=%s", name, exc)
        finally:
            self.window.release()
            self._admit()
