"""`cronmesh members`, `cronmesh leave`, `cronmesh keygen`."""

from __future__ import annotations

from rich.table import Table

from cronmesh.cli.client import (
    DEFAULT_ADDRESS,
    AddressOpt,
    CaCertOpt,
    Client,
    JsonOpt,
    TokenOpt,
    out,
    print_json,
)
from cronmesh.gossip.keyring import generate_key

__all__ = ["keygen", "leave", "members"]


def members(
    address: AddressOpt = DEFAULT_ADDRESS,
    token: TokenOpt = "",
    ca_cert: CaCertOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """List the members of the gossip mesh and their state."""
    found = Client(address, token, ca_cert).call("GET", "/v1/members").json()
    if as_json:
        print_json(found)
        return
    table = Table("Name", "Address", "Status", "Server", "Tags")
    for member in found:
        tags = member.get("Tags") or {}
        shown = ", ".join(
            f"{k}={v}"
            for k, v in sorted(tags.items())
            if k not in ("version", "expect", "port")
        )
        table.add_row(
            member["Name"],
            f"{member['Addr']}:{member['Port']}",
            member["statusText"],
            tags.get("server", "false"),
            shown,
        )
    out.print(table)


def leave(
    address: AddressOpt = DEFAULT_ADDRESS,
    token: TokenOpt = "",
    ca_cert: CaCertOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Make an agent leave the cluster gracefully and stop."""
    peers = Client(address, token, ca_cert).call("POST", "/v1/leave").json()
    if as_json:
        print_json({"left": True, "servers": peers})
    else:
        out.print("the agent is leaving the cluster and stopping")


def keygen(as_json: JsonOpt = False) -> None:
    """Print a new gossip encryption key (for --encrypt)."""
    key = generate_key()
    if as_json:
        print_json({"key": key})
    else:
        print(key)
