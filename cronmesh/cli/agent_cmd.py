"""`cronmesh agent`: start a node with Dkron's flags."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

from cronmesh.agent import RESERVED_TAGS, Agent, AgentConfig, parse_addr
from cronmesh.api.acl import AccessList
from cronmesh.errors import CronmeshError, ValidationError
from cronmesh.gossip.keyring import decode_key
from cronmesh.rpc.tls import RpcSecurity, check_http_tls

__all__ = ["agent", "load_config_file"]

LEVELS = ("debug", "info", "warning", "error")

log = logging.getLogger("cronmesh.agent")


def _parse_tags(values: list[str]) -> dict[str, str]:
    tags = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValidationError(f"--tag: {item!r} is not key=value", "tag")
        check_not_reserved(key, "--tag")
        tags[key] = value
    return tags


def check_not_reserved(key: str, where: str) -> None:
    """Refuse a tag the agent sets itself (`server`, `rpc_addr`, ...)."""
    if key in RESERVED_TAGS:
        raise ValidationError(
            f"{where}: {key!r} is reserved (set by the agent itself)", "tag"
        )


def load_config_file(path: Path) -> dict[str, Any]:
    """A config file (JSON, TOML or YAML) as a dict with `_` keys."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValidationError(f"--config: cannot read {path}: {exc.strerror}") from exc
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # each parser has its own error class
        raise ValidationError(f"--config: {path} cannot be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise ValidationError(f"--config: {path} must hold a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _config_from_file(path: Path) -> AgentConfig:
    config = AgentConfig()
    known = set(AgentConfig.__dataclass_fields__)
    for key, value in load_config_file(path).items():
        if key == "tags" and isinstance(value, dict):
            config.tags = {str(k): str(v) for k, v in value.items()}
        elif key in known:
            setattr(config, key, value)
        else:
            raise ValidationError(f"--config: unknown setting {key!r} in {path}")
    return config


def agent(
    server: Annotated[
        bool,
        typer.Option("--server", help="Be a server: hold the replicated state (Raft)."),
    ] = False,
    bootstrap_expect: Annotated[
        int,
        typer.Option(
            "--bootstrap-expect",
            min=0,
            help="Servers to wait for before the first election (0/1: alone).",
        ),
    ] = 0,
    data_dir: Annotated[
        str,
        typer.Option("--data-dir", help="Where state lives (default: cronmesh.data)."),
    ] = "",
    node_name: Annotated[
        str, typer.Option("--node-name", help="Default: host name.")
    ] = "",
    http_addr: Annotated[
        str,
        typer.Option("--http-addr", help="HTTP API address (default: 127.0.0.1:8080)."),
    ] = "",
    bind_addr: Annotated[
        str,
        typer.Option(
            "--bind-addr",
            help="Address to bind; its host also serves RPC (default: 0.0.0.0:8946).",
        ),
    ] = "",
    peer: Annotated[
        list[str] | None,
        typer.Option(
            "--peer", help="Another server as name=host:rpc_port (repeatable)."
        ),
    ] = None,
    rpc_port: Annotated[
        int | None,
        typer.Option(
            "--rpc-port", min=1, max=65535, help="gRPC port for Raft (default: 6868)."
        ),
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="key=value, repeatable.")
    ] = None,
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level", help="debug, info, warning or error (default: info)."
        ),
    ] = "",
    config_file: Annotated[
        Path | None, typer.Option("--config", help="JSON, TOML or YAML.")
    ] = None,
    max_executions: Annotated[
        int | None,
        typer.Option(
            "--max-executions", min=1, help="Executions kept per job (default: 100)."
        ),
    ] = None,
    max_output: Annotated[
        int | None,
        typer.Option(
            "--max-output",
            min=1024,
            help="Output bytes kept per run, the end (default: 256000).",
        ),
    ] = None,
    shutdown_grace: Annotated[
        float | None,
        typer.Option(
            "--shutdown-grace",
            min=0,
            help="Seconds running jobs get on SIGTERM (default: 30).",
        ),
    ] = None,
    join: Annotated[
        list[str] | None,
        typer.Option(
            "--join", help="Gossip address of a member to join at start (repeatable)."
        ),
    ] = None,
    retry_join: Annotated[
        list[str] | None,
        typer.Option(
            "--retry-join", help="Like --join, retried until it works (repeatable)."
        ),
    ] = None,
    retry_interval: Annotated[
        float | None,
        typer.Option(
            "--retry-interval",
            min=0.1,
            help="Seconds between retry-join attempts (default: 30).",
        ),
    ] = None,
    retry_max: Annotated[
        int | None,
        typer.Option(
            "--retry-max",
            min=0,
            help="Retry-join attempts before exiting, 0 = forever (default: 0).",
        ),
    ] = None,
    advertise_addr: Annotated[
        str,
        typer.Option(
            "--advertise-addr", help="Address other nodes use to reach this one."
        ),
    ] = "",
    encrypt: Annotated[
        str,
        typer.Option("--encrypt", help="Gossip encryption key (see cronmesh keygen)."),
    ] = "",
    profile: Annotated[
        str,
        typer.Option(
            "--profile", help="Gossip timing: lan, wan or local (default: lan)."
        ),
    ] = "",
    catch_up_window: Annotated[
        float | None,
        typer.Option(
            "--catch-up-window",
            min=0,
            help="Seconds a missed fire may still run late (default: 60).",
        ),
    ] = None,
    execution_timeout: Annotated[
        float | None,
        typer.Option(
            "--execution-timeout",
            min=1,
            help="Seconds without news of a running execution from its agent "
            "before the leader marks it failed (default: 30).",
        ),
    ] = None,
    acl_token: Annotated[
        list[str] | None,
        typer.Option(
            "--acl-token",
            envvar="CRONMESH_ACL_TOKENS",
            show_envvar=True,
            help="API token NAME:read|write:TOKEN, repeatable. Shows in ps: "
            "prefer --acl-tokens-file or env CRONMESH_ACL_TOKENS (space-separated).",
        ),
    ] = None,
    acl_tokens_file: Annotated[
        str,
        typer.Option(
            "--acl-tokens-file",
            help="File of API tokens, one NAME:SCOPE:TOKEN a line (re-read on HUP).",
        ),
    ] = "",
    tls_cert: Annotated[
        str, typer.Option("--tls-cert", help="Serve the API over HTTPS: PEM cert.")
    ] = "",
    tls_key: Annotated[
        str, typer.Option("--tls-key", help="The PEM key of --tls-cert.")
    ] = "",
    rpc_ca: Annotated[
        str,
        typer.Option("--rpc-ca", help="Mutual TLS between nodes: CA of every node."),
    ] = "",
    rpc_cert: Annotated[
        str, typer.Option("--rpc-cert", help="This node's PEM cert, signed by the CA.")
    ] = "",
    rpc_key: Annotated[
        str, typer.Option("--rpc-key", help="The PEM key of --rpc-cert.")
    ] = "",
) -> None:
    """Start a cronmesh agent (a node)."""
    try:
        config = _config_from_file(config_file) if config_file else AgentConfig()
        overrides: dict[str, Any] = {
            "data_dir": data_dir,
            "node_name": node_name,
            "http_addr": http_addr,
            "bind_addr": bind_addr,
            "rpc_port": rpc_port,
            "log_level": log_level,
            "bootstrap_expect": bootstrap_expect,
            "max_executions": max_executions,
            "max_output": max_output,
        }
        for key, value in overrides.items():
            if value:
                setattr(config, key, value)
        if shutdown_grace is not None:
            config.shutdown_grace = shutdown_grace
        if catch_up_window is not None:
            config.catch_up_window = catch_up_window
        if execution_timeout is not None:
            config.execution_timeout = execution_timeout
        config.server = server or config.server
        config.join = list(join or config.join)
        config.retry_join = list(retry_join or config.retry_join)
        if retry_interval is not None:
            config.retry_interval = retry_interval
        if retry_max is not None:
            config.retry_max = retry_max
        config.advertise_addr = advertise_addr or config.advertise_addr
        config.encrypt = encrypt or config.encrypt
        config.profile = profile or config.profile
        if config.profile not in ("lan", "wan", "local"):
            raise ValidationError(
                f"--profile: {config.profile!r} is not lan, wan or local"
            )
        if config.encrypt:
            decode_key(config.encrypt)
        if len(config.node_name.encode()) > 128:
            raise ValidationError("--node-name: longer than 128 bytes")
        config.config_file = str(config_file) if config_file else ""
        config.cli_tags = _parse_tags(tag or [])
        config.tags.update(config.cli_tags)
        for item in peer or []:
            name, sep, address = item.partition("=")
            if not sep or not name or ":" not in address:
                raise ValidationError(f"--peer: {item!r} is not name=host:port", "peer")
            config.peers[name] = address
        if config.log_level not in LEVELS:
            raise ValidationError(
                f"--log-level: {config.log_level!r} is not one of {LEVELS}"
            )
        parse_addr(config.http_addr, 8080, "http-addr")
        parse_addr(config.bind_addr, 8946, "bind-addr")
        token_count = _security_settings(
            config,
            {
                "acl_tokens_file": acl_tokens_file,
                "tls_cert": tls_cert,
                "tls_key": tls_key,
                "rpc_ca": rpc_ca,
                "rpc_cert": rpc_cert,
                "rpc_key": rpc_key,
            },
            acl_token or [],
        )
    except ValidationError as exc:
        sys.stderr.write(f"cronmesh agent: error: {exc}\n")
        raise typer.Exit(2) from exc
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log.info(
        "security api_tokens=%d https=%s rpc_tls=%s",
        token_count,
        "on" if config.tls_cert else "off",
        "mutual" if config.rpc_ca else "off",
    )
    for warning in security_warnings(config):
        log.warning("%s", warning)
    try:
        asyncio.run(_run(config))
    except CronmeshError as exc:
        sys.stderr.write(f"cronmesh agent: error: {exc}\n")
        raise typer.Exit(1) from exc
    except OSError as exc:
        sys.stderr.write(f"cronmesh agent: error: {exc}\n")
        raise typer.Exit(1) from exc


def _security_settings(
    config: AgentConfig, paths: dict[str, str], tokens: list[str]
) -> int:
    """Set the security flags over the config file's, and check them all:
    every file readable and well-formed, now rather than at first use.
    Returns the number of API tokens."""
    for key, value in paths.items():
        if value:
            setattr(config, key, value)
    config.acl_tokens = list(tokens or config.acl_tokens)
    acl = AccessList.load(config.acl_tokens, config.acl_tokens_file)
    check_http_tls(config.tls_cert, config.tls_key)
    RpcSecurity.from_files(config.rpc_ca, config.rpc_cert, config.rpc_key)
    return len(acl.tokens)


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


def reload_settings(config: AgentConfig) -> tuple[dict[str, str], str]:
    """Tags and log level after a SIGHUP: the config file again, then --tag."""
    tags = dict(config.tags)
    level = config.log_level
    if config.config_file:
        fresh = _config_from_file(Path(config.config_file))
        tags, level = dict(fresh.tags), fresh.log_level
    for key in tags:
        check_not_reserved(key, "tags")
    tags.update(config.cli_tags)
    if level not in LEVELS:
        raise ValidationError(f"log_level: {level!r} is not one of {LEVELS}")
    return tags, level
