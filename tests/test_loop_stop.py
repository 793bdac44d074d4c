"""The agent's long-running loops stop when asked, whatever else happens.

On Python 3.11 `asyncio.wait_for` swallows a cancellation that arrives
after the event it waits for fired, so a loop built on it may never end and
a SIGTERM would hang the agent. Each case here wakes the loop and cancels
it a few event-loop turns apart, the way a message or a job change can
race a shutdown.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from cronmesh.core.fsm import StateMachine
from cronmesh.core.scheduler import Scheduler
from cronmesh.raft.driver import RaftDriver
from cronmesh.storage.env import DataDir
from cronmesh.storage.raftlog import LmdbRaftStorage
from cronmesh.storage.state import StateStore


class NoDispatcher:
    async def fire(self, name: str, **kwargs: Any) -> None:
        raise AssertionError("nothing is scheduled")


async def _stops_every_time(loop_owner: Any, start: Any) -> list[int]:
    """Turns (0-3) between wake-up and cancel after which stop() hung."""
    hung = []
    for turns in range(4):
        start()
        await asyncio.sleep(0.02)
        task = loop_owner._task
        loop_owner._wake.set()
        for _ in range(turns):
            await asyncio.sleep(0)
        # asyncio.wait, not wait_for: a timeout must not cancel again.
        stopping = asyncio.create_task(loop_owner.stop())
        done, _ = await asyncio.wait([stopping], timeout=2)
        if not done:
            hung.append(turns)
            while not task.done():
                task.cancel()
                await asyncio.sleep(0.01)
            await stopping
    return hung


def test_scheduler_stop_survives_a_wake_up(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    scheduler = Scheduler(StateStore(data), NoDispatcher(), catch_up=60)  # type: ignore[arg-type]
    try:
        assert asyncio.run(_stops_every_time(scheduler, scheduler.start)) == []
    finally:
        data.close()


def test_raft_driver_stop_survives_a_wake_up(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    driver = RaftDriver("n1", LmdbRaftStorage(data), StateMachine(StateStore(data)))
    driver.bootstrap({"n1"})
    try:
        assert asyncio.run(_stops_every_time(driver, driver.start)) == []
    finally:
        data.close()
