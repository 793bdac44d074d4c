"""Start a local cronmesh node with the example jobs and print executions.

Run through `scripts/demo`, which installs cronmesh first. The node keeps its
state in a temporary directory (or `--data-dir`), listens on loopback, and
stops when you press Ctrl-C.
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


def pick_port(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])


def load_examples(folder: Path) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        jobs.extend(data if isinstance(data, list) else [data])
    return jobs


def wait_ready(http: httpx.Client, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the agent exited with code {proc.returncode}")
        try:
            if http.get("/v1/leader").status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    sys.exit("the agent did not answer within 30 s")


def show(execution: dict[str, Any]) -> None:
    status = execution["status"]
    colour = "green" if status == "success" else "red"
    first = (execution.get("output") or "").strip().splitlines()
    line = first[-1] if first else ""
    console.print(
        f"{execution['finished_at'][11:23]} [bold]{execution['job_name']:<10}[/bold] "
        f"[{colour}]{status:<7}[/{colour}] attempt={execution['attempt']} "
        f"trigger={execution['trigger']:<9} {line[:70]}",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--examples", default=str(REPO / "examples"))
    args = parser.parse_args()
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="cronmesh-demo-")
    port = pick_port(args.port)
    cmd = [
        sys.executable,
        "-m",
        "cronmesh",
        "agent",
        "--server",
        "--node-name",
        "demo",
        "--data-dir",
        data_dir,
        "--http-addr",
        f"127.0.0.1:{port}",
        "--bind-addr",
        f"127.0.0.1:{pick_port(8946)}",
        "--rpc-port",
        str(pick_port(6868)),
        "--log-level",
        "warning",
        "--shutdown-grace",
        "5",
    ]
    # A session of its own: Ctrl-C reaches this script, which stops the
    # agent with SIGTERM, the way systemd would.
    proc = subprocess.Popen(cmd, start_new_session=True)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        wait_ready(http, proc)
        for job in load_examples(Path(args.examples)):
            response = http.post("/v1/jobs", json=job)
            if response.status_code >= 300:
                console.print(f"[red]{job['name']}: {response.text}[/red]")
        console.print(
            f"cronmesh node [bold]demo[/bold] on http://127.0.0.1:{port} "
            f"(data in {data_dir}); jobs: "
            + ", ".join(j["name"] for j in http.get("/v1/jobs").json())
        )
        console.print(f"try: .venv/bin/cronmesh jobs list --address 127.0.0.1:{port}")
        console.print("executions as they finish (Ctrl-C to stop):")
        follow(http, proc)
    except KeyboardInterrupt:
        console.print("stopping the node ...")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
        console.print(f"node stopped; its data is in {data_dir}")


if __name__ == "__main__":
    main()
