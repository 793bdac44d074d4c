"""The state machine: every change to jobs and executions is a command.

A command is a small JSON object with an `op`. `StateMachine.apply_batch`
applies a batch of (index, command) pairs in ONE write transaction together
with the applied index, so a crash leaves either the whole batch or none of
it. This is the seam Raft plugs into: today a `LocalLog` numbers commands
and applies them at once; with Raft the same bytes are replicated first and
applied on every server in log order.

Rules every handler keeps, because the same log must give the same state on
every server:
  1. Read nothing but the command and the state: no clock, no randomness,
     no environment. Times travel inside the command.
  2. Check first, write after: a rejected command writes nothing, while the
     other commands of its batch still commit.
  3. Return an `ApplyResult`; never raise for a bad command. An exception
     escaping a handler is a bug and aborts the whole batch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from typing import Any

import lmdb

from cronmesh.core.liveness import VERDICT_HANDOVER
from cronmesh.core.model import (
    STATUS_FAILED,
    STATUS_PARTIALLY_FAILED,
    STATUS_SUCCESS,
    Execution,
    Job,
    format_time,
    parse_time,
    to_ns,
)
from cronmesh.core.output import trim_text
from cronmesh.errors import InvariantViolation
from cronmesh.storage.state import StateStore, StateView, exec_key

__all__ = ["ApplyResult", "Event", "StateMachine", "encode_command"]

log = logging.getLogger("cronmesh.fsm")

DEFAULT_MAX_EXECUTIONS = 100
DEFAULT_MAX_OUTPUT = 256_000
PARENT_GROUPS_KEPT = 64


@dataclass
class ApplyResult:
    """What applying one command did.

    `code` is an HTTP-like status: 200 done, 400 invalid, 404 not found,
    409 conflict. `value` carries the job or execution written.
    """

    code: int = 200
    error: str = ""
    value: Any = None

    @property
    def ok(self) -> bool:
        return self.code < 300


@dataclass
class Event:
    """A change the rest of the node reacts to, emitted after the commit."""

    kind: str  # job_set, job_deleted, execution_started, execution_done
    job: str
    execution: Execution | None = None
    previous: Job | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def encode_command(op: str, **fields: Any) -> bytes:
    return json.dumps({"op": op, **fields}, separators=(",", ":")).encode()


def _fail(code: int, message: str) -> ApplyResult:
    return ApplyResult(code=code, error=message)


class StateMachine:
    """Applies commands to the state store and tells listeners what changed."""

    def __init__(
        self,
        store: StateStore,
        *,
        max_executions: int = DEFAULT_MAX_EXECUTIONS,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> None:
        self.store = store
        self.max_executions = max_executions
        self.max_output = max_output
        self.listeners: list[Callable[[Event], None]] = []
        self._handlers: dict[
            str, Callable[[StateView, dict[str, Any], list[Event]], ApplyResult]
        ] = {
            "set_job": self._set_job,
            "delete_job": self._delete_job,
            "set_disabled": self._set_disabled,
            "execution_started": self._execution_started,
            "execution_done": self._execution_done,
            "executions_done": self._executions_done,
            "delete_executions": self._delete_executions,
            "restore": self._restore,
            "restore_part": self._restore_part,
            "restore_abort": self._restore_abort,
            "noop": lambda v, c, e: ApplyResult(),
        }

    def apply_batch(self, entries: list[tuple[int, bytes]]) -> list[ApplyResult]:
        """Apply consecutive log entries in one transaction, then notify.

        Entries at or below the applied index are skipped (a replay after a
        crash), and their result is a 200 with no value.
        """
        events: list[Event] = []

        def run(txn: Any) -> list[ApplyResult]:
            events.clear()
            view = StateView(self.store.data, txn)
            applied = view.applied_index()
            results = []
            for index, payload in entries:
                if index <= applied:
                    results.append(ApplyResult())
                    continue
                if index != applied + 1:
                    raise InvariantViolation(
                        f"apply gap: applied_index={applied} next_index={index}"
                    )
                results.append(self._apply_one(view, payload, events))
                applied = index
            view.set_applied_index(applied)
            return results

        results = self.store.data.write(run)
        for event in events:
            for listener in self.listeners:
                try:
                    listener(event)
                except Exception:  # a listener's bug must not stop applying
                    log.exception(
                        "fsm listener failed event=%s job=%s", event.kind, event.job
                    )
        return results

    def _apply_one(
        self, view: StateView, payload: bytes, events: list[Event]
    ) -> ApplyResult:
        try:
            command = json.loads(payload)
            handler = self._handlers[command["op"]]
        except (ValueError, KeyError, TypeError):
            log.warning("skipping undecodable command bytes=%d", len(payload))
            return _fail(400, "undecodable command")
        try:
            return handler(view, command, events)
        except lmdb.MapFullError:
            raise  # the data dir grows the map and runs the batch again
        except Exception as exc:
            # Handlers check before they write, so a failure here (a bug, a
            # value LMDB refuses) has written nothing; every server fails the
            # same way on the same bytes, so skipping it keeps them equal.
            log.exception("command failed op=%s", command.get("op"))
            return _fail(500, f"command {command.get('op')!r} failed: {exc}")

    # -- jobs
    def _set_job(
        self, view: StateView, cmd: dict[str, Any], events: list[Event]
    ) -> ApplyResult:
        restore = bool(cmd.get("restore"))
        job = Job.from_json(cmd["job"], keep_runtime=restore)
        previous = view.get_job(job.name)
        if job.parent_job:
            problem = self._parent_problem(view, job)
            if problem is not None:
                return problem
        if previous is not None:
            # Runtime fields belong to the store, not to the client (Dkron
            # #279: an update must not drop the list of children).
            job.dependent_jobs = previous.dependent_jobs
            if not restore:
                _copy_runtime(previous, job)
        else:
            job.dependent_jobs = []
        if not (restore and job.schedule_since is not None):
            # `at`: the proposer's clock when it took the write (rule 1).
            at = parse_time(cmd.get("at"), "at")
            job.schedule_since = _schedule_since(previous, job, at)
        old_parent = previous.parent_job if previous else ""
        if old_parent and old_parent != job.parent_job:
            self._unlink_child(view, old_parent, job.name)
        if job.parent_job and job.parent_job != old_parent:
            parent = view.get_job(job.parent_job)
            assert parent is not None
            if job.name not in parent.dependent_jobs:
                parent.dependent_jobs.append(job.name)
                view.put_job(parent)
        view.put_job(job)
        events.append(Event("job_set", job.name, previous=previous))
        return ApplyResult(code=201 if previous is None else 200, value=job)

    def _restore(
        self, view: StateView, cmd: dict[str, Any], events: list[Event]
    ) -> ApplyResult:
        """Store many jobs, their executions and schedule state, or nothing.

        The content is in the command (`jobs`, `executions`, `last_fire`) or,
        for a restore too large for one Raft entry, in the parts staged by
        `restore_part` under `staged` (an id) and `parts` (their number).
        The API validated it all before; what depends on the state (parents,
        cycles) is checked again here, against the state of this index.
        """
        restore_id = str(cmd.get("id") or cmd.get("staged") or "")
        answer = view.restored(restore_id) if restore_id else None
        if answer is not None:
            return ApplyResult(value=json.loads(answer))  # a forwarded retry
        content: dict[str, Any] = cmd
        if "staged" in cmd:
            merged = self._unstage(view, str(cmd["staged"]), int(cmd["parts"]))
            if isinstance(merged, ApplyResult):
                return merged
            content = merged
        jobs: dict[str, dict[str, Any]] = {}
        for data in content["jobs"]:
            jobs[str(data["name"])] = data  # checked again by _set_job below
        order, problem = self._parents_first(view, jobs)
        if problem:
            return _fail(400, problem)
        # A nested transaction: if anything is refused, nothing is written.
        child = self.store.data.env.begin(write=True, parent=view.txn)
        new_events: list[Event] = []
        try:
            result = self._restore_into(
                StateView(self.store.data, child), jobs, order, content, new_events
            )
        except BaseException:
            child.abort()
            raise
        if not result.ok:
            child.abort()
            return result
        done = StateView(self.store.data, child)
        if "staged" in cmd:
            done.drop_staged(str(cmd["staged"]))
        if restore_id:
            # So a proposer cut off by a leader change can learn the outcome.
            encoded = json.dumps(result.value, separators=(",", ":")).encode()
            done.mark_restored(restore_id, encoded)
        child.commit()
        events.extend(new_events)
        log.info(
            "restored jobs=%d executions=%d",
            len(result.value["jobs"]),
            result.value["executions"],
        )
        return result

    def _restore_into(
        self,
        view: StateView,
        jobs: dict[str, dict[str, Any]],
        order: list[str],
        content: dict[str, Any],
        events: list[Event],
    ) -> ApplyResult:
        report: list[dict[str, str]] = []
        for name in order:
            result = self._set_job(view, {"job": jobs[name], "restore": True}, events)
            if not result.ok:
                return _fail(result.code, f"{name}: {result.error}")
            created = result.code == 201
            report.append({"name": name, "result": "created" if created else "updated"})
        for name in order:
            _keep_child_order(view, name, jobs[name].get("dependent_jobs") or [])
        restored = self._restore_history(
            view, content.get("executions") or [], content.get("last_fire") or {}
        )
        if isinstance(restored, ApplyResult):
            return restored
        return ApplyResult(value={"jobs": report, "executions": restored})

    def _unstage(
        self, view: StateView, restore_id: str, expected: int
    ) -> dict[str, Any] | ApplyResult:
        parts = view.staged_parts(restore_id)
        if [seq for seq, _ in parts] != list(range(expected)):
            return _fail(
                409,
                f"restore {restore_id}: {len(parts)} of {expected} parts are "
                "staged (another restore started meanwhile?); nothing restored",
            )
        merged: dict[str, Any] = {"jobs": [], "executions": [], "last_fire": {}}
        for _, raw in parts:
            part = json.loads(raw)
            merged["jobs"] += part.get("jobs", [])
            merged["executions"] += part.get("executions", [])
            merged["last_fire"].update(part.get("last_fire", {}))
        return merged

    def _parents_first(
        self, view: StateView, jobs: dict[str, dict[str, Any]]
    ) -> tuple[list[str], str | None]:
        """The names of `jobs` with every parent before its children."""
        order: list[str] = []
        placed: set[str] = set()
        visiting: set[str] = set()

        def visit(name: str) -> str | None:
            if name in placed:
                return None
            if name in visiting:
                return f"parent_job: cycle through {name!r}"
            visiting.add(name)
            parent = jobs[name].get("parent_job") or ""
            if parent in jobs:
                problem = visit(parent)
                if problem:
                    return problem
            elif parent and view.get_job(parent) is None:
                return f"parent_job: parent job {parent!r} of {name!r} not found"
            visiting.discard(name)
            order.append(name)
            placed.add(name)
            return None

        for name in jobs:
            problem = visit(name)
            if problem:
                return [], problem
        return order, None

    def _restore_history(
        self, view: StateView, executions: list[Any], last_fire: dict[str, Any]
    ) -> int | ApplyResult:
        """Put restored executions (ids and times kept), then set each job's
        runtime record: last fire, stored count, newest group's tally.
        Returns how many executions were put."""
        before = {name: view.runtime(name) for name in last_fire}
        added: dict[str, list[Execution]] = {}
        for data in executions:
            execution = Execution.from_json(data)
            name = execution.job_name
            if name not in before:
                if not view.has_job(name):
                    return _fail(400, f"execution of unknown job {name!r}")
                before[name] = view.runtime(name)
            execution.output = trim_text(execution.output, self.max_output)
            if view.get_execution_by_key(_exec_key(execution), with_output=False):
                before[name]["count"] = before[name].get("count", 0) - 1  # replaced
            view.put_execution(execution)
            added.setdefault(name, []).append(execution)
        for name, runtime in sorted(before.items()):
            if not view.has_job(name):
                return _fail(400, f"last_fire of unknown job {name!r}")
            fire = parse_time(last_fire.get(name), "last_fire")
            last = parse_time(runtime.get("last_fire"), "last_fire")
            if fire is not None and (last is None or fire > last):
                runtime["last_fire"] = format_time(fire)
            found = added.get(name, [])
            stored_before = runtime.get("count", 0)
            runtime["count"] = stored_before + len(found)
            if stored_before > 0:
                # Runs stored before the restore count in the tally too.
                found = list(view.iter_executions(name, with_output=False))
            _tally(runtime, [e for e in found if not e.running])
            self._trim(view, name, runtime)
            view.put_runtime(name, runtime)
        return len(executions)

    def _restore_part(
        self, view: StateView, cmd: dict[str, Any], events: list[Event]
    ) -> ApplyResult:
        """Stage one part of a large restore; `restore` with `staged` uses it."""
        seq = int(cmd["seq"])
        if seq == 0:
            # Parts of a restore whose client went away before its commit.
            dropped = view.drop_staged()
            if dropped:
                log.info("dropped stale restore parts count=%d", dropped)
        view.put_staged(str(cmd["id"]), seq, json.dumps(cmd["part"]).encode())
        return ApplyResult()

    def _restore_abort(
        self, view: StateView, cmd: dict[str, Any], events: list[Event]
    ) -> ApplyResult:
        view.drop_staged(str(cmd["id"]))
        return ApplyResult()

    def _parent_problem(self, view: StateView, job: Job) -> ApplyResult | None:
        parent = view.get_job(job.parent_job)
        if parent is None:
            return _fail(404, f"parent_job: parent job {job.parent_job!r} not found")
        seen: set[str] = set()
        cursor: Job | None = parent
        while cursor is not None and cursor.name not in seen:
            if cursor.name == job.name:
                return _fail(
                    400,
                    f"parent_job: making {job.parent_job!r} the parent of "
                    f"{job.name!r} would create a cycle",
                )
            seen.add(cursor.name)
            cursor = view.get_job(cursor.parent_job) if cursor.parent_job else None
        return None

    def _unlink_child(self, view: StateView, parent_name: str, child: str) -> None:
        parent = view.get_job(parent_name)
        if parent is not None and child in parent.dependent_jobs:
            parent.dependent_jobs.remove(child)
            view.put_job(parent)

    def _delete_job(
        self, view: StateView, cmd: dict[str, Any], events: list[Event]
    ) -> ApplyResult:
        name = cmd["name"]
        job = view.get_job(name)
        if job is None:
            return _fail(404, f"job {name!r} not found")
        if job.dependent_jobs:
            return _fail(
                409,
                f"job {name!r} has dependent jobs {job.dependent_jobs}: "
                "delete the children first",
            )
        running = view.running_executions(name)
        self._remove_job(view, job)
        # The leader stops these: nothing may keep running for a job that
        # is gone (a job re-created under its name would overlap with them).
        events.append(
            Event("job_deleted", name, previous=job, extra={"running": running})
        )
        return ApplyResult(value=job)

    def _remove_job(self, view: StateView, job: Job) -> None:
        """Delete a job (no children), its executions, and its parent's link."""
        if job.parent_job:
            self._unlink_child(view, job.parent_job, job.name)
        for key in list(view.iter_execution_keys(job.name)):
            view.delete_execution(key)
        view.delete_job_row(job.name)

    def _set_disabled(
        self, view: StateView, cmd: dict[str, Any], events: list[Event]
    ) -> ApplyResult:
        name = cmd["name"]
        job = view.get_job(name)
        if job is None:
            return _fail(404, f"job {name!r} not found")
        previous = job.copy()
        job.disabled = bool(cmd["disabled"])
        job.schedule_since = _schedule_since(
            previous, job, parse_time(cmd.get("at"), "at")
        )
        view.put_job(job)
        events.append(Event("job_set", name, previous=previous))
        return ApplyResult(value=job)

    # -- executions
    def _execution_started(
        self, view: StateView, cmd: dict[str, Any], events: list[Event]
    ) -> ApplyResult:
        """A run starts: one execution per target node, all in one group.

        `execution` (one) or `executions` (several, same job); `fire`: the
        scheduled instant, accepted once per job; `forbid`: refuse while an
        execution of the job runs; `parent`: {"job", "group"} of the parent
        run that triggers this dependent run, accepted once per parent group.
        """
        docs = cmd.get("executions") or [cmd["execution"]]
        executions = [Execution.from_json(doc) for doc in docs]
        job_name = executions[0].job_name
        if any(e.job_name != job_name for e in executions):
            return _fail(400, "executions of one run must share their job")
        if not view.has_job(job_name):
            return _fail(404, f"job {job_name!r} not found")
        if cmd.get("forbid"):
            running = view.running_executions(job_name)
            if running:
                return ApplyResult(
                    code=409,
                    error=f"job {job_name!r} forbids concurrent runs and "
                    f"execution {running[0].id} is running",
                    value=running[0],
                )
        runtime = view.runtime(job_name)
        fire = parse_time(cmd.get("fire"), "fire")
        if fire is not None:
            last = parse_time(runtime.get("last_fire"), "last_fire")
            if last is not None and fire <= last:
                # This instant was already run: a replayed or doubled fire.
                return _fail(409, f"fire {format_time(fire)} already ran")
            runtime["last_fire"] = format_time(fire)
        parent = cmd.get("parent")
        if parent:
            seen = runtime.setdefault("parents", {})
            groups = seen.get(parent["job"], [])
            groups = [groups] if isinstance(groups, int) else list(groups)
            if parent["group"] in groups:
                return _fail(
                    409,
                    f"dependent run for {parent['job']} group {parent['group']} "
                    "already started",
                )
            # The groups that triggered this job lately (a parent group may
            # finish after a newer one); older ones are long settled.
            seen[parent["job"]] = [*groups, parent["group"]][-PARENT_GROUPS_KEPT:]
        runtime["count"] = runtime.get("count", 0) + len(executions)
        for execution in executions:
            view.put_execution(execution)
        self._trim(view, job_name, runtime)
        view.put_runtime(job_name, runtime)
        for execution in executions:
            events.append(Event("execution_started", job_name, execution=execution))
        return ApplyResult(value=executions[0] if len(executions) == 1 else executions)

    def _execution_done(
        self, view: StateView, cmd: dict[str, Any], events: list[Event]
    ) -> ApplyResult:
        execution = Execution.from_json(cmd["execution"])
        job = view.get_job(execution.job_name)
        if job is None:
            return _fail(404, f"job {execution.job_name!r} not found")
        if execution.finished_at is None:
            return _fail(400, "execution_done without finished_at")
        stored = view.get_execution(execution.job_name, execution.id)
        if stored is None:
            # Its start was never recorded under this job: a run of a job that
            # was deleted (and maybe re-created since). Never count it.
            return _fail(
                404,
                f"execution {execution.id} is not a run of job {job.name!r} "
                "(was the job deleted while it ran?)",
            )
        replaces = not stored.running and _replaces_verdict(stored, execution)
        if not stored.running and not replaces:
            # Reported twice (a retry after a lost ack): count it once.
            return ApplyResult(value=stored, code=208)
        runtime = view.runtime(job.name)
        if replaces:
            self._uncount_verdict(job, runtime, stored)
        execution.output = trim_text(execution.output, self.max_output)
        view.put_execution(execution)
        self._count(job, runtime, execution)
        self._trim(view, job.name, runtime)
        deleted = False
        if job.ephemeral and execution.success and not job.dependent_jobs:
            # Dkron: an ephemeral job is deleted after its first success.
            self._remove_job(view, job)
            deleted = True
        else:
            # Limitation: the counters live in the job row, so every finished
            # run rewrites the whole job (a JSON encode per execution).
            view.put_job(job)
            view.put_runtime(job.name, runtime)
        events.append(
            Event(
                "execution_done",
                job.name,
                execution=execution,
                extra={"group_status": job.status, "replaced_verdict": replaces},
            )
        )
        if deleted:
            events.append(Event("job_deleted", job.name, previous=job))
        return ApplyResult(value=execution)

    def _uncount_verdict(
        self, job: Job, runtime: dict[str, Any], stored: Execution
    ) -> None:
        """Take back what a leader's hand-over verdict counted (one failure).

        Limitation: `last_error` keeps the verdict's time, and when a retry
        already replaced the verdict in the group tally the tally may count
        one failure too few until the group's next result.
        """
        job.error_count = max(0, job.error_count - 1)
        if runtime.get("group") == stored.group and runtime.get("fail", 0) > 0:
            runtime["fail"] -= 1

    def _executions_done(
        self, view: StateView, cmd: dict[str, Any], events: list[Event]
    ) -> ApplyResult:
        """Several results in one entry (an agent reports what finished since
        its last report). Each is applied as `execution_done` would; the
        value is the list of their codes, in order."""
        codes = []
        for doc in cmd["executions"]:
            result = self._execution_done(view, {"execution": doc}, events)
            codes.append(result.code)
        return ApplyResult(value=codes)

    def _count(self, job: Job, runtime: dict[str, Any], execution: Execution) -> None:
        assert execution.finished_at is not None
        if execution.success:
            job.success_count += 1
            job.last_success = _later(job.last_success, execution.finished_at)
        else:
            job.error_count += 1
            job.last_error = _later(job.last_error, execution.finished_at)
        # Dkron's status is the tally of the newest execution group.
        group = runtime.get("group")
        if group is None or execution.group > group:
            runtime.update(group=execution.group, ok=0, fail=0)
        elif execution.group < group:
            return
        if execution.attempt > 1 and runtime["fail"] > 0:
            # A retry replaces the failed attempt before it: the group's
            # status is the outcome of each run's last attempt.
            runtime["fail"] -= 1
        runtime["ok" if execution.success else "fail"] += 1
        if runtime["fail"] == 0:
            job.status = STATUS_SUCCESS
        elif runtime["ok"] == 0:
            job.status = STATUS_FAILED
        else:
            job.status = STATUS_PARTIALLY_FAILED

    def _trim(self, view: StateView, job: str, runtime: dict[str, Any]) -> None:
        excess = runtime.get("count", 0) - self.max_executions
        if excess <= 0:
            return
        running = set(view.running_keys(job))
        # Only the oldest `excess` finished ones go: read no further keys.
        oldest = list(islice(view.iter_execution_keys(job), excess + len(running)))
        for key in oldest:
            if excess <= 0:
                break
            if key in running:
                continue
            view.delete_execution(key)
            excess -= 1
            runtime["count"] -= 1

    def _delete_executions(
        self, view: StateView, cmd: dict[str, Any], events: list[Event]
    ) -> ApplyResult:
        name = cmd["name"]
        job = view.get_job(name)
        if job is None:
            return _fail(404, f"job {name!r} not found")
        running = set(view.running_keys(name))
        removed = 0
        for key in list(view.iter_execution_keys(name)):
            if key not in running:
                view.delete_execution(key)
                removed += 1
        runtime = view.runtime(name)
        runtime["count"] = len(running)
        view.put_runtime(name, runtime)
        log.debug("deleted executions job=%s count=%d", name, removed)
        return ApplyResult(value=job)


