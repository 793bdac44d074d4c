"""Start a local cronmesh cluster with the example jobs and print executions.

Run through `scripts/demo`, which installs cronmesh first. Three servers
(s1-s3, a Raft group) and one agent without --server (w1, tagged
role=worker) join one gossip mesh on loopback (127.0.0.1-4). The example
jobs target nodes by tags: on every node, on every worker, on one worker,
on the servers. Each node keeps its state in a temporary directory (or
under `--data-dir`); Ctrl-C stops them all.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
console = Console()


def pick_port(preferred: int, host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        try:
            sock.bind((host, preferred))
            return preferred
        except OSError:
            sock.bind((host, 0))
            return int(sock.getsockname()[1])


def load_examples(folder: Path) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        jobs.extend(data if isinstance(data, list) else [data])
    return jobs


def wait_ready(http: httpx.Client, proc: subprocess.Popen[bytes], path: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"an agent exited with code {proc.returncode}")
        try:
            if http.get(path).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    sys.exit("an agent did not answer within 60 s")


def show(execution: dict[str, Any]) -> None:
    status = execution["status"]
    colour = "green" if status == "success" else "red"
    first = (execution.get("output") or "").strip().splitlines()
    line = first[-1] if first else ""
    console.print(
        f"{execution['finished_at'][11:23]} [bold]{execution['job_name']:<9}[/bold] "
        f"on [cyan]{execution['node_name']:<3}[/cyan] "
        f"[{colour}]{status:<7}[/{colour}] attempt={execution['attempt']} "
        f"trigger={execution['trigger']:<9} {line[:60]}",
        highlight=False,
        no_wrap=True,
        overflow="ellipsis",
    )


def follow(http: httpx.Client, proc: subprocess.Popen[bytes]) -> None:
    seen: set[str] = set()
    while proc.poll() is None:
        for job in http.get("/v1/jobs").json():
            response = http.get(
                f"/v1/jobs/{job['name']}/executions", params={"_end": "20"}
            )
            if response.status_code != 200:
                continue
            for execution in reversed(response.json()):
                if execution["finished_at"] and execution["id"] not in seen:
                    seen.add(execution["id"])
                    show(execution)
        time.sleep(0.5)


def agent_cmd(
    name: str, data_dir: str, host: str, http_port: int, *extra: str
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cronmesh",
        "agent",
        "--node-name",
        name,
        "--data-dir",
        data_dir,
        "--http-addr",
        f"127.0.0.1:{http_port}",
        "--bind-addr",
        f"{host}:{pick_port(8946, host)}",
        "--rpc-port",
        str(pick_port(6868, host)),
        "--profile",
        "local",
        "--log-level",
        "warning",
        "--shutdown-grace",
        "5",
        *extra,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8080, help="s1's HTTP port")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--examples", default=str(REPO / "examples"))
    args = parser.parse_args()
    base = Path(args.data_dir or tempfile.mkdtemp(prefix="cronmesh-demo-"))
    # SIGTERM (e.g. from `timeout`) stops the cluster like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # Each node has a loopback address of its own, so all can use the default
    # gossip and RPC ports (others if those are taken); HTTP is on 127.0.0.1.
    nodes = [("s1", "127.0.0.1"), ("s2", "127.0.0.2"), ("s3", "127.0.0.3")]
    ports: dict[str, int] = {}
    procs: list[subprocess.Popen[bytes]] = []
    seed = ""  # s1's gossip address, which the others join
    for name, host in [*nodes, ("w1", "127.0.0.4")]:
        ports[name] = pick_port(args.port + len(ports))
        extra = (
            ["--server", "--bootstrap-expect", "3"]
            if name.startswith("s")
            else ["--tag", "role=worker"]
        )
        if name != "s1":
            extra += ["--retry-join", seed, "--retry-interval", "1"]
        cmd = agent_cmd(name, str(base / name), host, ports[name], *extra)
        if name == "s1":
            seed = cmd[cmd.index("--bind-addr") + 1]
        # A session of its own: Ctrl-C reaches this script, which stops the
        # agents with SIGTERM, the way systemd would.
        procs.append(subprocess.Popen(cmd, start_new_session=True))
    http = httpx.Client(base_url=f"http://127.0.0.1:{ports['s1']}", timeout=10)
    try:
        for (name, _), proc in zip([*nodes, ("w1", "")], procs, strict=True):
            client = httpx.Client(base_url=f"http://127.0.0.1:{ports[name]}")
            wait_ready(client, proc, "/health" if name == "w1" else "/v1/leader")
        for job in load_examples(Path(args.examples)):
            response = http.post("/v1/jobs", json=job)
            if response.status_code >= 300:
                console.print(f"[red]{job['name']}: {response.text}[/red]")
        console.print(
            "cronmesh cluster: servers "
            + ", ".join(f"{n} (http://127.0.0.1:{ports[n]})" for n, _ in nodes)
            + f", agent w1 (http://127.0.0.1:{ports['w1']}, role=worker); "
            f"leader {http.get('/v1/leader').json().get('Name')}; data in {base}"
        )
        console.print(
            "jobs: "
            + ", ".join(
                f"{j['name']} {j['tags'] or '(every node)'}"
                for j in http.get("/v1/jobs").json()
            ),
            highlight=False,
        )
        console.print(
            f"try: .venv/bin/cronmesh members --address 127.0.0.1:{ports['s1']}"
        )
        console.print("executions as they finish (Ctrl-C to stop):")
        follow(http, procs[0])
    except KeyboardInterrupt:
        console.print("stopping the cluster ...")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
        console.print(f"cluster stopped; its data is in {base}")


if __name__ == "__main__":
    main()
