"""The data dir and the state machine's apply path: locks, growth, atomicity."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cronmesh.core.fsm import StateMachine, encode_command
from cronmesh.core.model import Execution, format_time
from cronmesh.errors import InvariantViolation, StorageError
from cronmesh.storage.env import DataDir
from cronmesh.storage.state import StateStore


def _job(name: str, **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "schedule": "@every 1m",
        "executor": "shell",
        "executor_config": {"command": "true"},
        **extra,
    }


def _t(i: int) -> datetime:
    return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i)


def test_a_second_open_of_the_data_dir_is_refused(tmp_path: Path) -> None:
    first = DataDir(tmp_path / "d")
    with pytest.raises(StorageError, match="in use by another agent"):
        DataDir(tmp_path / "d")
    first.close()
    DataDir(tmp_path / "d").close()


def test_unsynced_writes_are_visible_at_once_and_made_durable_later(
    tmp_path: Path,
) -> None:
    data = DataDir(tmp_path / "d")
    table = data.db("t")

    def put(key: bytes) -> None:
        data.write(lambda txn: txn.put(key, b"v", db=table))

    def keys() -> list[bytes]:
        with data.read() as txn:
            return [k for k, _ in txn.cursor(db=table)]

    put(b"a")
    assert data.unsynced_writes == 0
    with data.unsynced():
        put(b"b")
        put(b"c")
    assert keys() == [b"a", b"b", b"c"] and data.unsynced_writes == 2
    data.flush()
    assert data.unsynced_writes == 0
    with data.unsynced():
        put(b"d")
    put(b"e")  # a synced write makes the earlier ones durable too
    assert data.unsynced_writes == 0
    data.close()
    data = DataDir(tmp_path / "d")
    table = data.db("t")
    assert keys() == [b"a", b"b", b"c", b"d", b"e"]
    data.close()


def test_the_map_grows_instead_of_failing(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "d", map_size=1 << 20)
    fsm = StateMachine(StateStore(data), max_output=200_000)
    big = "x" * 150_000
    for i in range(1, 41):
        job = f"j{i}"
        assert fsm.apply_batch([(3 * i - 2, encode_command("set_job", job=_job(job)))])[
            0
        ].ok
        done = Execution(
            job_name=job,
            started_at=_t(i),
            node_name="n",
            group=i,
            finished_at=_t(i),
            success=True,
            output=big,
        )
        started = Execution(job_name=job, started_at=_t(i), node_name="n", group=i)
        results = fsm.apply_batch(
            [
                (
                    3 * i - 1,
                    encode_command("execution_started", execution=started.to_json()),
                ),
                (3 * i, encode_command("execution_done", execution=done.to_json())),
            ]
        )
        assert all(r.ok for r in results)
    assert data.env.info()["map_size"] > 1 << 20
    assert fsm.store.applied_index() == 120
    assert len(fsm.store.executions("j40")[0].output) == 150_000
    data.close()


def test_a_rejected_command_writes_nothing_but_its_batch_commits(
    tmp_path: Path,
) -> None:
    data = DataDir(tmp_path / "d")
    fsm = StateMachine(StateStore(data))
    results = fsm.apply_batch(
        [
            (1, encode_command("set_job", job=_job("a"))),
            (2, encode_command("set_job", job=_job("b", parent_job="missing"))),
            (3, encode_command("delete_job", name="nope")),
            (4, encode_command("set_job", job=_job("c", parent_job="a"))),
        ]
    )
    assert [r.code for r in results] == [201, 404, 404, 201]
    assert sorted(j.name for j in fsm.store.list_jobs()) == ["a", "c"]
    assert fsm.store.applied_index() == 4
    # A replayed entry is skipped; a gap is a bug.
    assert fsm.apply_batch([(4, encode_command("delete_job", name="c"))])[0].ok
    assert fsm.store.get_job("c") is not None
    with pytest.raises(InvariantViolation):
        fsm.apply_batch([(9, encode_command("delete_job", name="c"))])
    data.close()


def test_done_is_counted_once_and_trimming_keeps_the_newest(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "d")
    fsm = StateMachine(StateStore(data), max_executions=3)
    index = 1
    fsm.apply_batch([(index, encode_command("set_job", job=_job("a")))])
    for i in range(5):
        done = Execution(
            job_name="a",
            started_at=_t(i),
            node_name="n",
            group=i,
            finished_at=_t(i),
            success=i != 2,
        )
        index += 1
        start = Execution(job_name="a", started_at=_t(i), node_name="n", group=i)
        fsm.apply_batch(
            [(index, encode_command("execution_started", execution=start.to_json()))]
        )
        for _ in range(2):  # reported twice
            index += 1
            fsm.apply_batch(
                [(index, encode_command("execution_done", execution=done.to_json()))]
            )
    job = fsm.store.get_job("a")
    assert job is not None
    assert (job.success_count, job.error_count) == (4, 1)
    assert [e.group for e in fsm.store.executions("a")] == [2, 3, 4]
    data.close()


CRASHER = textwrap.dedent("""
    import sys
    from cronmesh.core.fsm import StateMachine, encode_command
    from cronmesh.storage.env import DataDir
    from cronmesh.storage.state import StateStore
    fsm = StateMachine(StateStore(DataDir(sys.argv[1])))
    index = fsm.store.applied_index()
    while True:
        batch = []
        for _ in range(10):
            index += 1
            job = {"name": f"j{index}", "schedule": "@every 1m", "executor": "shell",
                   "executor_config": {"command": "true"}}
            batch.append((index, encode_command("set_job", job=job)))
        fsm.apply_batch(batch)
        print(index, flush=True)
