"""Benchmark: Raft commits on 3 servers on loopback, against PySyncObj.

Three parts, all on 127.0.0.1, all in one run:

1. cronmesh Raft itself (no HTTP). Three bench worker processes each build
   the stack a server agent builds (DataDir + StateStore + StateMachine +
   `Cluster` with a fixed peers map, agent Raft timings: tick 0.05 s), with
   LMDB's fsync on, on the disk the data dirs are on. The worker that holds
   the leadership drives `RaftDriver.propose` itself: single proposer
   latency (one proposal at a time), then throughput with N concurrent
   proposers (asyncio tasks, default 64) for a fixed time. The payload is a
   `noop` command padded to `--payload` bytes, so the state machine applies
   it for (almost) nothing but still commits its applied index (one more
   LMDB commit per batch).
2. PySyncObj, 3 processes, same payload size (a replicated `put(bytes)`),
   same measurements, driven on its leader: `sync=True` calls for latency,
   N callbacks kept in flight for throughput. It runs with no journal, so
   its figures include no disk write at all. It is measured twice: with
   its default `appendEntriesUseBatch=True` (commands wait for the next
   50 ms tick, tuned for throughput) and with `False` (sent at once, tuned
   for latency).
3. Real agents (`python -m cronmesh agent --server`, default timings):
   `POST /v1/jobs` latency and throughput against the leader (HTTP +
   forwarding-free propose + apply of a real `set_job`), then failover:
   `kill -9` the leader and time until a survivor answers a `POST /v1/jobs`
   with 201; the killed server is restarted between rounds.

`--no-fsync-too` adds a diagnostic run of part 1 with LMDB's fsync off;
`--rounds N` repeats parts 1-2 (interleaved) and prints medians. Data dirs
go to a temp dir under /var/tmp (on disk, not tmpfs) unless `--dir`.

    .venv/bin/pip install pysyncobj          # not a project dependency
    .venv/bin/python scripts/bench/raft.py
    .venv/bin/python scripts/bench/raft.py --rounds 3 --no-fsync-too --json
    .venv/bin/python scripts/bench/raft.py --seconds 5 --failovers 3

The workers talk to this process over stdin/stdout, one JSON object a line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
RUNS = itertools.count()
LATENCY_SECONDS = 20.0  # a latency run stops after --count samples or this
PIP_HINT = f"{sys.executable} -m pip install pysyncobj"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary_ms(samples: list[float]) -> dict[str, float]:
    """p50/p99/max of samples in seconds, as milliseconds."""
    return {
        "p50_ms": round(percentile(samples, 0.50) * 1000, 3),
        "p99_ms": round(percentile(samples, 0.99) * 1000, 3),
        "max_ms": round(max(samples, default=float("nan")) * 1000, 3),
        "n": len(samples),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- the workers (run with --worker)


def noop_payload(size: int) -> bytes:
    from cronmesh.core.fsm import encode_command

    base = len(encode_command("noop", pad=""))
    return encode_command("noop", pad="x" * max(size - base, 0))


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def cronmesh_worker(args: argparse.Namespace) -> None:
    from cronmesh.cluster import Cluster
    from cronmesh.core.fsm import StateMachine
    from cronmesh.raft.driver import RaftSettings
    from cronmesh.storage.env import DataDir
    from cronmesh.storage.state import StateStore

    peers = dict(p.split("=", 1) for p in args.peers.split(",") if p)
    if args.no_fsync:
        # Diagnostic only: LMDB without fsync, to see what the disk costs.
        import lmdb

        lmdb_open = lmdb.open
        lmdb.open = lambda *a, **k: lmdb_open(*a, **{**k, "sync": False})
    data = DataDir(args.data_dir)
    if args.no_fsync:
        # DataDir.write fsyncs LMDB's meta page itself (env.sync, which
        # sync=False does not stop); inside unsynced() it leaves that out,
        # and flush (the driver's tick) must not do it either.
        contextlib.ExitStack().enter_context(data.unsynced())
        data.flush = lambda: None  # type: ignore[method-assign]
    fsm = StateMachine(StateStore(data))
    cluster = Cluster(
        args.name,
        data,
        fsm,
        (HOST, args.rpc_port),
        lambda: peers,
        bootstrap_expect=len(peers) + 1,
        settings=RaftSettings(tick=0.05),  # the agent's default
    )
    # Instrumentation only: how many entries each fsync'd persist carries.
    stats = {"persists": 0, "applies": 0}
    persist, apply_batch = cluster.storage.persist, fsm.apply_batch

    def counted_persist(ready: Any, committer: Any = None) -> None:
        if ready.must_sync():
            stats["persists"] += 1
        persist(ready, committer)

    def counted_apply(entries: list[tuple[int, bytes]]) -> Any:
        stats["applies"] += 1
        return apply_batch(entries)

    cluster.storage.persist = counted_persist  # type: ignore[method-assign]
    fsm.apply_batch = counted_apply  # type: ignore[method-assign]
    driver = cluster.driver
    await cluster.start()
    reply({"ready": True})
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "quit":
                reply({"ok": True})
                return
            if op == "status":
                reply(
                    {
                        "leader": driver.is_leader(),
                        "leader_name": driver.leader,
                        "term": driver.term,
                    }
                )
                continue
            payload = noop_payload(cmd["payload"])
            before = dict(stats)
            if op == "latency":
                result = await cronmesh_latency(driver, payload, cmd["count"])
            else:
                result = await cronmesh_throughput(
                    driver, payload, cmd["concurrency"], cmd["seconds"]
                )
            result["payload_bytes"] = len(payload)
            result["fsyncd_persists"] = stats["persists"] - before["persists"]
            result["apply_batches"] = stats["applies"] - before["applies"]
            reply(result)
    finally:
        await cluster.stop(transfer=False)
        data.close()


async def cronmesh_latency(driver: Any, payload: bytes, count: int) -> dict[str, Any]:
    for _ in range(min(count // 10, 50)):  # warm-up
        await driver.propose(payload)
    samples: list[float] = []
    errors = 0
    stop = time.perf_counter() + LATENCY_SECONDS
    for _ in range(count):
        start = time.perf_counter()
        if start > stop:
            break
        try:
            result = await driver.propose(payload)
        except Exception:
            errors += 1
            continue
        if result.code and result.code >= 400:
            errors += 1
            continue
        samples.append(time.perf_counter() - start)
    return {"samples": samples, "errors": errors}


async def cronmesh_throughput(
    driver: Any, payload: bytes, concurrency: int, seconds: float
) -> dict[str, Any]:
    samples: list[float] = []
    errors = 0
    deadline = 0.0

    async def proposer() -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                await driver.propose(payload)
            except Exception:
                errors += 1
                await asyncio.sleep(0.01)
                continue
            samples.append(time.perf_counter() - start)

    deadline = time.perf_counter() + min(1.0, seconds / 5)  # warm-up
    await asyncio.gather(*(proposer() for _ in range(concurrency)))
    samples.clear()
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(proposer() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "commits": len(samples),
        "elapsed": elapsed,
        "samples": samples,
        "errors": errors,
    }


def pysyncobj_worker(args: argparse.Namespace) -> None:
    from pysyncobj import SyncObj, SyncObjConf, replicated

    class Store(SyncObj):  # type: ignore[misc]
        def __init__(self, me: str, others: list[str], conf: Any) -> None:
            super().__init__(me, others, conf)
            self.count = 0
            self.last = b""

        @replicated  # type: ignore[misc]
        def put(self, value: bytes) -> int:
            self.count += 1
            self.last = value
            return self.count

    conf = SyncObjConf(
        appendEntriesUseBatch=bool(args.batch), dynamicMembershipChange=False
    )
    obj = Store(args.me, [p for p in args.peers.split(",") if p], conf)
    reply({"ready": True})
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "quit":
                reply({"ok": True})
                return
            if op == "status":
                leader = obj._getLeader()
                reply(
                    {
                        "leader": bool(obj._isLeader()),
                        "leader_name": str(leader) if leader is not None else None,
                        "term": obj.raftCurrentTerm,
                    }
                )
                continue
            payload = b"x" * cmd["payload"]
            if op == "latency":
                result = pysyncobj_latency(obj, payload, cmd["count"])
            else:
                result = pysyncobj_throughput(
                    obj, payload, cmd["concurrency"], cmd["seconds"]
                )
            result["payload_bytes"] = len(payload)
            reply(result)
    finally:
        obj.destroy()


def pysyncobj_latency(obj: Any, payload: bytes, count: int) -> dict[str, Any]:
    for _ in range(min(count // 10, 50)):
        obj.put(payload, sync=True, timeout=5)
    samples: list[float] = []
    errors = 0
    stop = time.perf_counter() + LATENCY_SECONDS
    for _ in range(count):
        start = time.perf_counter()
        if start > stop:
            break
        try:
            obj.put(payload, sync=True, timeout=5)
        except Exception:
            errors += 1
            continue
        samples.append(time.perf_counter() - start)
    return {"samples": samples, "errors": errors}


def pysyncobj_throughput(
    obj: Any, payload: bytes, concurrency: int, seconds: float
) -> dict[str, Any]:
    lock = threading.Lock()
    done = threading.Event()
    state = {"deadline": 0.0, "inflight": 0, "errors": 0, "counting": False}
    samples: list[float] = []

    def issue() -> None:
        start = time.perf_counter()

        def callback(result: Any, error: int) -> None:
            now = time.perf_counter()
            with lock:
                if error:
                    state["errors"] += 1
                elif state["counting"]:
                    samples.append(now - start)
                if now >= state["deadline"]:
                    state["inflight"] -= 1
                    if state["inflight"] == 0:
                        done.set()
                    return
            issue()

        obj.put(payload, callback=callback)

    for counting, length in ((False, min(1.0, seconds / 5)), (True, seconds)):
        done.clear()
        with lock:
            state["counting"] = counting
            state["inflight"] = concurrency
            begin = time.perf_counter()
            state["deadline"] = begin + length
        for _ in range(concurrency):
            issue()
        done.wait(length + 30)
    elapsed = time.perf_counter() - begin
    return {
        "commits": len(samples),
        "elapsed": elapsed,
        "samples": list(samples),
        "errors": state["errors"],
    }


# -- the controller


class Worker:
    """A worker process spoken to with JSON lines."""

    def __init__(self, cmd: list[str], log_path: Path) -> None:
        self.log = log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=REPO,
        )
        self.buffer = b""

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def receive(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"worker silent for {timeout} s: {self.proc.args}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"worker exited: {self.proc.args}")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return dict(json.loads(line))

    def ask(self, obj: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        self.send(obj)
        return self.receive(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.ask({"op": "quit"}, timeout=10)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def find_leader(workers: list[Worker], timeout: float = 30) -> Worker:
    """The one worker that leads, once every worker knows a leader."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [w.ask({"op": "status"}) for w in workers]
        leaders = [w for w, s in zip(workers, states, strict=True) if s["leader"]]
        if len(leaders) == 1 and all(s["leader_name"] for s in states):
            return leaders[0]
        time.sleep(0.1)
    raise RuntimeError("no leader elected")


