"""`cronmesh executions`: list a job's executions, follow one's output, kill one.

`cronmesh executions JOB` lists (as before); `executions logs JOB ID
[--follow]` prints or follows the output of one execution, wherever it runs;
`executions kill JOB ID` stops a running execution on the node that runs it.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import httpx
import typer
from typer.core import TyperGroup

from cronmesh.cli.client import (
    DEFAULT_ADDRESS,
    AddressOpt,
    CaCertOpt,
    Client,
    JsonOpt,
    TokenOpt,
    fail,
    out,
    print_json,
)
from cronmesh.cli.client import (
    executions as list_executions,
)

__all__ = ["app"]


class _ListByDefault(TyperGroup):
    """`executions JOB` means `executions list JOB`."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["list", *args]
        return list(super().parse_args(ctx, args))


app = typer.Typer(
    cls=_ListByDefault,
    help="A job's executions: list them, follow one's output, kill one.",
    no_args_is_help=True,
)
app.command("list")(list_executions)


@app.command("logs")
def logs(
    job: str,
    execution_id: str,
    address: AddressOpt = DEFAULT_ADDRESS,
    token: TokenOpt = "",
    ca_cert: CaCertOpt = "",
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Stream the output until the run ends."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print the output of one execution (so far, if it runs)."""
    if as_json and follow:
        fail("--json: not with --follow (the output streams as it comes)", 2)
    client = Client(address, token, ca_cert)
    path = f"/v1/jobs/{job}/executions/{execution_id}/output"
    if not follow:
        text = client.call("GET", path).text
        if as_json:
            print_json({"job": job, "execution_id": execution_id, "output": text})
        else:
            sys.stdout.write(text)
        return
    try:
        with client.http.stream(
            "GET", path, params={"follow": "true"}, timeout=None
        ) as response:
            if response.status_code >= 400:
                response.read()
                client.check(response)
            for chunk in response.iter_bytes():
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
    except httpx.HTTPError as exc:
        fail(f"output stream from {client.address} broke: {exc}")


@app.command("kill")
def kill(
    job: str,
    execution_id: str,
    address: AddressOpt = DEFAULT_ADDRESS,
    token: TokenOpt = "",
    ca_cert: CaCertOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Stop a running execution (its whole process group) on its node."""
    data = (
        Client(address, token, ca_cert)
        .call("POST", f"/v1/jobs/{job}/executions/{execution_id}/kill")
        .json()
    )
    if as_json:
        print_json(data)
        return
    out.print(f"killed [bold]{execution_id}[/bold] on {data.get('node', '?')}")
