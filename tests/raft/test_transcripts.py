"""Golden transcripts: tests/raft/testdata/*.txt replayed through the simulator.

Each file is a script in a tiny command language.  A line starting with
``> `` is a command; the lines after it, up to the next command, are what it
must print, including the core's INFO log lines.  ``#`` lines are comments.
After a deliberate behaviour change regenerate the files with
``RAFT_REWRITE=1 pytest tests/raft/test_transcripts.py`` and review the diff
before committing it.

Commands (node ids are n1, n2, ...):

    add-nodes N [voters=K]    a cluster of N servers, the first K founding voters
    campaign ID               ID starts an election now (as on TimeoutNow)
    tick ID [N]               ID ticks N times (default 1), then messages flow
    tick-all [N]              every live server ticks N times
    deliver                   deliver every message in flight
    propose ID DATA           propose DATA at ID
    conf ID OP NODE           propose a membership change (add_voter, ...)
    transfer ID TARGET        leadership transfer
    read ID CTX               read-index request
    compact ID                snapshot ID's state machine and compact its log
    isolate ID | heal | crash ID | restart ID
    status                    one line per server
    raft-log ID               the entries of ID's log
    reads                     reads served since the last ``reads``
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cronmesh.raft.errors import RaftError
from cronmesh.raft.messages import TimeoutNow
from cronmesh.raft.node import RaftNode
from cronmesh.raft.sim import Cluster
from cronmesh.raft.types import ConfChange, ConfChangeOp

DATA = Path(__file__).parent / "testdata"
FILES = sorted(DATA.glob("*.txt"))


class _Collect(logging.Handler):
    def __init__(self, out: list[str]) -> None:
        super().__init__(logging.INFO)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(record.getMessage())


@contextmanager
def _capture(out: list[str]) -> Iterator[None]:
    logger = logging.getLogger("cronmesh.raft")
    handler = _Collect(out)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


class Interpreter:
    """Runs the command language against one Cluster."""

    def __init__(self) -> None:
        self.c: Cluster | None = None

    @property
    def cluster(self) -> Cluster:
        assert self.c is not None, "add-nodes first"
        return self.c

    def run(self, line: str) -> list[str]:
        out: list[str] = []
        name, *args = line.split()
        handler: Callable[..., list[str] | None] = getattr(
            self, "cmd_" + name.replace("-", "_")
        )
        with _capture(out):
            try:
                printed = handler(*args)
            except RaftError as exc:
                printed = [f"error: {type(exc).__name__}: {exc}"]
        return out + (printed or [])

    def cmd_add_nodes(self, n: str, voters: str = "") -> None:
        ids = [f"n{i}" for i in range(1, int(n) + 1)]
        k = int(voters.removeprefix("voters=")) if voters else len(ids)
        self.c = Cluster(ids, seed=0, voters=ids[:k])

    def cmd_campaign(self, node: str) -> None:
        def go(core: RaftNode) -> None:
            core.step(TimeoutNow(to=node, frm=node, term=core.term))

        self.cluster.act(node, go)
        self.cluster.deliver()

    def cmd_tick(self, node: str, n: str = "1") -> None:
        for _ in range(int(n)):
            self.cluster.act(node, lambda core: core.tick())
            self.cluster.deliver()

    def cmd_tick_all(self, n: str = "1") -> None:
        self.cluster.run(int(n))

    def cmd_deliver(self) -> None:
        self.cluster.deliver()

    def cmd_propose(self, node: str, data: str) -> list[str]:
        index, term = self.cluster.propose(node, data)
        self.cluster.deliver()
        return [f"proposed index={index} term={term}"]

    def cmd_conf(self, node: str, op: str, target: str) -> None:
        change = ConfChange(ConfChangeOp(op), target)
        self.cluster.act(node, lambda core: core.propose_conf_change(change))
        self.cluster.deliver()

    def cmd_transfer(self, node: str, target: str) -> None:
        self.cluster.act(node, lambda core: core.transfer_leadership(target))
        self.cluster.deliver()

    def cmd_read(self, node: str, ctx: str) -> None:
        self.cluster.read(node, ctx.encode())
        self.cluster.deliver()

    def cmd_compact(self, node: str) -> None:
        self.cluster.compact(node)

    def cmd_isolate(self, node: str) -> None:
        self.cluster.isolate(node)

    def cmd_heal(self) -> None:
        self.cluster.heal()

    def cmd_crash(self, node: str) -> None:
        self.cluster.crash(node)

    def cmd_restart(self, node: str) -> None:
        self.cluster.restart(node)

    def cmd_status(self) -> list[str]:
        lines = []
        for node_id, node in sorted(self.cluster.nodes.items()):
            core = node.core
            if core is None:
                lines.append(f"{node_id} down")
                continue
            lines.append(
                f"{node_id} {core.role.value} term={core.term} "
                f"leader={core.leader} commit={core.commit} "
                f"applied={core.applied} last={core.log.last_index()} "
                f"snap={core.log.snap_index} "
                f"voters={','.join(sorted(core.membership.voters))} "
                f"learners={','.join(sorted(core.membership.learners))}"
            )
        return lines

    def cmd_raft_log(self, node: str) -> list[str]:
        log = self.cluster.core(node).log
        first, last = log.first_index(), log.last_index()
        if last < first:
            return [f"empty after snapshot {log.snap_index}"]
        return [
            f"{e.index}/{e.term} {e.kind.name} {e.data.decode()}".rstrip()
            for e in log.entries(first, last + 1, 1 << 30)
        ]

    def cmd_reads(self) -> list[str]:
        c = self.cluster
        lines = [f"{n} served {ctx.decode()} at {i}" for n, ctx, i in c.served_reads]
        lines += [f"{n} failed {ctx.decode()}" for n, ctx in c.failed_reads]
        c.served_reads.clear()
        c.failed_reads.clear()
        return lines


def _parse(text: str) -> list[tuple[str, list[str]]]:
    blocks: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("> "):
            blocks.append((line[2:].strip(), []))
        elif blocks and line and not line.startswith("#"):
            blocks[-1][1].append(line)
    return blocks


def _render(text: str, outputs: list[list[str]]) -> str:
    lines, it = [], iter(outputs)
    for line in text.splitlines():
        if line.startswith("> "):
            lines.append(line)
            lines.extend(next(it))
        elif line.startswith("#") or not line:
            lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_transcript(path: Path) -> None:
    text = path.read_text()
    interpreter = Interpreter()
    outputs = [interpreter.run(cmd) for cmd, _ in _parse(text)]
    if os.environ.get("RAFT_REWRITE"):
        path.write_text(_render(text, outputs))
        return
    for (cmd, expected), got in zip(_parse(text), outputs, strict=True):
        assert got == expected, f"{path.name}: output of '> {cmd}' differs"