def run_workers(
    label: str, cmds: list[list[str]], tmp: Path, args: argparse.Namespace
) -> dict[str, Any]:
    workers: list[Worker] = []
    run = next(RUNS)
    try:
        for i, cmd in enumerate(cmds):
            log = tmp / f"{label.split()[0]}-{run}-{i}.log"
            workers.append(Worker(cmd, log))
        for worker in workers:
            worker.receive(timeout=60)
        leader = find_leader(workers)
        time.sleep(1.0)  # let the followers' connections settle
        lat = leader.ask(
            {"op": "latency", "count": args.count, "payload": args.payload},
            timeout=LATENCY_SECONDS + 60,
        )
        thr = leader.ask(
            {
                "op": "throughput",
                "concurrency": args.concurrency,
                "seconds": args.seconds,
                "payload": args.payload,
            },
            timeout=args.seconds + 120,
        )
    finally:
        for worker in workers:
            worker.stop()
    result = {
        "name": label,
        "payload_bytes": lat["payload_bytes"],
        "latency": summary_ms(lat["samples"]) | {"errors": lat["errors"]},
        "commits_per_s": round(thr["commits"] / thr["elapsed"], 1),
        "concurrency": args.concurrency,
        "loaded_latency": summary_ms(thr["samples"]) | {"errors": thr["errors"]},
    }
    for key in ("fsyncd_persists", "apply_batches"):
        if key in thr:
            result[f"entries_per_{key}"] = round(thr["commits"] / max(thr[key], 1), 1)
    return result