""")


def test_kill_9_during_writes_never_leaves_half_a_batch(tmp_path: Path) -> None:
    rng = random.Random(7)
    data_dir = tmp_path / "crash"
    for _ in range(10):
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASHER, str(data_dir)], stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(rng.uniform(0.01, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = DataDir(data_dir)
        store = StateStore(data)
        applied = store.applied_index()
        names = {j.name for j in store.list_jobs()}
        assert applied % 10 == 0
        assert names == {f"j{i}" for i in range(1, applied + 1)}
        data.close()


def test_schedule_since_is_when_the_current_schedule_was_written(
    tmp_path: Path,
) -> None:
    """Stamped from the command (never the clock): set at creation, on a
    change of schedule or time zone and on enabling, kept otherwise; the
    same commands give the same rows on another server."""
    writes: list[tuple[str, dict[str, object]]] = [
        ("set_job", {"job": _job("a")}),  # 1: created
        ("set_job", {"job": _job("a", owner="o")}),  # 2: kept
        ("set_job", {"job": _job("a", schedule="@every 2m")}),  # 3
        ("set_job", {"job": _job("a", schedule="@every 2m", timezone="UTC")}),  # 4
        ("set_disabled", {"name": "a", "disabled": True}),  # 5: kept
        ("set_disabled", {"name": "a", "disabled": False}),  # 6: enabled
        ("set_job", {"job": _job("a", schedule="@every 2m", timezone="UTC")}),  # 7
    ]
    expected = [1, 1, 3, 4, 4, 6, 6]
    rows = []
    for copy in ("d1", "d2"):
        data = DataDir(tmp_path / copy)
        fsm = StateMachine(StateStore(data))
        seen = []
        for i, (op, fields) in enumerate(writes, start=1):
            command = encode_command(op, **fields, at=format_time(_t(i)))
            assert fsm.apply_batch([(i, command)])[0].ok
            job = fsm.store.get_job("a")
            assert job is not None
            seen.append(job.schedule_since)
        assert seen == [_t(i) for i in expected]
        rows.append(job.to_json())
        # A restore keeps the document's time; a write without one (an
        # older proposer) leaves a new schedule's time unknown.
        restored = {
            **_job("a", schedule="@every 3m"),
            "schedule_since": "2025-01-01T00:00:00Z",
        }
        assert fsm.apply_batch(
            [(8, encode_command("set_job", job=restored, restore=True))]
        )[0].ok
        job = fsm.store.get_job("a")
        assert job is not None and job.schedule_since == datetime(
            2025, 1, 1, tzinfo=UTC
        )
        assert fsm.apply_batch([(9, encode_command("set_job", job=_job("a")))])[0].ok
        assert fsm.store.get_job("a").schedule_since is None  # type: ignore[union-attr]
        data.close()
    assert rows[0] == rows[1]