def _replaces_verdict(stored: Execution, report: Execution) -> bool:
    """May `report` replace the finished `stored` execution?

    The rule: a result is final once an agent reported it. A failure the
    leader recorded on its own is final too, except one with the verdict
    VERDICT_HANDOVER: the leader never heard whether the agent took the run
    (its hand-over got no answer), so the agent may have run it after all.
    Then the agent's own report replaces that failure, once: the report
    must name the same node, carry no verdict itself (a second verdict, or
    any other leader's guess, never overwrites anything) and, being stored
    without a verdict, is final. So a stale or repeated report can never
    overwrite a result an agent reported.
    """
    return (
        stored.verdict == VERDICT_HANDOVER
        and not report.verdict
        and report.node_name == stored.node_name
    )


def _exec_key(execution: Execution) -> bytes:
    return exec_key(
        execution.job_name, to_ns(execution.started_at), execution.node_name
    )


def _tally(runtime: dict[str, Any], finished: list[Execution]) -> None:
    """The newest group's ok/fail tally (as _count keeps it), recounted."""
    if not finished:
        return
    group = max(e.group for e in finished)
    newest = [e for e in finished if e.group == group]
    ok = sum(1 for e in newest if e.success)
    runtime.update(group=group, ok=ok, fail=len(newest) - ok)


