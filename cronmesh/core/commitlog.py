"""How a node turns a command into applied state.

`CommandLog` is the seam between the parts that decide (API, scheduler,
runner) and the part that makes a change durable. `LocalLog` is the
single-server implementation: it numbers commands and applies them in
batches, so every command proposed during one turn of the event loop shares
one LMDB transaction and one fsync (group commit). The Raft driver will
implement the same protocol, replicating the bytes before applying them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from cronmesh.core.fsm import ApplyResult, StateMachine
from cronmesh.errors import CronmeshError

__all__ = ["MAX_COMMAND_BYTES", "CommandLog", "LocalLog", "NotLeaderError"]

log = logging.getLogger("cronmesh.log")

# The largest command a server takes. A Raft entry travels whole inside one
# gRPC message (AppendEntries, or Propose when a follower forwards it),
# base64 inside JSON: 2 MiB become about 2.7 MiB, under gRPC's default
# 4 MiB receive limit, which we keep on purpose. A larger entry would be
# refused by every follower's gRPC server, over and over, and replication
# would stall; so bigger writes (a large restore) are split into parts
# instead of raising the limit (api/restore.py).
MAX_COMMAND_BYTES = 2 << 20


class NotLeaderError(CronmeshError):
    """This node cannot accept writes now; `leader` names who can, if known."""

    def __init__(self, leader: str = "", reason: str = "") -> None:
        if leader:
            message = f"not the leader (leader: {leader})"
        elif reason:  # what this node knows about why there is none
            message = f"no leader yet: {reason} (not the leader, leader: unknown)"
        else:
            message = (
                "no leader known: a majority of the servers may be down or "
                "an election is under way (not the leader, leader: unknown)"
            )
        super().__init__(message)
        self.leader = leader


class CommandLog(Protocol):
    """Makes commands durable and applies them in one order on every server."""

    async def propose(self, payload: bytes) -> ApplyResult:
        """Append `payload`, wait until it is applied here, return the result.

        Raises:
            NotLeaderError: this node cannot accept writes now.
            StorageError: the command could not be made durable.
        """
        ...

    def is_leader(self) -> bool: ...


class LocalLog:
    """A log of one server: applied as soon as written, in batches."""

    def __init__(self, fsm: StateMachine) -> None:
        self.fsm = fsm
        self._pending: list[tuple[bytes, asyncio.Future[ApplyResult]]] = []
        self._flush_scheduled = False
        self.batches = 0

    def is_leader(self) -> bool:
        return True

    async def propose(self, payload: bytes) -> ApplyResult:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ApplyResult] = loop.create_future()
        self._pending.append((payload, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        first = self.fsm.store.applied_index() + 1
        entries = [(first + i, payload) for i, (payload, _) in enumerate(batch)]
        try:
            results = self.fsm.apply_batch(entries)
        except Exception as exc:  # every proposer must hear about the failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        self.batches += 1
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
