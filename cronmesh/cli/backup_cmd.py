"""`cronmesh backup` and `cronmesh restore`: a cluster's jobs to a file and back.

`backup` streams `GET /v1/backup` from any server. With `-o` it writes a
temporary file next to the target, checks that it is one whole JSON
document, and renames it over the target: a failed backup never leaves a
half file. Without `-o` the document goes to stdout. A progress bar goes to
stderr when stderr is a terminal.

`restore` posts a file to `POST /v1/restore` and prints what happened to
each job. Exit codes: 0 restored, 2 the file is invalid (nothing was
written), 1 the server failed or could not be reached.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import (
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from cronmesh.cli.client import (
    DEFAULT_ADDRESS,
    AddressOpt,
    CaCertOpt,
    Client,
    JsonOpt,
    TokenOpt,
    _message,
    fail,
    out,
    print_json,
)

__all__ = ["backup", "restore"]

# A large restore is validated and written in one go: no read timeout.
LONG_TIMEOUT = httpx.Timeout(30.0, read=None)


def backup(
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Write to FILE (default: stdout)."),
    ] = None,
    executions: Annotated[
        bool,
        typer.Option("--executions", help="Include the executions and outputs."),
    ] = False,
    address: AddressOpt = DEFAULT_ADDRESS,
    token: TokenOpt = "",
    ca_cert: CaCertOpt = "",
) -> None:
    """Write every job (and optionally the executions) to a backup file."""
    client = Client(address, token, ca_cert)
    params = {"executions": "true"} if executions else {}
    if output is None:
        jobs, count = _download(client, params, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        _summary(jobs, count, "stdout")
        return
    target = output.resolve()
    try:
        handle = tempfile.NamedTemporaryFile(
            dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False
        )
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror}", 2)
    temp = Path(handle.name)
    try:
        with handle:
            jobs, count = _download(client, params, handle)
            handle.flush()
            os.fsync(handle.fileno())
        _check_whole(temp)
        os.replace(temp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    _summary(jobs, count, str(output))


def _download(
    client: Client, params: dict[str, str], sink: IO[bytes]
) -> tuple[str, str]:
    """Stream the backup into `sink`; returns the job and execution counts."""
    try:
        with client.http.stream(
            "GET", "/v1/backup", params=params, timeout=LONG_TIMEOUT
        ) as response:
            if response.status_code >= 400:
                response.read()
                fail(f"{_message(response)} (HTTP {response.status_code})")
            with _progress() as advance:
                for chunk in response.iter_bytes():
                    sink.write(chunk)
                    advance(len(chunk))
            return (
                response.headers.get("X-Total-Count", "?"),
                response.headers.get("X-Execution-Count", "?"),
            )
    except httpx.ConnectError as exc:
        fail(f"cannot reach cronmesh at {client.address}: {exc}")
    except httpx.HTTPError as exc:
        fail(f"backup from {client.address} was cut short: {exc}")
    except OSError as exc:
        fail(f"cannot write the backup: {exc.strerror or exc}")


@contextlib.contextmanager
def _progress() -> Iterator[Any]:
    if not sys.stderr.isatty():
        yield lambda size: None
        return
    columns = (
        SpinnerColumn(),
        TextColumn("backup"),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("backup", total=None)
        yield lambda size: bar.advance(task, size)


def _check_whole(path: Path) -> None:
    """Refuse a download that is not one whole JSON document (cut short)."""
    try:
        with path.open("rb") as handle:
            document = json.load(handle)
    except (ValueError, RecursionError) as exc:
        fail(f"the backup received is incomplete or corrupt: {exc}")
    if not isinstance(document, dict) or "cronmesh_backup" not in document:
        fail("the server did not send a cronmesh backup")


def _summary(jobs: str, executions: str, where: str) -> None:
    sys.stderr.write(f"cronmesh: backup of {jobs} jobs, {executions} executions")
    sys.stderr.write(f" written to {where}\n")


def restore(
    file: Annotated[Path, typer.Argument(help="A backup (ours or Dkron's jobs).")],
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Check the file and report; write nothing."),
    ] = False,
    address: AddressOpt = DEFAULT_ADDRESS,
    token: TokenOpt = "",
    ca_cert: CaCertOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Restore jobs (and executions) from a backup file, all or nothing."""
    try:
        data = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}", 2)
    client = Client(address, token, ca_cert)
    params = {"dry_run": "true"} if dry_run else {}
    try:
        response = client.http.post(
            "/v1/restore",
            params=params,
            files={"file": (file.name, data, "application/json")},
            timeout=LONG_TIMEOUT,
        )
    except httpx.HTTPError as exc:
        fail(f"cannot reach cronmesh at {client.address}: {exc}")
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text.strip() or response.reason_phrase}
    if response.status_code >= 400:
        if as_json:
            print_json(body)
        elif body.get("jobs"):
            out.print(_table(body["jobs"]))
        fail(
            f"{body.get('error', body)} (HTTP {response.status_code})",
            2 if response.status_code == 400 else 1,
        )
    if as_json:
        print_json(body)
        return
    out.print(_table(body["jobs"]))
    verb = "would restore" if body.get("dry_run") else "restored"
    sys.stderr.write(
        f"cronmesh: {verb} {body['created']} new and {body['updated']} existing "
        f"jobs, {body['executions']} executions\n"
    )


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table("Job", "Result", "Problem")
    for column in table.columns:
        column.overflow = "fold"
    for row in rows:
        name = row.get("name")
        if name is None:
            name = f"#{row.get('index')}"
        table.add_row(str(name), row.get("result", ""), row.get("error", ""))
    return table