def bench_cronmesh(
    tmp: Path, args: argparse.Namespace, fsync: bool = True
) -> dict[str, Any]:
    names = ["s1", "s2", "s3"]
    ports = {n: free_port() for n in names}
    cmds = []
    for name in names:
        peers = ",".join(f"{p}={HOST}:{ports[p]}" for p in names if p != name)
        cmds.append(
            [
                sys.executable,
                __file__,
                "--worker",
                "cronmesh",
                "--name",
                name,
                "--data-dir",
                str(tmp / f"raft-{name}-{'sync' if fsync else 'nosync'}"),
                "--rpc-port",
                str(ports[name]),
                "--peers",
                peers,
                *([] if fsync else ["--no-fsync"]),
            ]
        )
    if fsync:
        return run_workers("cronmesh raft (fsync on)", cmds, tmp, args)
    return run_workers("cronmesh raft (fsync OFF, diagnostic)", cmds, tmp, args)


def bench_pysyncobj(tmp: Path, args: argparse.Namespace, batch: bool) -> dict[str, Any]:
    addrs = [f"{HOST}:{free_port()}" for _ in range(3)]
    cmds = [
        [
            sys.executable,
            __file__,
            "--worker",
            "pysyncobj",
            "--me",
            me,
            "--peers",
            ",".join(a for a in addrs if a != me),
            "--batch",
            "1" if batch else "0",
        ]
        for me in addrs
    ]
    label = f"PySyncObj (no fsync, appendEntriesUseBatch={batch})"
    return run_workers(label, cmds, tmp, args)


