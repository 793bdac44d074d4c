"""`cronmesh raft ...`: look at and repair the Raft configuration."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cronmesh.cli.client import (
    DEFAULT_ADDRESS,
    AddressOpt,
    Client,
    JsonOpt,
    out,
    print_json,
)

__all__ = ["app"]

app = typer.Typer(help="Raft peers of the server cluster.", no_args_is_help=True)


def _table(rows: list[dict[str, object]]) -> Table:
    table = Table("Node", "ID", "Address", "State", "Voter")
    for row in rows:
        table.add_row(
            str(row["Node"]),
            str(row["ID"]),
            str(row["Address"]),
            str(row["State"]),
            "true" if row["Voter"] else "false",
        )
    return table


@app.command("list-peers")
def list_peers(address: AddressOpt = DEFAULT_ADDRESS, as_json: JsonOpt = False) -> None:
    """List the servers of the Raft configuration and who leads."""
    rows = Client(address).call("GET", "/v1/raft/peers").json()
    if as_json:
        print_json(rows)
    else:
        out.print(_table(rows))


@app.command("remove-peer")
def remove_peer(
    peer_id: Annotated[str, typer.Option("--peer-id", help="Server to remove.")],
    address: AddressOpt = DEFAULT_ADDRESS,
    as_json: JsonOpt = False,
) -> None:
    """Remove a failed server from the Raft configuration (ask the leader)."""
    rows = Client(address).call("DELETE", f"/v1/raft/peers/{peer_id}").json()
    if as_json:
        print_json(rows)
    else:
        out.print(f"removed [bold]{peer_id}[/bold]")
        out.print(_table(rows))
