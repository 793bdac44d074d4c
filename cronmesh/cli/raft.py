"""`cronmesh raft ...`: look at and repair the Raft configuration."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

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
from cronmesh.errors import CronmeshError
from cronmesh.raft.recovery import force_configuration
from cronmesh.storage.env import DataDir
from cronmesh.storage.raftlog import LmdbRaftStorage

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
def list_peers(
    address: AddressOpt = DEFAULT_ADDRESS,
    token: TokenOpt = "",
    ca_cert: CaCertOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """List the servers of the Raft configuration and who leads."""
    rows = Client(address, token, ca_cert).call("GET", "/v1/raft/peers").json()
    if as_json:
        print_json(rows)
    else:
        out.print(_table(rows))
        if rows and not any(row.get("State") == "leader" for row in rows):
            # The table is this server's view of the configuration; without a
            # leader its "follower" rows say nothing about who is alive.
            sys.stderr.write(
                "cronmesh: warning: no leader: a majority of the servers may be "
                "down; a blank Address is a server the mesh does not see\n"
            )


@app.command("remove-peer")
def remove_peer(
    peer_id: Annotated[str, typer.Option("--peer-id", help="Server to remove.")],
    address: AddressOpt = DEFAULT_ADDRESS,
    token: TokenOpt = "",
    ca_cert: CaCertOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Remove a failed server from the Raft configuration (any server; a live
    server is refused: stop it first)."""
    rows = (
        Client(address, token, ca_cert)
        .call("DELETE", f"/v1/raft/peers/{peer_id}")
        .json()
    )
    if as_json:
        print_json(rows)
    else:
        out.print(f"removed [bold]{peer_id}[/bold]")
        out.print(_table(rows))


@app.command("recover")
def recover(
    peers: Annotated[
        Path,
        typer.Option("--peers", help='JSON file: the surviving servers, ["s1", "s2"].'),
    ],
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="Data dir of this (stopped) server.")
    ] = Path("cronmesh.data"),
    as_json: JsonOpt = False,
) -> None:
    """Offline: force the Raft configuration to the servers in --peers.

    For a cluster that lost its quorum for good. Run it on every surviving
    server, with the same file, while the agents are stopped; then start
    them. Entries the lost servers held but the survivors did not are lost.
    See docs/operations.md.
    """
    try:
        voters = json.loads(peers.read_text())
    except OSError as exc:
        fail(f"--peers: cannot read {peers}: {exc.strerror}", 2)
    except ValueError as exc:
        fail(f"--peers: {peers} is not JSON: {exc}", 2)
    if isinstance(voters, dict):
        voters = voters.get("voters")
    if (
        not isinstance(voters, list)
        or not voters
        or not all(isinstance(v, str) and v for v in voters)
    ):
        fail('--peers: expected a JSON list of server names, like ["s1", "s2"]', 2)
    try:
        data = DataDir(data_dir)
    except CronmeshError as exc:
        fail(str(exc), 1)
    try:
        index, term = force_configuration(LmdbRaftStorage(data), set(voters))
    finally:
        data.close()
    if as_json:
        print_json({"voters": sorted(voters), "index": index, "term": term})
        return
    out.print(
        f"wrote configuration {sorted(voters)} at index {index} (term {term}) "
        f"in {data_dir}; start the agent now"
    )