def disk_commit_latency(tmp: Path, count: int = 300) -> dict[str, float]:
    """One LMDB write transaction with fsync, ~200 B each, one at a time."""
    from cronmesh.storage.env import DataDir

    data = DataDir(tmp / "disk-probe")
    try:
        table = data.db("probe")
        samples = []
        for i in range(count):
            start = time.perf_counter()
            data.write(lambda txn, i=i: txn.put(b"%08d" % i, b"x" * 200, db=table))
            samples.append(time.perf_counter() - start)
    finally:
        data.close()
    return summary_ms(samples)


# -- real agents: HTTP writes and failover


class Agent:
    def __init__(self, name: str, tmp: Path) -> None:
        self.name = name
        self.data_dir = tmp / f"agent-{name}"
        self.http_port, self.rpc_port, self.gossip_port = (
            free_port(),
            free_port(),
            free_port(),
        )
        self.url = f"http://{HOST}:{self.http_port}"
        self.log_path = tmp / f"agent-{name}.log"
        self.join: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "cronmesh",
            "agent",
            "--server",
            "--bootstrap-expect",
            "3",
            "--node-name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--http-addr",
            f"{HOST}:{self.http_port}",
            "--bind-addr",
            f"{HOST}:{self.gossip_port}",
            "--rpc-port",
            str(self.rpc_port),
            "--profile",
            "local",
            "--retry-interval",
            "0.5",
        ]
        for addr in self.join:
            cmd += ["--retry-join", addr]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=REPO)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def job(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "schedule": "@manually",
        "executor": "shell",
        "executor_config": {"command": "true"},
    }