def _keep_child_order(view: StateView, name: str, listed: list[str]) -> None:
    """Order a restored job's children as its backup listed them (they were
    linked parents first, so in another order)."""
    if not listed:
        return
    job = view.get_job(name)
    if job is None:
        return
    ordered = [c for c in listed if c in job.dependent_jobs]
    ordered += [c for c in job.dependent_jobs if c not in ordered]
    if ordered != job.dependent_jobs:
        job.dependent_jobs = ordered
        view.put_job(job)


def _copy_runtime(source: Job, target: Job) -> None:
    target.status = source.status
    target.success_count = source.success_count
    target.error_count = source.error_count
    target.last_success = source.last_success
    target.last_error = source.last_error


def _schedule_since(
    previous: Job | None, job: Job, at: datetime | None
) -> datetime | None:
    """When `job`'s schedule took effect: `at` (the time of the write) for a
    new job, a changed schedule or time zone, or a job being enabled;
    otherwise the time kept with `previous`."""
    if (
        previous is None
        or (previous.schedule, previous.timezone) != (job.schedule, job.timezone)
        or (previous.disabled and not job.disabled)
    ):
        return at
    return previous.schedule_since


def _later(a: datetime | None, b: datetime) -> datetime:
    return b if a is None or to_ns(b) > to_ns(a) else a
