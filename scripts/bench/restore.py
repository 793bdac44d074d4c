"""Benchmark: restore and back up thousands of jobs on 3 servers on loopback.

Starts three `cronmesh agent --server` processes (127.0.0.1, free ports,
default timings), builds a backup document of `--jobs` jobs with
`--executions` finished executions each (`--output` bytes of output), and:

1. posts it to `POST /v1/restore` on a follower: the time until the answer
   (check in a thread, parts staged through Raft, the one `restore` command
   applied), then until every server has the last job;
2. reads it back with `GET /v1/backup?executions=true` from another
   follower: time and size;
3. says whether the leader stayed the leader throughout (a restore holds
   every server's loop while it applies, see docs/benchmarks.md).

    .venv/bin/python scripts/bench/restore.py
    .venv/bin/python scripts/bench/restore.py --jobs 20000 --executions 5 --json
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, name: str, root: Path, join: str | None) -> None:
        self.name = name
        self.http_port, self.gossip_port = free_port(), free_port()
        self.gossip = f"127.0.0.1:{self.gossip_port}"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.http = httpx.Client(base_url=self.url, timeout=600)
        cmd = [
            sys.executable, "-m", "cronmesh", "agent", "--server",
            "--bootstrap-expect", "3", "--node-name", name,
            "--data-dir", str(root / name), "--profile", "local",
            "--http-addr", f"127.0.0.1:{self.http_port}",
            "--bind-addr", self.gossip, "--rpc-port", str(free_port()),
        ]  # fmt: skip
        if join:
            cmd += ["--retry-join", join, "--retry-interval", "0.5"]
        log = (root / f"{name}.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=REPO)

    def leader(self) -> str:
        try:
            response = self.http.get("/v1/leader")
        except httpx.HTTPError:
            return ""
        return str(response.json().get("Name", "")) if response.is_success else ""

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def document(jobs: int, executions: int, output: int) -> dict[str, Any]:
    base = 1_700_000_000_000_000_000
    doc: dict[str, Any] = {"cronmesh_backup": 1, "jobs": [], "executions": {}}
    for i in range(jobs):
        name = f"bench-{i:06d}"
        doc["jobs"].append(
            {
                "name": name,
                "schedule": "@manually",
                "executor": "shell",
                "executor_config": {"command": f"echo {name}"},
                "success_count": executions,
            }
        )
        doc["executions"][name] = [
            {
                "job_name": name,
                "started_at": f"2023-11-14T22:{13 + k // 60:02d}:{k % 60:02d}Z",
                "finished_at": "2023-11-15T00:00:00Z",
                "success": True,
                "node_name": "old",
                "group": base + k,
                "output": "x" * output,
            }
            for k in range(executions)
        ]
    return doc


def wait(what: str, predicate: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--executions", type=int, default=2)
    parser.add_argument("--output", type=int, default=400)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    body = json.dumps(document(args.jobs, args.executions, args.output)).encode()
    with tempfile.TemporaryDirectory(prefix="cm-bench-restore-") as tmp:
        root = Path(tmp)
        first = Server("s1", root, None)
        servers = [first] + [Server(f"s{i}", root, first.gossip) for i in (2, 3)]
        try:
            wait("a leader", lambda: all(s.leader() for s in servers))
            leader = servers[0].leader()
            followers = [s for s in servers if s.name != leader]
            started = time.monotonic()
            response = followers[0].http.post(
                "/v1/restore", files={"file": ("b.json", body)}
            )
            answered = time.monotonic() - started
            if response.status_code != 200:
                for server in servers:
                    print(f"--- {server.name}", file=sys.stderr)
                    text = (root / f"{server.name}.log").read_text(errors="replace")
                    print(text[-3000:], file=sys.stderr)
                raise SystemExit(f"restore failed: {response.text[:500]}")
            last = f"/v1/jobs/bench-{args.jobs - 1:06d}"
            wait(
                "the restore on every server",
                lambda: all(s.http.get(last).status_code == 200 for s in servers),
            )
            everywhere = time.monotonic() - started
            started = time.monotonic()
            backup = followers[-1].http.get("/v1/backup", params={"executions": "1"})
            backup_s = time.monotonic() - started
            if backup.status_code != 200:
                for server in servers:
                    print(f"--- {server.name}", file=sys.stderr)
                    text = (root / f"{server.name}.log").read_text(errors="replace")
                    print(text[-3000:], file=sys.stderr)
                raise SystemExit(f"backup failed: {backup.text[:500]}")
            result = {
                "jobs": args.jobs,
                "executions": args.jobs * args.executions,
                "file_bytes": len(body),
                "restore_answer_s": round(answered, 2),
                "restore_everywhere_s": round(everywhere, 2),
                "backup_s": round(backup_s, 2),
                "backup_bytes": len(backup.content),
                "leader_kept": all(s.leader() == leader for s in servers),
            }
        finally:
            for server in servers:
                server.stop()
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:22} {value}")


if __name__ == "__main__":
    main()