def wait_for(what: str, check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def agent_leader(agents: list[Agent], timeout: float = 30) -> Agent:
    import httpx

    found: list[Agent] = []

    def check() -> bool:
        found.clear()
        for agent in agents:
            if not agent.alive():
                continue
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(agent.url + "/v1/isleader", timeout=1).status_code == 200:
                    found.append(agent)
        return len(found) == 1

    wait_for("an agent leader", check, timeout)
    return found[0]


class RawHttp:
    """One keep-alive HTTP/1.1 connection, as cheap a client as can be.

    httpx's pool costs more CPU per request than the agent does at 64
    connections on this machine, so the load generator uses this instead.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        headers = await self.reader.readuntil(b"\r\n\r\n")
        lines = headers.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-length":
                length = int(value)
            elif key.strip().lower() == "transfer-encoding":
                raise RuntimeError("chunked replies are not supported here")
        await self.reader.readexactly(length)
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()


async def http_bench(leader: Agent, args: argparse.Namespace) -> dict[str, Any]:
    seq = 0

    async def post(conn: RawHttp) -> float:
        nonlocal seq
        seq += 1
        body = json.dumps(job(f"bench-{seq}")).encode()
        start = time.perf_counter()
        status = await asyncio.wait_for(conn.post("/v1/jobs", body), 30)
        if status != 201:
            raise RuntimeError(f"POST /v1/jobs {status}")
        return time.perf_counter() - start

    conns = [RawHttp(leader.http_port) for _ in range(args.concurrency)]
    try:
        for _ in range(20):
            await post(conns[0])
        single = [await post(conns[0]) for _ in range(args.http_count)]
        samples: list[float] = []
        deadline = time.perf_counter() + args.http_seconds

        async def client(conn: RawHttp) -> None:
            while time.perf_counter() < deadline:
                samples.append(await post(conn))

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in conns))
        elapsed = time.perf_counter() - start
    finally:
        for conn in conns:
            await conn.close()
    return {
        "name": "cronmesh agents, POST /v1/jobs on the leader (HTTP, set_job)",
        "payload_bytes": len(json.dumps(job("bench-1000"))),
        "latency": summary_ms(single),
        "commits_per_s": round(len(samples) / elapsed, 1),
        "concurrency": args.concurrency,
        "loaded_latency": summary_ms(samples),
    }


async def first_write(survivors: list[Agent], start: float, limit: float) -> float:
    """Seconds from `start` until one of `survivors` answers a write with 201."""
    import httpx

    won = asyncio.Event()
    took: list[float] = []

    async def poll(agent: Agent) -> None:
        async with httpx.AsyncClient(base_url=agent.url, timeout=0.5) as c:
            n = 0
            while not won.is_set() and time.monotonic() - start < limit:
                n += 1
                with contextlib.suppress(httpx.HTTPError):
                    r = await c.post("/v1/jobs", json=job(f"fo-{agent.name}-{n}"))
                    if r.status_code == 201:
                        took.append(time.monotonic() - start)
                        won.set()
                        return
                await asyncio.sleep(0.02)

    await asyncio.gather(*(poll(a) for a in survivors))
    if not took:
        raise RuntimeError(f"no survivor took a write within {limit} s")
    return min(took)


def bench_agents(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    agents = [Agent(f"s{i}", tmp) for i in (1, 2, 3)]
    for agent in agents:
        agent.join = [f"{HOST}:{a.gossip_port}" for a in agents if a is not agent]
    out: dict[str, Any] = {}
    try:
        for agent in agents:
            agent.start()
        leader = agent_leader(agents, timeout=60)
        wait_for(
            "every agent to know the leader",
            lambda: all(
                httpx.get(a.url + "/v1/leader", timeout=1).status_code == 200
                for a in agents
            ),
            30,
        )
        if args.http_seconds > 0:
            out["http"] = asyncio.run(http_bench(leader, args))
        times = []
        for _ in range(args.failovers):
            leader = agent_leader(agents)
            time.sleep(1.0)  # a steady cluster before each kill
            survivors = [a for a in agents if a is not leader]
            leader.kill9()
            start = time.monotonic()
            times.append(asyncio.run(first_write(survivors, start, 30.0)))
            leader.start()
            wait_for(
                f"{leader.name} back",
                lambda a=leader: (
                    httpx.get(a.url + "/v1/leader", timeout=1).status_code == 200
                ),
                60,
            )
        if times:
            out["failover"] = {
                "runs_s": [round(t, 3) for t in times],
                "p50_s": round(percentile(times, 0.5), 3),
                "max_s": round(max(times), 3),
            }
    finally:
        for agent in agents:
            agent.stop()
    return out


# -- output


def table(results: dict[str, Any]) -> str:
    rows = [
        (
            "system",
            "payload B",
            "commits/s",
            "1-proposer p50/p99 ms",
            "loaded p50/p99 ms",
        )
    ]
    for r in results["raft"]:
        rows.append(
            (
                r["name"] + (f" [round {r['round']}]" if "round" in r else ""),
                str(r.get("payload_bytes", "-")),
                f"{r['commits_per_s']:.0f} ({r['concurrency']} conc.)",
                f"{r['latency']['p50_ms']:.2f} / {r['latency']['p99_ms']:.2f}",
                f"{r['loaded_latency']['p50_ms']:.1f} / "
                f"{r['loaded_latency']['p99_ms']:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    names = list(dict.fromkeys(r["name"] for r in results["raft"] if "round" in r))
    for name in names if results.get("rounds", 1) > 1 else ():
        runs = [r for r in results["raft"] if r["name"] == name and "round" in r]
        rate = [r["commits_per_s"] for r in runs]
        p50 = [r["latency"]["p50_ms"] for r in runs]
        lines.append(
            f"median of {len(runs)} rounds, {name}: {statistics.median(rate):.0f} "
            f"commits/s ({min(rate):.0f}-{max(rate):.0f}), 1-proposer p50 "
            f"{statistics.median(p50):.2f} ms ({min(p50):.2f}-{max(p50):.2f})"
        )
    for r in results["raft"]:
        if "entries_per_fsyncd_persists" in r:
            lines.append(
                f"{r['name']} [round {r.get('round', 1)}]: under load "
                f"{r['entries_per_fsyncd_persists']} entries "
                f"per fsync'd log persist, {r['entries_per_apply_batches']} per apply"
            )
    disk = results["lmdb_commit"]
    lines.append(
        f"disk: one LMDB commit with fsync, alone: p50 {disk['p50_ms']:.2f} ms, "
        f"p99 {disk['p99_ms']:.2f} ms"
    )
    fo = results.get("failover")
    if fo:
        lines.append(
            f"failover (kill -9 leader -> write accepted): p50 {fo['p50_s']} s, "
            f"max {fo['max_s']} s, runs {fo['runs_s']}"
        )
    lines.append(
        f"load average before/after: {results['load_before']} / {results['load_after']}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="throughput run")
    parser.add_argument("--count", type=int, default=2000, help="latency samples")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--payload", type=int, default=200, help="bytes a command")
    parser.add_argument("--failovers", type=int, default=5)
    parser.add_argument("--http-seconds", type=float, default=5.0)
    parser.add_argument("--http-count", type=int, default=300)
    parser.add_argument("--skip-raft", action="store_true", help="agents only")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat the Raft comparison"
    )
    parser.add_argument("--skip-pysyncobj", action="store_true")
    parser.add_argument("--skip-agents", action="store_true")
    parser.add_argument(
        "--no-fsync-too",
        action="store_true",
        help="also run cronmesh with LMDB's fsync off (a diagnostic)",
    )
    parser.add_argument("--dir", help="where data dirs go (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    # internal: run one worker
    parser.add_argument("--worker", choices=["cronmesh", "pysyncobj"])
    parser.add_argument("--name")
    parser.add_argument("--me")
    parser.add_argument("--peers", default="")
    parser.add_argument("--data-dir")
    parser.add_argument("--rpc-port", type=int)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-fsync", action="store_true")
    args = parser.parse_args()

    if args.worker:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        if args.worker == "cronmesh":
            asyncio.run(cronmesh_worker(args))
        else:
            pysyncobj_worker(args)
        return

    have_pysyncobj = True
    try:
        import pysyncobj  # noqa: F401
    except ImportError:
        have_pysyncobj = False
        if not args.skip_pysyncobj:
            sys.exit(f"PySyncObj is not installed; run: {PIP_HINT}")

    tmp = Path(args.dir or tempfile.mkdtemp(prefix="bench-raft-", dir="/var/tmp"))
    tmp.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_before": load_average(),
        "cpus": os.cpu_count(),
        "data_dir": str(tmp),
        "rounds": args.rounds,
        "argv": sys.argv[1:],
        "raft": [],
    }
    try:
        results["lmdb_commit"] = disk_commit_latency(tmp)
        for k in range(1, args.rounds + 1) if not args.skip_raft else ():
            rtmp = tmp / f"round-{k}"
            rtmp.mkdir()
            runs = [bench_cronmesh(rtmp, args)]
            if args.no_fsync_too:
                runs.append(bench_cronmesh(rtmp, args, fsync=False))
            if have_pysyncobj and not args.skip_pysyncobj:
                for batch in (True, False):
                    runs.append(bench_pysyncobj(rtmp, args, batch))
            for run in runs:
                run["round"] = k
            results["raft"] += runs
        if not args.skip_agents:
            agents = bench_agents(tmp, args)
            if "http" in agents:
                results["raft"].append(agents["http"])
            results["failover"] = agents.get("failover")
    finally:
        results["load_after"] = load_average()
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(table(results))


if __name__ == "__main__":
    main()
