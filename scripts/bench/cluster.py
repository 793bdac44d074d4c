"""Benchmark: a 3-server, 2-agent cluster on this machine (all on loopback).

Three phases, each on a fresh cluster (servers s1-s3 on 127.0.0.1-3, agents
w1, w2 on 127.0.0.4-5, fsync on, `--max-executions` raised so nothing is
trimmed):

1. **lag**: `--jobs` jobs `@every 1s` spread over the two agents (half
   tagged `id: w1`, half `id: w2`), created in one `/v1/restore` request,
   run for `--duration` seconds. Each job runs `/bin/date +%s.%N` directly,
   so its output is the instant the process really ran on the agent; the fire
   lag is that instant minus the scheduled instant: schedule, commit of the
   run record through Raft, gRPC hand-over, outbox write and process start.
   Missed fires are (job, instant) pairs of the measured window without an
   execution, doubled ones with more than one.
2. **saturation**: `--sat-jobs` jobs `@every 1s` over both agents for
   `--sat-duration` seconds; executions committed (finished and recorded)
   per second, read from the finish times of the committed records.
3. **failover**: 20 jobs `@every 1s`; `kill -9` of the leader; the time
   until the first execution scheduled by the new leader has started
   (its committed start), repeated `--kills` times on fresh clusters.

After each phase the cluster is stopped and the executions are read from
the data dir of the server with the highest applied index.

    .venv/bin/python scripts/bench/cluster.py                  # 200 jobs, 300 s
    .venv/bin/python scripts/bench/cluster.py --duration 60 --kills 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from schedule import percentile  # the sibling bench's; this directory is on sys.path

from cronmesh.errors import StorageError
from cronmesh.storage.env import DataDir
from cronmesh.storage.state import StateStore

SERVERS = (("s1", "127.0.0.1"), ("s2", "127.0.0.2"), ("s3", "127.0.0.3"))
AGENTS = (("w1", "127.0.0.4"), ("w2", "127.0.0.5"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Node:
    def __init__(self, base: Path, name: str, host: str, server: bool) -> None:
        self.name = name
        self.host = host
        self.server = server
        self.data_dir = base / name
        self.http_port = free_port()
        self.gossip = f"{host}:{free_port(host)}"
        self.rpc_port = free_port(host)
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{self.http_port}", timeout=60
        )

    def start(self, seed: str) -> None:
        cmd = [
            sys.executable,
            "-m",
            "cronmesh",
            "agent",
            "--node-name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--http-addr",
            f"127.0.0.1:{self.http_port}",
            "--bind-addr",
            self.gossip,
            "--rpc-port",
            str(self.rpc_port),
            "--log-level",
            "warning",
            "--shutdown-grace",
            "5",
            "--max-executions",
            "100000",
        ]
        if self.server:
            cmd += ["--server", "--bootstrap-expect", "3"]
        else:
            cmd += ["--tag", f"id={self.name}", "--tag", "role=worker"]
        if seed != self.gossip:
            cmd += ["--retry-join", seed, "--retry-interval", "0.5"]
        log = (self.data_dir.parent / f"{self.name}.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
        if self.proc is not None:
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # never outlive the bench
                self.proc.wait()


def start_cluster(base: Path) -> list[Node]:
    nodes = [Node(base, n, h, True) for n, h in SERVERS] + [
        Node(base, n, h, False) for n, h in AGENTS
    ]
    seed = nodes[0].gossip
    for node in nodes:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        node.start(seed)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            members = nodes[0].http.get("/v1/members").json()
            if (
                sum(m["statusText"] == "alive" for m in members) == 5
                and leader(nodes) is not None
            ):
                return nodes
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise SystemExit("the cluster did not form within 90 s")


def leader(nodes: list[Node]) -> Node | None:
    for node in nodes:
        if node.server and node.alive():
            try:
                if node.http.get("/v1/isleader", timeout=2).status_code == 200:
                    return node
            except httpx.HTTPError:
                pass
    return None


def stop_cluster(nodes: list[Node]) -> None:
    for node in reversed(nodes):
        if node.alive():
            assert node.proc is not None
            node.proc.send_signal(signal.SIGTERM)
    for node in nodes:
        node.stop()


def open_freshest(nodes: list[Node]) -> tuple[DataDir, StateStore]:
    best: tuple[int, DataDir, StateStore] | None = None
    for node in nodes:
        if not node.server:
            continue
        for _ in range(300):
            try:
                data = DataDir(node.data_dir)
                break
            except StorageError:
                time.sleep(0.1)
        else:
            continue
        store = StateStore(data)
        applied = store.applied_index()
        if best is None or applied > best[0]:
            if best is not None:
                best[1].close()
            best = (applied, data, store)
        else:
            data.close()
    assert best is not None
    return best[1], best[2]


def create_jobs(node: Node, count: int, prefix: str) -> float:
    backup = {
        "jobs": [
            {
                "name": f"{prefix}-{i:05d}",
                "schedule": "@every 1s",
                "executor": "shell",
                "executor_config": {"command": "/bin/date +%s.%N"},
                "tags": {"id": AGENTS[i % 2][0]},
            }
            for i in range(count)
        ]
    }
    response = node.http.post(
        "/v1/restore", files={"file": ("jobs.json", json.dumps(backup))}
    )
    response.raise_for_status()
    return time.time()


def _ran_at(output: str) -> float:
    try:
        return float(output.strip().splitlines()[0])
    except (ValueError, IndexError):
        return float("nan")


def phase_lag(jobs: int, duration: float, warmup: float, tail: float) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="cronmesh-bench-cluster-"))
    nodes = start_cluster(base)
    try:
        lead = leader(nodes)
        assert lead is not None
        created = create_jobs(lead, jobs, "lag")
        time.sleep(duration)
        stopping = time.time()
    finally:
        stop_cluster(nodes)
    first, last = math.ceil(created + warmup), math.floor(stopping - tail)
    instants = range(first, last + 1)
    data, store = open_freshest(nodes)
    lags: list[float] = []
    missed = doubled = unfinished = unparsed = 0
    per_node: Counter[str] = Counter()
    for i in range(jobs):
        runs = [
            r
            for r in store.executions(f"lag-{i:05d}")
            if r.scheduled_at is not None
            and first <= r.scheduled_at.timestamp() <= last
        ]
        seen = Counter(int(r.scheduled_at.timestamp()) for r in runs)  # type: ignore[union-attr]
        doubled += sum(n - 1 for n in seen.values() if n > 1)
        missed += sum(1 for t in instants if t not in seen)
        for run in runs:
            per_node[run.node_name] += 1
            if not run.finished_at:
                unfinished += 1
                continue
            ran = _ran_at(run.output)
            if math.isnan(ran):
                unparsed += 1
                continue
            lags.append(ran - run.scheduled_at.timestamp())  # type: ignore[union-attr]
    data.close()
    return {
        "jobs": jobs,
        "window_s": len(instants),
        "executions": sum(per_node.values()),
        "per_node": dict(per_node),
        "lag_ms_p50": round(percentile(lags, 0.50) * 1e3, 1),
        "lag_ms_p99": round(percentile(lags, 0.99) * 1e3, 1),
        "lag_ms_max": round(max(lags, default=float("nan")) * 1e3, 1),
        "lag_ms_mean": round(statistics.fmean(lags) * 1e3, 1) if lags else None,
        "missed": missed,
        "doubled": doubled,
        "unfinished": unfinished,
        "unparsed_outputs": unparsed,
        "load_after": os.getloadavg()[0],
    }


def phase_saturation(jobs: int, duration: float) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="cronmesh-bench-cluster-"))
    nodes = start_cluster(base)
    try:
        lead = leader(nodes)
        assert lead is not None
        created = create_jobs(lead, jobs, "sat")
        time.sleep(duration)
        stopping = time.time()
        health = _overload_figures(nodes)
    finally:
        stop_cluster(nodes)
    # Steady state only: skip the first 5 s and the last 2 s.
    first, last = created + 5, stopping - 2
    data, store = open_freshest(nodes)
    finished = 0
    fired = 0
    for i in range(jobs):
        for run in store.executions(f"sat-{i:05d}", with_output=False):
            if (
                run.scheduled_at is not None
                and first <= run.scheduled_at.timestamp() < last
            ):
                fired += 1
            if (
                run.finished_at is not None
                and first <= run.finished_at.timestamp() < last
            ):
                finished += 1
    data.close()
    seconds = last - first
    return {
        "jobs": jobs,
        "window_s": round(seconds, 1),
        "committed_per_s": round(finished / seconds, 1),
        "offered_per_s": jobs,
        "fires_recorded_per_s": round(fired / seconds, 1),
        **health,
        "load_after": os.getloadavg()[0],
    }


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def _overload_figures(nodes: list[Node]) -> dict[str, Any]:
    """Leader changes during the phase, and what the leader shed."""
    changes = 0.0
    shed = 0.0
    for node in nodes:
        if not node.server or not node.alive():
            continue
        try:
            text = node.http.get("/metrics", timeout=10).text
        except httpx.HTTPError:
            continue
        # Each server counts every election it saw won; the first is the
        # cluster forming.
        changes = max(changes, _metric(text, "cronmesh_raft_leader_changes_total") - 1)
        shed += _metric(text, "cronmesh_scheduler_shed_fires")
    return {"leader_changes": int(changes), "fires_shed": int(shed)}


def phase_failover(kills: int) -> dict[str, Any]:
    times: list[float] = []
    for _ in range(kills):
        base = Path(tempfile.mkdtemp(prefix="cronmesh-bench-cluster-"))
        nodes = start_cluster(base)
        try:
            lead = leader(nodes)
            assert lead is not None
            create_jobs(lead, 20, "fo")
            time.sleep(5)
            assert lead.proc is not None
            killed = time.time()
            lead.proc.send_signal(signal.SIGKILL)
            lead.proc.wait()
            found = None
            deadline = time.monotonic() + 60
            while found is None and time.monotonic() < deadline:
                new = leader([n for n in nodes if n is not lead])
                if new is not None:
                    try:
                        runs = new.http.get("/v1/jobs/fo-00000/executions").json()
                    except (httpx.HTTPError, ValueError):
                        runs = []
                    started = [
                        r["started_at"]
                        for r in runs
                        if r["started_at"] and _ts(r["started_at"]) > killed
                    ]
                    if started:
                        found = min(_ts(s) for s in started) - killed
                time.sleep(0.05)
            if found is not None:
                times.append(found)
        finally:
            stop_cluster(nodes)
    return {
        "kills": kills,
        "first_fire_after_kill_s": [round(t, 2) for t in times],
        "p50_s": round(statistics.median(times), 2) if times else None,
    }


def _ts(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--tail", type=float, default=3.0)
    parser.add_argument("--sat-jobs", type=int, default=1000)
    parser.add_argument("--sat-duration", type=float, default=30.0)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument(
        "--phases", default="lag,saturation,failover", help="comma-separated"
    )
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    results: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    if "lag" in phases:
        results["lag"] = phase_lag(args.jobs, args.duration, args.warmup, args.tail)
        print(json.dumps({"lag": results["lag"]}), flush=True)
    if "saturation" in phases:
        results["saturation"] = phase_saturation(args.sat_jobs, args.sat_duration)
        print(json.dumps({"saturation": results["saturation"]}), flush=True)
    if "failover" in phases:
        results["failover"] = phase_failover(args.kills)
        print(json.dumps({"failover": results["failover"]}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
