"""`cronmesh agent`: start a node (or `--check` its configuration).

Its flags are made from cronmesh.config.SETTINGS, one per setting, so a
flag, a `CRONMESH_` variable and a file key always exist together. A flag
left out is None here, which is how `load` tells it from one given.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cronmesh.agent import Agent, AgentConfig
from cronmesh.config import (
    BOOL,
    INT,
    LIST,
    PEERS,
    SEARCH_DIRS,
    SECONDS,
    SETTINGS,
    TAGS,
    Loaded,
    Setting,
    default_text,
    env_name,
    load,
)
from cronmesh.errors import CronmeshError, ValidationError
from cronmesh.logs import setup_logging

__all__ = ["agent"]

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
    except ValidationError as exc:
        sys.stderr.write(f"cronmesh agent: error: {exc}\n")
        raise typer.Exit(2) from exc
    if check:
        _print_check(loaded)
        raise typer.Exit(0)
    config = loaded.config
    setup_logging(config.log_level, json_lines=config.log_json)
    for warning in loaded.warnings:
        log.warning("%s", warning)
    config.sources = loaded.sources
    try:
        asyncio.run(_run(config))
    except (CronmeshError, OSError) as exc:
        sys.stderr.write(f"cronmesh agent: error: {exc}\n")
        raise typer.Exit(1) from exc


def _print_check(loaded: Loaded) -> None:
    for warning in loaded.warnings:
        sys.stderr.write(f"cronmesh agent: warning: {warning}\n")
    source = loaded.sources.file or (f"none found in {', '.join(SEARCH_DIRS)}")
    typer.echo(f"# config file: {source}")
    for line in loaded.describe():
        typer.echo(line)
    typer.echo("# configuration ok")


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
    if setting.kind in (LIST, TAGS, PEERS):
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
