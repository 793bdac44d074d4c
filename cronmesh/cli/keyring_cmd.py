"""`cronmesh keyring ...`: rotate the gossip key without downtime.

The keyring lives in each node's data dir (keyring.json). These commands
edit that file; `kill -HUP` (or `systemctl reload`) makes a running agent
load it. A rotation: `install` the new key on every node and reload them
all; `use` it on every node and reload; then `remove` the old one. Every
node can read both keys while the rotation is under way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cronmesh.cli.client import JsonOpt, fail, out, print_json
from cronmesh.errors import CronmeshError
from cronmesh.gossip.keyring import KEYRING_FILE, Keyring, decode_key

__all__ = ["app"]

app = typer.Typer(help="The gossip encryption keyring of a node.", no_args_is_help=True)

KeyArg = Annotated[str, typer.Argument(help="A base64 key (cronmesh keygen).")]
DataDirOpt = Annotated[
    Path,
    typer.Option("--data-dir", help="The node's data dir (default: cronmesh.data)."),
]


def _load(data_dir: Path) -> Keyring:
    if not (data_dir / KEYRING_FILE).exists():
        fail(f"no keyring in {data_dir} (start the agent with --encrypt first)", 1)
    try:
        return Keyring.load(data_dir)
    except CronmeshError as exc:
        fail(str(exc), 1)


def _fingerprint(raw: bytes) -> str:
    import base64

    return base64.b64encode(raw).decode()


@app.command("list")
def list_keys(
    data_dir: DataDirOpt = Path("cronmesh.data"), as_json: JsonOpt = False
) -> None:
    """List the installed keys, the primary (encrypting) one first."""
    ring = _load(data_dir)
    keys = [_fingerprint(k) for k in ring.keys]
    if as_json:
        print_json({"primary": keys[0], "keys": keys})
        return
    for i, key in enumerate(keys):
        out.print(f"{key}{'  (primary)' if i == 0 else ''}", highlight=False)


def _change(data_dir: Path, key: str, action: str, as_json: bool) -> None:
    try:
        decode_key(key)
        ring = _load(data_dir)
        getattr(ring, action)(key)
        ring.save(data_dir)
    except CronmeshError as exc:
        fail(f"{action}: {exc}", 2)
    if as_json:
        keys = [_fingerprint(k) for k in ring.keys]
        print_json({"action": action, "primary": keys[0], "keys": keys})
        return
    out.print(f"{action}: done in {data_dir / KEYRING_FILE}; reload the agent (SIGHUP)")


@app.command("install")
def install(
    key: KeyArg, data_dir: DataDirOpt = Path("cronmesh.data"), as_json: JsonOpt = False
) -> None:
    """Add a key that this node accepts (it still encrypts with the primary)."""
    _change(data_dir, key, "install", as_json)


@app.command("use")
def use(
    key: KeyArg, data_dir: DataDirOpt = Path("cronmesh.data"), as_json: JsonOpt = False
) -> None:
    """Make an installed key the one this node encrypts with."""
    _change(data_dir, key, "use", as_json)


@app.command("remove")
def remove(
    key: KeyArg, data_dir: DataDirOpt = Path("cronmesh.data"), as_json: JsonOpt = False
) -> None:
    """Stop accepting a key (not the primary one)."""
    _change(data_dir, key, "remove", as_json)
