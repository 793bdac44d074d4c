"""The applied state's tables, and typed access to them inside a transaction.

Tables (all in the data dir's one LMDB environment):

    meta     b"applied_index" -> 8-byte big-endian index of the last command
    jobs     name -> job JSON (Dkron's fields)
    jobrt    name -> runtime JSON: last fire instant, current group tally,
             number of stored executions
    execs    exec key -> execution JSON without its output
    outputs  exec key -> output bytes
    running  exec key -> b"" for every execution that has not finished
    staged   restore id \0 part number (8 digits) -> one part of a large
             restore, kept until the restore commits or is abandoned;
             restore id \0 "done" -> the answer of the newest restore

An exec key is `job \\0 started-ns (20 digits) - node`, so one job's
executions sort by start time and a prefix scan lists them.

Nothing here decides anything: `core.fsm` says what to write. `StateView`
is the read side, usable on a read or a write transaction.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from datetime import datetime
from typing import Any, NamedTuple

import lmdb

from cronmesh.core.model import Execution, Job, parse_time, to_ns
from cronmesh.errors import NotFoundError
from cronmesh.storage.env import DataDir

__all__ = ["RunRef", "StateStore", "StateView", "exec_key", "split_execution_id"]

TABLES = ("meta", "jobs", "jobrt", "execs", "outputs", "running", "staged")
_INDEX = struct.Struct(">Q")


class RunRef(NamedTuple):
    """A running execution as its key names it."""

    job_name: str
    id: str
    node_name: str


def split_execution_id(exec_id: str) -> tuple[int, str]:
    """(started ns, node) from an id `<ns>-<node>`."""
    ns_text, sep, node = exec_id.partition("-")
    if not sep or not ns_text.isdigit() or not node:
        raise NotFoundError(f"execution {exec_id!r} not found (malformed id)")
    return int(ns_text), node


def exec_key(job: str, started_ns: int, node: str) -> bytes:
    return f"{job}\0{started_ns:020d}-{node}".encode()


def _key_of(execution: Execution) -> bytes:
    return exec_key(
        execution.job_name, to_ns(execution.started_at), execution.node_name
    )


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class StateView:
    """Typed reads (and, on a write transaction, writes) of the state tables."""

    def __init__(self, data: DataDir, txn: lmdb.Transaction) -> None:
        self.txn = txn
        self.t = {name: data.db(name) for name in TABLES}

    # -- meta
    def applied_index(self) -> int:
        raw = self.txn.get(b"applied_index", db=self.t["meta"])
        return _INDEX.unpack(raw)[0] if raw else 0

    def set_applied_index(self, index: int) -> None:
        self.txn.put(b"applied_index", _INDEX.pack(index), db=self.t["meta"])

    # -- jobs
    def get_job(self, name: str) -> Job | None:
        raw = self.txn.get(name.encode(), db=self.t["jobs"])
        # Stored rows were validated before they were written: load, no checks.
        return None if raw is None else Job.from_stored(json.loads(raw))

    def has_job(self, name: str) -> bool:
        return self.txn.get(name.encode(), db=self.t["jobs"]) is not None

    def put_job(self, job: Job) -> None:
        self.txn.put(job.name.encode(), _dumps(job.to_json()), db=self.t["jobs"])

    def delete_job_row(self, name: str) -> None:
        self.txn.delete(name.encode(), db=self.t["jobs"])
        self.txn.delete(name.encode(), db=self.t["jobrt"])

    def iter_jobs(self) -> Iterator[Job]:
        with self.txn.cursor(db=self.t["jobs"]) as cur:
            for _key, raw in cur:
                yield Job.from_stored(json.loads(raw))

    def job_count(self) -> int:
        return int(self.txn.stat(self.t["jobs"])["entries"])

    # -- per-job runtime record
    def runtime(self, name: str) -> dict[str, Any]:
        raw = self.txn.get(name.encode(), db=self.t["jobrt"])
        return {} if raw is None else json.loads(raw)

    def put_runtime(self, name: str, record: dict[str, Any]) -> None:
        self.txn.put(name.encode(), _dumps(record), db=self.t["jobrt"])

    def last_fire(self, name: str) -> datetime | None:
        return parse_time(self.runtime(name).get("last_fire"), "last_fire")

    # -- executions
    def put_execution(self, execution: Execution) -> bytes:
        key = _key_of(execution)
        self.txn.put(
            key, _dumps(execution.to_json(with_output=False)), db=self.t["execs"]
        )
        if execution.output:
            self.txn.put(key, execution.output.encode(), db=self.t["outputs"])
        if execution.running:
            self.txn.put(key, b"", db=self.t["running"])
        else:
            self.txn.delete(key, db=self.t["running"])
        return key

    def _load(self, key: bytes, raw: bytes, with_output: bool) -> Execution:
        execution = Execution.from_json(json.loads(raw))
        if with_output:
            out = self.txn.get(key, db=self.t["outputs"])
            execution.output = (
                "" if out is None else bytes(out).decode(errors="replace")
            )
        return execution

    def get_execution_by_key(
        self, key: bytes, *, with_output: bool = True
    ) -> Execution | None:
        raw = self.txn.get(key, db=self.t["execs"])
        return None if raw is None else self._load(key, raw, with_output)

    def get_execution(self, job: str, exec_id: str) -> Execution | None:
        started_ns, node = split_execution_id(exec_id)
        return self.get_execution_by_key(exec_key(job, started_ns, node))

    def delete_execution(self, key: bytes) -> None:
        for table in ("execs", "outputs", "running"):
            self.txn.delete(key, db=self.t[table])

    def iter_execution_keys(self, job: str) -> Iterator[bytes]:
        prefix = f"{job}\0".encode()
        with self.txn.cursor(db=self.t["execs"]) as cur:
            if not cur.set_range(prefix):
                return
            for key in cur.iternext(keys=True, values=False):
                if not key.startswith(prefix):
                    return
                yield bytes(key)

    def iter_executions(
        self, job: str, *, with_output: bool = True
    ) -> Iterator[Execution]:
        for key in list(self.iter_execution_keys(job)):
            found = self.get_execution_by_key(key, with_output=with_output)
            if found is not None:
                yield found

    def running_keys(self, job: str | None = None) -> list[bytes]:
        prefix = b"" if job is None else f"{job}\0".encode()
        keys: list[bytes] = []
        with self.txn.cursor(db=self.t["running"]) as cur:
            if not cur.set_range(prefix):
                return keys
            for key in cur.iternext(keys=True, values=False):
                if not key.startswith(prefix):
                    break
                keys.append(bytes(key))
        return keys

    def running_executions(self, job: str | None = None) -> list[Execution]:
        found = (
            self.get_execution_by_key(key, with_output=False)
            for key in self.running_keys(job)
        )
        return [e for e in found if e is not None]

    # -- parts of a restore too large for one command
    def put_staged(self, restore_id: str, seq: int, part: bytes) -> None:
        key = f"{restore_id}\0{seq:08d}".encode()
        self.txn.put(key, part, db=self.t["staged"])

    def staged_parts(self, restore_id: str) -> list[tuple[int, bytes]]:
        """(part number, bytes) of one restore, in order."""
        prefix = f"{restore_id}\0".encode()
        found: list[tuple[int, bytes]] = []
        with self.txn.cursor(db=self.t["staged"]) as cur:
            if not cur.set_range(prefix):
                return found
            for key, value in cur:
                if not key.startswith(prefix):
                    break
                suffix = bytes(key[len(prefix) :])
                if suffix.isdigit():
                    found.append((int(suffix), bytes(value)))
        return found

    def mark_restored(self, restore_id: str, answer: bytes) -> None:
        """Remember the answer of a committed restore (only the newest)."""
        with self.txn.cursor(db=self.t["staged"]) as cur:
            keys = [bytes(k) for k in cur.iternext(keys=True, values=False)]
        for key in keys:
            if key.endswith(b"\0done"):
                self.txn.delete(key, db=self.t["staged"])
        self.txn.put(f"{restore_id}\0done".encode(), answer, db=self.t["staged"])

    def restored(self, restore_id: str) -> bytes | None:
        """The answer of restore `restore_id`, if it is the newest committed."""
        raw = self.txn.get(f"{restore_id}\0done".encode(), db=self.t["staged"])
        return None if raw is None else bytes(raw)

    def drop_staged(self, restore_id: str | None = None) -> int:
        """Delete the parts of one restore (None: of every restore)."""
        prefix = b"" if restore_id is None else f"{restore_id}\0".encode()
        with self.txn.cursor(db=self.t["staged"]) as cur:
            keys = [bytes(k) for k in cur.iternext(keys=True, values=False)]
        doomed = [k for k in keys if k.startswith(prefix)]
        for key in doomed:
            self.txn.delete(key, db=self.t["staged"])
        return len(doomed)


class StateStore:
    """The applied state of one node, on top of its data dir."""

    def __init__(self, data: DataDir) -> None:
        self.data = data
        for name in TABLES:
            data.db(name)

    def view(self) -> _ReadView:
        """A context manager giving a `StateView` on a fresh read transaction."""
        return _ReadView(self.data)

    def get_job(self, name: str) -> Job | None:
        with self.view() as v:
            return v.get_job(name)

    def list_jobs(self) -> list[Job]:
        with self.view() as v:
            return list(v.iter_jobs())

    def applied_index(self) -> int:
        with self.view() as v:
            return v.applied_index()

    def executions(self, job: str, *, with_output: bool = True) -> list[Execution]:
        with self.view() as v:
            return list(v.iter_executions(job, with_output=with_output))

    def get_execution(self, job: str, exec_id: str) -> Execution | None:
        with self.view() as v:
            return v.get_execution(job, exec_id)

    def running(self, job: str | None = None) -> list[Execution]:
        with self.view() as v:
            return v.running_executions(job)

    def has_job(self, name: str) -> bool:
        with self.view() as v:
            return v.has_job(name)

    def running_refs(self) -> list[RunRef]:
        """(job, execution id, node) of every running execution, from the
        keys alone: cheap enough to call every second with thousands."""
        with self.view() as v:
            refs = []
            for key in v.running_keys():
                job, _, rest = bytes(key).decode().partition("\0")
                ns_text, _, node = rest.partition("-")
                refs.append(RunRef(job, f"{int(ns_text)}-{node}", node))
            return refs

    def execution_state(self, job: str, exec_id: str) -> str | None:
        """ "running", "finished", or None (unknown), without decoding."""
        try:
            started_ns, node = split_execution_id(exec_id)
        except NotFoundError:
            return None
        key = exec_key(job, started_ns, node)
        with self.view() as v:
            if v.txn.get(key, db=v.t["running"]) is not None:
                return "running"
            if v.txn.get(key, db=v.t["execs"]) is not None:
                return "finished"
        return None

    def last_fire(self, name: str) -> datetime | None:
        with self.view() as v:
            return v.last_fire(name)


class _ReadView:
    def __init__(self, data: DataDir) -> None:
        self._data = data
        self._txn: lmdb.Transaction | None = None

    def __enter__(self) -> StateView:
        self._txn = self._data.env.begin(write=False)
        return StateView(self._data, self._txn)

    def __exit__(self, *exc: object) -> None:
        assert self._txn is not None
        self._txn.abort()
        self._txn = None
