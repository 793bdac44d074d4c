"""`cronmesh agent`: start a node (or `--check` its configuration).

Its flags are made from cronmesh.config.SETTINGS, one per setting, so a
flag, a `CRONMESH_` variable and a file key always exist together. A flag
left out is None here, which is how `load` tells it from one given.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cronmesh.agent import Agent, AgentConfig, parse_addr
from cronmesh.cli.client import fail
from cronmesh.config import (
    BOOL,
    INT,
    LIST,
    PEERS,
    SEARCH_DIRS,
    SECONDS,
    SETTINGS,
    TAGS,
    WORDS,
    Loaded,
    Setting,
    check_security,
    default_text,
    env_name,
    load,
)
from cronmesh.errors import CronmeshError, ValidationError
from cronmesh.logs import setup_logging

__all__ = ["agent", "security_warnings"]

log = logging.getLogger("cronmesh.agent")


def agent(**given: Any) -> None:
    """Start a cronmesh agent (a node).

    Settings come from flags, then CRONMESH_* variables, then a file
    (--config, or cronmesh.yml/.yaml/.toml/.json in /etc/cronmesh,
    ~/.cronmesh, ./config), then defaults; see docs/configuration.md.
    """
    check = bool(given.pop("check"))
    config_file = given.pop("config_file")
    flags = {
        s.key: given[_param(s)]
        for s in SETTINGS
        if given.get(_param(s)) is not None and given.get(_param(s)) != []
    }
    try:
        loaded = load(flags=flags, config_file=config_file)
        token_count = check_security(loaded.config)
    except ValidationError as exc:
        fail(str(exc), 2)
    if check:
        _print_check(loaded)
        raise typer.Exit(0)
    config = loaded.config
    setup_logging(config.log_level, json_lines=config.log_json)
    for warning in loaded.warnings:
        log.warning("%s", warning)
    log.info(
        "security api_tokens=%d https=%s rpc_tls=%s",
        token_count,
        "on" if config.tls_cert else "off",
        "mutual" if config.rpc_ca else "off",
    )
    for warning in security_warnings(config):
        log.warning("%s", warning)
    config.sources = loaded.sources
    try:
        asyncio.run(_run(config))
    except (CronmeshError, OSError) as exc:
        fail(str(exc), 1)


def _print_check(loaded: Loaded) -> None:
    for warning in loaded.warnings:
        sys.stderr.write(f"cronmesh: warning: {warning}\n")
    source = loaded.sources.file or (f"none found in {', '.join(SEARCH_DIRS)}")
    typer.echo(f"# config file: {source}")
    for line in loaded.describe():
        typer.echo(line)
    typer.echo("# configuration ok")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def security_warnings(config: AgentConfig) -> list[str]:
    """What an operator should know about an exposed API or RPC port."""
    found = []
    http_host, _ = parse_addr(config.http_addr, 8080, "http-addr")
    tokens = bool(config.acl_tokens or config.acl_tokens_file)
    if not _is_loopback(http_host):
        if not tokens:
            found.append(
                f"the HTTP API listens on {config.http_addr} without API tokens: "
                "whoever reaches it can change and run jobs (see --acl-tokens-file)"
            )
        if not config.tls_cert:
            found.append(
                f"the HTTP API on {config.http_addr} is plain HTTP: tokens and job "
                "definitions cross the network in clear (see --tls-cert)"
            )
    if config.acl_tokens_file:
        try:
            mode = Path(config.acl_tokens_file).stat().st_mode & 0o777
        except OSError:
            mode = 0  # checked at start; reported again at first use
        if mode & 0o077:
            found.append(
                f"the tokens file {config.acl_tokens_file} is readable by group or "
                f"others (mode {mode:o}); chmod 600 it"
            )
    rpc_host, _ = parse_addr(config.bind_addr, 8946, "bind-addr")
    if not config.rpc_ca and not _is_loopback(rpc_host):
        found.append(
            f"RPC between nodes on {rpc_host}:{config.rpc_port} is not encrypted "
            "nor authenticated (see --rpc-ca, --rpc-cert, --rpc-key)"
        )
    return found


async def _run(config: AgentConfig) -> None:
    node = Agent(config)
    await node.run()
    if node.exit_error:
        raise CronmeshError(node.exit_error)


# -- the flags, made from SETTINGS ----------------------------------------


def _param(setting: Setting) -> str:
    return setting.key.replace("-", "_")


_DEFAULTS = AgentConfig()
_METAVARS = {
    INT: "N",
    SECONDS: "DURATION",
    TAGS: "KEY=VALUE",
    PEERS: "NAME=HOST:PORT",
}


def _option(setting: Setting) -> Any:
    name = setting.flag or setting.key
    default = default_text(setting, _DEFAULTS)
    shown = f", default {default}" if default else ""
    text = f"{setting.help} [env {env_name(setting)}{shown}]"
    if setting.kind == BOOL:
        option = typer.Option(f"--{name}/--no-{name}", help=text, show_default=False)
        return Annotated[bool | None, option]
    option = typer.Option(
        f"--{name}",
        help=text,
        show_default=False,
        metavar=_METAVARS.get(setting.kind, "TEXT"),
    )
    if setting.kind == INT:
        return Annotated[int | None, option]
    if setting.kind in (LIST, WORDS, TAGS, PEERS):
        return Annotated[list[str] | None, option]
    return Annotated[str | None, option]


def _signature() -> inspect.Signature:
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter(_param(s), keyword, default=None, annotation=_option(s))
        for s in SETTINGS
    ]
    params += [
        inspect.Parameter(
            "config_file",
            keyword,
            default=None,
            annotation=Annotated[
                Path | None,
                typer.Option(
                    "--config",
                    help="Config file (YAML, TOML or JSON) [env CRONMESH_CONFIG].",
                ),
            ],
        ),
        inspect.Parameter(
            "check",
            keyword,
            default=False,
            annotation=Annotated[
                bool,
                typer.Option(
                    "--check", help="Validate the configuration, print it, exit."
                ),
            ],
        ),
    ]
    return inspect.Signature(params, return_annotation=None)


agent.__signature__ = _signature()  # type: ignore[attr-defined]
