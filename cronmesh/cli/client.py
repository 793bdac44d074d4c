"""Client commands: `jobs ...` and `executions`, thin wrappers over /v1."""

from __future__ import annotations

import json
import os
import ssl
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.table import Table

__all__ = [
    "CaCertOpt",
    "Client",
    "JobArg",
    "TokenOpt",
    "check_address",
    "executions",
    "jobs_app",
]

DEFAULT_ADDRESS = "http://127.0.0.1:8080"

jobs_app = typer.Typer(
    help="List, show, apply, run, toggle and delete jobs.", no_args_is_help=True
)

AddressOpt = Annotated[
    str,
    typer.Option(
        "--address",
        envvar="CRONMESH_ADDRESS",
        help="HTTP address of an agent, [http[s]://]host[:port] "
        "(env CRONMESH_ADDRESS).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
TokenOpt = Annotated[
    str,
    typer.Option(
        "--token",
        envvar="CRONMESH_TOKEN",
        help="API token (env CRONMESH_TOKEN; the flag shows in ps, the env not).",
        show_default=False,
    ),
]
CaCertOpt = Annotated[
    str,
    typer.Option(
        "--ca-cert",
        envvar="CRONMESH_CA_CERT",
        help="PEM CA that signed the agent's HTTPS cert (env CRONMESH_CA_CERT).",
    ),
]
JobArg = Annotated[str, typer.Argument(help="Name of the job.")]

out = Console()


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line on stderr and exit with `code`."""
    sys.stderr.write(f"cronmesh: error: {message}\n")
    raise typer.Exit(code)


def check_address(address: str) -> str:
    """The base URL `address` names (http:// added when it has no scheme);
    exit 2 naming --address when it cannot be an agent's HTTP address."""
    url = address.strip() if "://" in address else f"http://{address.strip()}"
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        fail(f"--address: {address!r} is not a valid URL: {exc}", 2)
    if parsed.scheme not in ("http", "https"):
        fail(f"--address: {address!r}: the scheme must be http or https", 2)
    if not parsed.host:
        fail(f"--address: {address!r} names no host", 2)
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        fail(f"--address: {address!r}: port {parsed.port} is not in 1-65535", 2)
    return url.rstrip("/")


class Client:
    """A small synchronous client of an agent's HTTP API.

    `token` and `ca_cert` default to CRONMESH_TOKEN and CRONMESH_CA_CERT, so
    every command honours them even without its own --token/--ca-cert.
    """

    def __init__(self, address: str, token: str = "", ca_cert: str = "") -> None:
        self.address = check_address(address)
        token = (token or os.environ.get("CRONMESH_TOKEN", "")).strip()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify = _verify(ca_cert or os.environ.get("CRONMESH_CA_CERT", ""))
        try:
            self.http = httpx.Client(
                base_url=self.address, timeout=30.0, headers=headers, verify=verify
            )
            self.http.build_request("GET", "/")
        except (httpx.InvalidURL, ValueError) as exc:
            fail(f"--address: {address!r} is not a valid URL: {exc}", 2)

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The answer to a request; exit with the server's message if it said no."""
        return self.check(self.request(method, path, **kwargs))

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The answer to a request, whatever its status; exit 1 when the
        agent cannot be reached."""
        try:
            return self.http.request(method, path, **kwargs)
        except (httpx.InvalidURL, ValueError) as exc:
            fail(f"--address: {self.address!r} is not a valid URL: {exc}", 2)
        except httpx.HTTPError as exc:
            fail(f"cannot reach cronmesh at {self.address}: {exc}")

    def check(self, response: httpx.Response) -> httpx.Response:
        """Exit with the server's message when it said no."""
        if response.status_code >= 400:
            fail(
                f"{_message(response)} (HTTP {response.status_code})",
                2 if response.status_code == 400 else 1,
            )
        return response


def _verify(ca_cert: str) -> ssl.SSLContext | bool:
    """Trust the system's CAs, or only the PEM file `ca_cert`."""
    if not ca_cert:
        return True
    try:
        return ssl.create_default_context(cafile=ca_cert)
    except FileNotFoundError:
        fail(f"--ca-cert: {ca_cert} does not exist", 2)
    except (OSError, ssl.SSLError) as exc:
        fail(f"--ca-cert: {ca_cert} is not a readable PEM certificate: {exc}", 2)


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return json.dumps(body)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _job_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table("Name", "Schedule", "Status", "Disabled", "Success", "Error", "Next")
    for column in table.columns:
        column.overflow = "fold"
    for job in jobs:
        table.add_row(
            job["name"],
            job.get("schedule") or f"after {job.get('parent_job')}",
            job.get("status") or "-",
            "yes" if job.get("disabled") else "no",
            str(job.get("success_count", 0)),
            str(job.get("error_count", 0)),
            job.get("next") or "-",
        )
    return table


@jobs_app.command("list")
def list_jobs(
    address: AddressOpt = DEFAULT_ADDRESS,
    token: TokenOpt = "",
    ca_cert: CaCertOpt = "",
    as_json: JsonOpt = False,
    query: Annotated[str, typer.Option("-q", "--query", help="Name contains.")] = "",
) -> None:
    """List jobs."""
    params = {"q": query} if query else {}
    jobs = Client(address, token, ca_cert).call("GET", "/v1/jobs", params=params).json()
    if as_json:
        print_json(jobs)
    else:
        out.print(_job_table(jobs))


@jobs_app.command("show")
def show(
    job: JobArg,
    address: AddressOpt = DEFAULT_ADDRESS,
    token: TokenOpt = "",
    ca_cert: CaCertOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Show one job."""
    data = Client(address, token, ca_cert).call("GET", f"/v1/jobs/{job}").json()
    if as_json:
        print_json(data)
        return
    table = Table("Field", "Value", show_header=False)
    for key, value in data.items():
        table.add_row(key, value if isinstance(value, str) else json.dumps(value))
    out.print(table)


def _load_jobs(path: Path) -> list[Any]:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}", 2)
    except UnicodeDecodeError as exc:
        fail(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})", 2)
    try:
        data = json.loads(text)
    except ValueError as exc:
        fail(f"{path}: invalid JSON: {exc}", 2)
    except RecursionError:
        fail(f"{path}: JSON nested too deeply", 2)
    return data if isinstance(data, list) else [data]


def _check_jobs(client: Client, path: Path, jobs: list[Any]) -> None:
    """Exit 2 naming every bad job of `jobs` (the server's restore check)."""
    try:
        response = client.http.request(
            "POST",
            "/v1/restore",
            params={"dry_run": "true"},
            files={"file": ("jobs.json", json.dumps(jobs).encode())},
        )
    except httpx.HTTPError as exc:
        fail(f"cannot reach cronmesh at {client.address}: {exc}")
    if response.status_code == 400:
        try:
            rejected = response.json().get("jobs") or []
        except ValueError:
            rejected = []
        problems = "; ".join(
            f"{r.get('name') or '#' + str(r.get('index'))}: {r.get('error')}"
            for r in rejected
            if isinstance(r, dict)
        )
        fail(f"{path}: nothing applied: {problems or _message(response)}", 2)
    client.check(response)


@jobs_app.command("apply")
def apply(
    file: Annotated[
        Path,
        typer.Option("-f", "--file", help="JSON job or list of jobs; - for stdin."),
    ],
    address: AddressOpt = DEFAULT_ADDRESS,
    token: TokenOpt = "",
    ca_cert: CaCertOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Create or update jobs from a JSON file.

    A list is checked whole first (each job, names used once, parents): one
    bad job and nothing is applied.
    """
    client = Client(address, token, ca_cert)
    jobs = _load_jobs(file)
    if len(jobs) > 1:
        _check_jobs(client, file, jobs)
    stored: list[dict[str, Any]] = []
    for job in jobs:
        response = client.request("POST", "/v1/jobs", json=job)
        if response.status_code >= 400 and stored:
            # Limitation: the list is applied job by job, so a job the server
            # refuses after the check (the cluster changed meanwhile) leaves
            # the ones before it applied; say exactly which.
            done = ", ".join(str(j["name"]) for j in stored)
            name = job.get("name") if isinstance(job, dict) else None
            fail(
                f"{name or 'job'}: {_message(response)} (HTTP "
                f"{response.status_code}); applied before it: {done}; "
                f"not applied: {name} and the {len(jobs) - len(stored) - 1} after it",
                2 if response.status_code == 400 else 1,
            )
        stored.append(client.check(response).json())
    if as_json:
        print_json(stored)
    else:
        for job in stored:
            out.print(
                f"applied [bold]{job['name']}[/bold] next={job.get('next') or '-'}"
            )
    for job in stored:
        for warning in job.get("warnings", []):
            sys.stderr.write(f"cronmesh: warning: {job['name']}: {warning}\n")


@jobs_app.command("delete")
def delete(
    job: JobArg,
    address: AddressOpt = DEFAULT_ADDRESS,
    token: TokenOpt = "",
    ca_cert: CaCertOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Delete a job and its executions."""
    data = Client(address, token, ca_cert).call("DELETE", f"/v1/jobs/{job}").json()
    if as_json:
        print_json(data)
    else:
        out.print(f"deleted [bold]{job}[/bold]")


@jobs_app.command("run")
def run(
    job: JobArg,
    address: AddressOpt = DEFAULT_ADDRESS,
    token: TokenOpt = "",
    ca_cert: CaCertOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Run a job now (returns once the run has started)."""
    client = Client(address, token, ca_cert)
    response = client.call("POST", f"/v1/jobs/{job}/run")
    exec_id = response.headers.get("X-Execution-Id", "")
    not_run = response.headers.get("X-Cronmesh-Not-Run", "")
    if not_run:
        # Recorded failed at once: no node matched, or none could be reached.
        fail(f"{job}: not run: {not_run} (execution {exec_id})", 1)
    if as_json:
        print_json({"job": job, "execution_id": exec_id})
    else:
        out.print(f"started [bold]{job}[/bold] execution={exec_id or '-'}")


@jobs_app.command("toggle")
def toggle(
    job: JobArg,
    address: AddressOpt = DEFAULT_ADDRESS,
    token: TokenOpt = "",
    ca_cert: CaCertOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Enable a disabled job, or disable an enabled one."""
    data = Client(address, token, ca_cert).call("POST", f"/v1/jobs/{job}/toggle").json()
    if as_json:
        print_json(data)
    else:
        state = "disabled" if data.get("disabled") else "enabled"
        out.print(f"[bold]{job}[/bold] is now {state}")


def executions(
    job: JobArg,
    address: AddressOpt = DEFAULT_ADDRESS,
    token: TokenOpt = "",
    ca_cert: CaCertOpt = "",
    as_json: JsonOpt = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Newest N.")] = 20,
    output: Annotated[bool, typer.Option("--output", help="Show each output.")] = False,
) -> None:
    """List the executions of a job, newest first."""
    params = {"_end": str(limit)}
    data = (
        Client(address, token, ca_cert)
        .call("GET", f"/v1/jobs/{job}/executions", params=params)
        .json()
    )
    if as_json:
        print_json(data)
        return
    table = Table("ID", "Node", "Started", "Finished", "Status", "Attempt")
    table.columns[0].overflow = "fold"
    for item in data:
        table.add_row(
            item["id"],
            item["node_name"],
            item["started_at"],
            item.get("finished_at") or "-",
            item.get("status", ""),
            str(item.get("attempt", 1)),
        )
    out.print(table)
    if output:
        for item in data:
            out.rule(item["id"])
            out.print(item.get("output", ""), markup=False, highlight=False)
