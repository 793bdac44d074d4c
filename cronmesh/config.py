"""Agent settings from defaults, a file, the environment and flags.

Theory of operation: SETTINGS is the one table of what an agent can be
told. Each entry gives the key (Dkron's spelling, also the flag and, upper-
cased, the `CRONMESH_` variable), the AgentConfig attribute it sets, how
its values are parsed, and whether SIGHUP applies it. `load` reads the
sources from weakest to strongest (defaults < file < environment < flags),
parses every value with the same rules wherever it came from, and names the
source and key in any error. `tags` and `peers` merge key by key in that
order; every other setting is replaced by a stronger source.

A Dkron key we know but do not implement is accepted with a warning
(IGNORED); a key neither of us knows is an error. Keys are compared after
lower-casing and turning `_` into `-`, so `data_dir` and Dkron's
field-named keys (`devmode`) work too.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cronmesh.agent import RESERVED_TAGS, AgentConfig, parse_addr
from cronmesh.api.acl import AccessList
from cronmesh.core.notify import NotifySettings
from cronmesh.errors import ValidationError
from cronmesh.gossip.keyring import decode_key
from cronmesh.rpc.tls import RpcSecurity, check_http_tls

__all__ = [
    "IGNORED",
    "SETTINGS",
    "ConfigSources",
    "Loaded",
    "Setting",
    "apply_reload",
    "check_security",
    "default_text",
    "env_name",
    "find_config_file",
    "load",
    "markdown_table",
    "reload",
]

log = logging.getLogger("cronmesh.config")

# Kinds of value: how text (environment) and file values are parsed.
STR, INT, BOOL, SECONDS, LIST, WORDS, TAGS, PEERS = (
    "string",
    "integer",
    "boolean",
    "duration",
    "list",  # text: comma-separated
    "words",  # text: space-separated (values that may hold commas)
    "tags",
    "peers",
)

LOG_LEVELS = {
    "debug": "debug",
    "info": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "fatal": "critical",
    "panic": "critical",
    "critical": "critical",
}

SEARCH_DIRS = ("/etc/cronmesh", "~/.cronmesh", "./config")
FILE_NAMES = ("cronmesh.yml", "cronmesh.yaml", "cronmesh.toml", "cronmesh.json")
CONFIG_ENV = "CRONMESH_CONFIG"


@dataclass(frozen=True)
class Setting:
    """One configurable value of an agent."""

    key: str  # file key and flag name (Dkron's spelling where Dkron has it)
    attr: str  # AgentConfig attribute; "notify.x" is config.notify.x
    kind: str  # STR, INT, BOOL, SECONDS, LIST, WORDS, TAGS or PEERS
    help: str
    dkron: bool = True  # Dkron has the same key
    flag: str = ""  # flag name when it differs from key (`--tag` for tags)
    reload: bool = False  # SIGHUP applies it without a restart
    secret: bool = False  # never printed, logged or echoed in an error
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    @property
    def flag_name(self) -> str:
        return f"--{self.flag or self.key}"


def _n(key: str, attr: str) -> Setting:
    return Setting(key, f"notify.{attr}", STR, "", reload=True)


SETTINGS: tuple[Setting, ...] = (
    Setting("server", "server", BOOL, "Be a server: hold the replicated state."),
    Setting(
        "bootstrap-expect",
        "bootstrap_expect",
        INT,
        "Servers to wait for before the first election (0 or 1: alone).",
        minimum=0,
    ),
    Setting("data-dir", "data_dir", STR, "Where the node keeps its state."),
    Setting("node-name", "node_name", STR, "Unique name of the node (host name)."),
    Setting(
        "bind-addr",
        "bind_addr",
        STR,
        "Gossip address to bind; its host also serves RPC.",
    ),
    Setting(
        "advertise-addr",
        "advertise_addr",
        STR,
        "Address other nodes use to reach this one (default: bind address).",
    ),
    Setting("http-addr", "http_addr", STR, "Address of the HTTP API."),
    Setting(
        "rpc-port",
        "rpc_port",
        INT,
        "gRPC port (Raft, forwarding); host of bind-addr.",
        minimum=1,
        maximum=65535,
    ),
    Setting(
        "tags",
        "tags",
        TAGS,
        "Node tags, key=value (flag repeatable); jobs target nodes by tag.",
        flag="tag",
        reload=True,
    ),
    Setting("join", "join", LIST, "Member to join at start; must answer."),
    Setting(
        "retry-join",
        "retry_join",
        LIST,
        "Member to join, retried until it works.",
    ),
    Setting(
        "retry-interval",
        "retry_interval",
        SECONDS,
        "Time between retry-join attempts.",
        minimum=0.1,
    ),
    Setting(
        "retry-max",
        "retry_max",
        INT,
        "Retry-join attempts before exiting (0: forever).",
        minimum=0,
    ),
    Setting(
        "encrypt",
        "encrypt",
        STR,
        "Gossip encryption key, base64 (cronmesh keygen).",
        secret=True,
    ),
    Setting(
        "acl-tokens",
        "acl_tokens",
        WORDS,
        "API token NAME:SCOPE:TOKEN, SCOPE read or write (flag repeatable; "
        "space-separated in the variable). A flag shows in ps: prefer "
        "acl-tokens-file.",
        dkron=False,
        flag="acl-token",
        secret=True,
    ),
    Setting(
        "acl-tokens-file",
        "acl_tokens_file",
        STR,
        "File of API tokens, one NAME:SCOPE:TOKEN a line, added to acl-tokens; "
        "its content is re-read on SIGHUP.",
        dkron=False,
    ),
    Setting(
        "tls-cert",
        "tls_cert",
        STR,
        "Serve the API over HTTPS: PEM certificate (chain).",
        dkron=False,
    ),
    Setting(
        "tls-key",
        "tls_key",
        STR,
        "The PEM key of tls-cert.",
        dkron=False,
        secret=True,
    ),
    Setting(
        "rpc-ca",
        "rpc_ca",
        STR,
        "Mutual TLS between nodes: PEM CA that signs every node (with rpc-cert "
        "and rpc-key, or none of them).",
        dkron=False,
    ),
    Setting(
        "rpc-cert",
        "rpc_cert",
        STR,
        "This node's PEM certificate, signed by rpc-ca.",
        dkron=False,
    ),
    Setting(
        "rpc-key",
        "rpc_key",
        STR,
        "The PEM key of rpc-cert.",
        dkron=False,
        secret=True,
    ),
    Setting(
        "profile",
        "profile",
        STR,
        "Gossip timing profile.",
        choices=("lan", "wan", "local"),
    ),
    Setting("region", "region", STR, "Region of the node (tag `region`)."),
    Setting("datacenter", "datacenter", STR, "Datacenter of the node (tag `dc`)."),
    Setting(
        "serf-reconnect-timeout",
        "serf_reconnect_timeout",
        SECONDS,
        "A failed member is given up (reaped) after this long.",
        minimum=1,
    ),
    Setting(
        "log-level",
        "log_level",
        STR,
        "debug, info, warn, error (Dkron's fatal and panic mean critical).",
        choices=tuple(LOG_LEVELS),
        reload=True,
    ),
    Setting(
        "log-json",
        "log_json",
        BOOL,
        "Log one JSON object per line (for log shippers).",
        dkron=False,
    ),
    Setting("mail-host", "notify.mail_host", STR, "SMTP server.", reload=True),
    Setting(
        "mail-port",
        "notify.mail_port",
        INT,
        "SMTP port (mail is sent when host and port are set).",
        reload=True,
        minimum=0,
        maximum=65535,
    ),
    Setting("mail-username", "notify.mail_username", STR, "SMTP user.", reload=True),
    Setting(
        "mail-password",
        "notify.mail_password",
        STR,
        "SMTP password; never logged or shown.",
        reload=True,
        secret=True,
    ),
    Setting("mail-from", "notify.mail_from", STR, "Sender address.", reload=True),
    Setting(
        "mail-payload",
        "notify.mail_payload",
        STR,
        "Mail body template (default: the output).",
        reload=True,
    ),
    Setting(
        "mail-subject-prefix",
        "notify.mail_subject_prefix",
        STR,
        "Put before the mail subject.",
        reload=True,
    ),
    Setting(
        "webhook-endpoint",
        "notify.webhook_endpoint",
        STR,
        "URL to POST to after each execution.",
        reload=True,
    ),
    Setting(
        "webhook-payload",
        "notify.webhook_payload",
        STR,
        "Body template of the webhook; required with the endpoint.",
        reload=True,
    ),
    Setting(
        "webhook-headers",
        "notify.webhook_headers",
        LIST,
        "Header of the webhook, 'Name: value' (repeatable).",
        reload=True,
    ),
    Setting(
        "pre-webhook-endpoint",
        "notify.pre_webhook_endpoint",
        STR,
        "URL to POST to when an execution starts.",
        reload=True,
    ),
    Setting(
        "pre-webhook-payload",
        "notify.pre_webhook_payload",
        STR,
        "Body template of the pre-webhook; required with the endpoint.",
        reload=True,
    ),
    Setting(
        "pre-webhook-headers",
        "notify.pre_webhook_headers",
        LIST,
        "Header of the pre-webhook, 'Name: value' (repeatable).",
        reload=True,
    ),
    Setting(
        "peers",
        "peers",
        PEERS,
        "Another server as name=host:rpc_port (flag repeatable).",
        dkron=False,
        flag="peer",
    ),
    Setting(
        "max-executions",
        "max_executions",
        INT,
        "Executions kept per job.",
        dkron=False,
        minimum=1,
    ),
    Setting(
        "max-output",
        "max_output",
        INT,
        "Output bytes kept per execution (the end).",
        dkron=False,
        minimum=1024,
    ),
    Setting(
        "catch-up-window",
        "catch_up_window",
        SECONDS,
        "A missed fire instant younger than this still runs, late.",
        dkron=False,
        minimum=0,
    ),
    Setting(
        "stage-ahead",
        "stage_ahead",
        SECONDS,
        "How long before its instant a scheduled run is committed and handed "
        "to its agent, which starts it at the instant (0: at the instant).",
        dkron=False,
        minimum=0,
        maximum=60,
    ),
    Setting(
        "shutdown-grace",
        "shutdown_grace",
        SECONDS,
        "Time running jobs get to finish on SIGTERM.",
        dkron=False,
        minimum=0,
    ),
    Setting(
        "execution-timeout",
        "execution_timeout",
        SECONDS,
        "Time without news of a running execution from its agent before "
        "the leader marks it failed.",
        dkron=False,
        minimum=1,
    ),
)

BY_KEY = {s.key: s for s in SETTINGS}

# Other spellings Dkron accepts: alias -> (setting, warning or "").
ALIASES = {
    "tag": ("tags", ""),
    "webhook-url": (
        "webhook-endpoint",
        "webhook-url is deprecated in Dkron; read as webhook-endpoint",
    ),
}

# Dkron keys we accept but do not act on, with what that means.
IGNORED = {
    "advertise-rpc-port": "the RPC port advertised is always rpc-port",
    "raft-multiplier": "Raft timing is not configurable",
    "ui": "cronmesh has no web UI",
    "dog-statsd-addr": "no DogStatsD metrics; scrape /metrics instead",
    "dog-statsd-tags": "no DogStatsD metrics; scrape /metrics instead",
    "statsd-addr": "no statsd metrics; scrape /metrics instead",
    "cronitor-endpoint": "no Cronitor telemetry",
    "otel-endpoint": "no OpenTelemetry traces",
    "agent-run-max-retries": "not configurable",
    "agent-run-retry-initial-interval": "not configurable",
    "agent-run-retry-max-interval": "not configurable",
    "bootstrap": "use bootstrap-expect 1",
    "devmode": "there is no development mode",
    "reconcileinterval": "not configurable",
}
# Dkron keys whose purpose cronmesh meets anyway: accepted without a word.
MOOT = {
    "enable-prometheus": "/metrics is always served",
    "disable-usage-stats": "cronmesh sends no usage statistics",
}


def env_name(setting: Setting) -> str:
    return "CRONMESH_" + setting.key.upper().replace("-", "_")


def _normal(key: str) -> str:
    return str(key).strip().lower().replace("_", "-")


# -- parsing one value ---------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float | None:
    """Seconds from `90`, `1.5` or a Go duration (`1m30s`, `500ms`, `24h`)."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return value if math.isfinite(value) else None
    if not text or _DURATION.sub("", text):
        return None
    return sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(text))


def _what(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "an empty value"
    return names.get(type(value), type(value).__name__)


def _wrong(setting: Setting, where: str, expected: str, value: Any) -> ValidationError:
    shown = "" if setting.secret else f" {value!r}"
    return ValidationError(
        f"{where}: expected {expected}, got {_what(value)}{shown}", setting.key
    )


def _items(setting: Setting, where: str, value: Any) -> list[str]:
    """A list of strings from a list, JSON text or comma-separated text."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise ValidationError(
                    f"{where}: not a JSON list: {exc}", setting.key
                ) from exc
        else:
            return [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _wrong(setting, where, "a list of strings", value)
    return list(value)


def _pairs(setting: Setting, where: str, value: Any) -> dict[str, str]:
    """A string map from a mapping, JSON text, k=v,k=v text or k=v items."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValidationError(
                f"{where}: not a JSON object: {exc}", setting.key
            ) from exc
    if isinstance(value, dict):
        found = {}
        for key, item in value.items():
            if isinstance(item, bool):
                item = "true" if item else "false"
            if not isinstance(item, str | int | float):
                raise _wrong(setting, f"{where}.{key}", "a string", item)
            found[str(key)] = str(item)
        return found
    found = {}
    for item in _items(setting, where, value):
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValidationError(f"{where}: {item!r} is not key=value", setting.key)
        found[key.strip()] = text.strip()
    return found


def parse_value(setting: Setting, value: Any, where: str) -> Any:
    """A value of `setting` from a file, the environment or a flag.

    Raises:
        ValidationError: naming `where` (the key, variable or flag) and the
            type expected; a secret's value is never repeated.
    """
    kind = setting.kind
    if kind == STR:
        if not isinstance(value, str):
            hint = " (quote it)" if isinstance(value, int | float) else ""
            raise _wrong(setting, where, "a string" + hint, value)
        result: Any = value
    elif kind == INT:
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong(setting, where, "an integer", value)
        result = value
    elif kind == BOOL:
        if isinstance(value, str) and value.strip().lower() in _BOOLS:
            value = _BOOLS[value.strip().lower()]
        if not isinstance(value, bool):
            raise _wrong(setting, where, "true or false", value)
        result = value
    elif kind == SECONDS:
        seconds = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str):
            seconds = parse_duration(value)
        if seconds is None:
            raise _wrong(setting, where, "seconds or a duration like 30s", value)
        result = seconds
    elif kind == LIST:
        result = _items(setting, where, value)
    elif kind == WORDS:
        if isinstance(value, str):
            value = value.split()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _wrong(setting, where, "a list of strings", value)
        result = list(value)
    else:  # TAGS, PEERS
        result = _pairs(setting, where, value)
    _check_range(setting, where, result)
    return result


_BOOLS = {
    "true": True,
    "1": True,
    "yes": True,
    "on": True,
    "false": False,
    "0": False,
    "no": False,
    "off": False,
}


def _check_range(setting: Setting, where: str, value: Any) -> None:
    if setting.key == "log-level":
        value = value.lower()
    if setting.choices and value not in setting.choices:
        raise ValidationError(
            f"{where}: {value!r} is not one of {', '.join(setting.choices)}",
            setting.key,
        )
    unit = "s" if setting.kind == SECONDS else ""
    if setting.minimum is not None and value < setting.minimum:
        raise ValidationError(
            f"{where}: {value:g}{unit} is below the minimum {setting.minimum:g}{unit}",
            setting.key,
        )
    if setting.maximum is not None and value > setting.maximum:
        raise ValidationError(
            f"{where}: {value:g}{unit} is above the maximum {setting.maximum:g}{unit}",
            setting.key,
        )


# -- sources -------------------------------------------------------------


def find_config_file(env: Mapping[str, str]) -> Path | None:
    """$CRONMESH_CONFIG, else the first cronmesh.{yml,yaml,toml,json} in
    /etc/cronmesh, ~/.cronmesh, ./config (the order Dkron searches)."""
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    for folder in SEARCH_DIRS:
        base = Path(folder).expanduser()
        for name in FILE_NAMES:
            if (base / name).is_file():
                return base / name
    return None


def read_config_file(path: Path) -> dict[str, Any]:
    """A config file (JSON, TOML or YAML, by suffix; YAML otherwise).

    Raises:
        ValidationError: unreadable, unparsable, or not a mapping.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValidationError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # each parser has its own error class
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        mark = getattr(exc, "problem_mark", None)  # YAML's: where it went wrong
        if mark is not None:
            problem = getattr(exc, "problem", None) or first
            first = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
        raise ValidationError(f"{path}: cannot be parsed: {first}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValidationError(f"{path}: must hold a mapping of settings")
    return data


@dataclass
class ConfigSources:
    """Where settings came from; kept by the agent so SIGHUP can re-read."""

    file: str = ""  # the file read ("" for none)
    # key -> value given; out of repr, since it may hold tokens and passwords
    flags: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Loaded:
    """The result of `load`: the config, and what to tell the operator."""

    config: AgentConfig
    sources: ConfigSources
    origin: dict[str, str]  # key -> "default", "file", "env NAME", "flag --x"
    warnings: list[str]

    def describe(self) -> list[str]:
        """One line per setting, `key = value  # origin` (secrets hidden)."""
        lines = []
        for setting in SETTINGS:
            value = _get(self.config, setting.attr)
            if setting.secret and value:
                shown = "(hidden)"
            else:
                shown = json.dumps(value, sort_keys=True)
            lines.append(f"{setting.key} = {shown}  # {self.origin[setting.key]}")
        return lines


def _resolve(key: Any, where: str, warnings: list[str]) -> Setting | None:
    """The setting a file key names; None for an ignored Dkron key."""
    name = _normal(key)
    if name in BY_KEY:
        return BY_KEY[name]
    if name in ALIASES:
        target, note = ALIASES[name]
        if note:
            warnings.append(f"{where}: {note}")
        return BY_KEY[target]
    if name in IGNORED:
        warnings.append(
            f"{where}: Dkron setting not implemented, ignored ({IGNORED[name]})"
        )
        return None
    if name in MOOT:
        return None
    known = [*BY_KEY, *ALIASES, *IGNORED, *MOOT]
    near = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ValidationError(f"{where}: unknown setting {str(key)!r}{hint}", name)


def load(
    *,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Loaded:
    """Settings from defaults < file < environment < flags, checked.

    Args:
        flags: values given on the command line, by setting key.
        env: the environment (default: os.environ).
        config_file: `--config`; None searches the usual places.

    Raises:
        ValidationError: one line naming the source, the key and the problem.
    """
    env = os.environ if env is None else env
    flags = dict(flags or {})
    warnings: list[str] = []
    values: dict[str, Any] = {}
    origin = {s.key: "default" for s in SETTINGS}
    tags: dict[str, str] = {}
    path = Path(config_file) if config_file else find_config_file(env)
    layers: list[tuple[str, list[tuple[Setting, Any, str]]]] = []
    if path is not None:
        found = []
        for key, value in read_config_file(path).items():
            setting = _resolve(key, f"{path}: {key}", warnings)
            if setting is not None:
                found.append((setting, value, f"{path}: {key}"))
        layers.append(("file", found))
    names = [(s, env_name(s)) for s in SETTINGS]
    layers.append(("env", [(s, env[n], n) for s, n in names if n in env]))
    from_flags = [(BY_KEY[k], v, BY_KEY[k].flag_name) for k, v in flags.items()]
    layers.append(("flag", from_flags))
    for source, items in layers:
        for setting, raw, where in items:
            value = parse_value(setting, raw, where)
            if setting.kind == TAGS:
                for key in value:
                    _check_tag(key, where)
                tags.update(value)
            elif setting.kind == PEERS:
                _check_peers(value, where)
                values[setting.key] = {**values.get(setting.key, {}), **value}
            else:
                values[setting.key] = value
            origin[setting.key] = "file" if source == "file" else f"{source} {where}"
    config = AgentConfig()
    for key, value in values.items():
        if key == "log-level":
            value = LOG_LEVELS[value.lower()]
        _set(config, BY_KEY[key].attr, value)
    config.tags = tags
    _check_whole(config)
    warnings += config.notify.warnings()
    sources = ConfigSources(file=str(path) if path else "", flags=flags)
    return Loaded(config, sources, origin, warnings)


def _check_tag(key: str, where: str) -> None:
    if key in RESERVED_TAGS:
        raise ValidationError(
            f"{where}: tag {key!r} is reserved (set by the agent itself)", "tags"
        )
    if not key:
        raise ValidationError(f"{where}: a tag needs a name", "tags")


def _check_peers(peers: dict[str, str], where: str) -> None:
    for name, address in peers.items():
        if not name or ":" not in address:
            raise ValidationError(
                f"{where}: {name}={address} is not name=host:port", "peers"
            )


def _check_whole(config: AgentConfig) -> None:
    """Rules about values, once all sources are merged."""
    if config.encrypt:
        try:
            decode_key(config.encrypt)
        except ValidationError as exc:
            raise ValidationError(f"encrypt: {exc}", "encrypt") from exc
    if not config.node_name:
        raise ValidationError("node-name: must not be empty", "node-name")
    if len(config.node_name.encode()) > 128:
        raise ValidationError("node-name: longer than 128 bytes", "node-name")
    if not config.data_dir:
        raise ValidationError("data-dir: must not be empty", "data-dir")
    parse_addr(config.http_addr, 8080, "http-addr")
    parse_addr(config.bind_addr, 8946, "bind-addr")
    if config.advertise_addr:
        parse_addr(config.advertise_addr, 8946, "advertise-addr")
    config.notify.validate()


def check_security(config: AgentConfig) -> int:
    """Read every security file now rather than at first use: the tokens
    (entries and file), the HTTPS pair, the three mutual-TLS files.

    Kept out of `load` so that SIGHUP, which re-reads the tokens file on
    its own, keeps the other settings it reloads when that file is broken.
    Returns the number of API tokens.

    Raises:
        ValidationError: naming the flag and file; never a token or key.
    """
    acl = AccessList.load(config.acl_tokens, config.acl_tokens_file)
    check_http_tls(config.tls_cert, config.tls_key)
    RpcSecurity.from_files(config.rpc_ca, config.rpc_cert, config.rpc_key)
    return len(acl.tokens)


def _get(config: AgentConfig, attr: str) -> Any:
    target: Any = config
    for part in attr.split("."):
        target = getattr(target, part)
    return target


def _set(config: AgentConfig, attr: str, value: Any) -> None:
    *path, last = attr.split(".")
    target: Any = config
    for part in path:
        target = getattr(target, part)
    setattr(target, last, value)


# -- SIGHUP --------------------------------------------------------------


@dataclass
class Reloaded:
    """What SIGHUP applies, and what it found changed but cannot apply."""

    tags: dict[str, str]
    log_level: str
    notify: NotifySettings
    needs_restart: list[str]
    warnings: list[str]


def reload(current: AgentConfig, sources: ConfigSources) -> Reloaded:
    """Read every source again, the way the agent was started.

    Raises:
        ValidationError: the new settings are invalid (keep the old ones).
    """
    fresh = load(flags=sources.flags, config_file=sources.file or None)
    changed = [
        s.key
        for s in SETTINGS
        if not s.reload
        and s.key != "node-name"
        and _get(fresh.config, s.attr) != _get(current, s.attr)
    ]
    return Reloaded(
        tags=fresh.config.tags,
        log_level=fresh.config.log_level,
        notify=fresh.config.notify,
        needs_restart=changed,
        warnings=fresh.warnings,
    )


# -- documentation -------------------------------------------------------


def default_text(setting: Setting, defaults: AgentConfig) -> str:
    """A setting's default as the docs and --help show it ("" for none)."""
    if setting.key == "node-name":
        return "host name"
    value = _get(defaults, setting.attr)
    if value in ("", [], {}):
        return ""
    if setting.kind == SECONDS:
        return f"{value:g}s"
    return json.dumps(value) if not isinstance(value, str) else value


def markdown_table() -> str:
    """The table of settings in docs/configuration.md."""
    defaults = AgentConfig()
    rows = [
        "| key | environment | Dkron | default | SIGHUP | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        shown = default_text(s, defaults)
        shown = f"`{shown}`" if shown and s.key != "node-name" else shown
        flag = f" (flag `{s.flag_name}`)" if s.flag else ""
        rows.append(
            f"| `{s.key}`{flag} | `{env_name(s)}` | {'same' if s.dkron else '-'} "
            f"| {shown} | {'yes' if s.reload else ''} | {s.help} |"
        )
    return "\n".join(rows) + "\n"


def apply_reload(config: AgentConfig) -> str:
    """SIGHUP: put the reloadable settings into `config`, log what changed.

    Returns "" when applied (or nothing to re-read), else why the new
    settings are invalid (and then nothing is changed).
    """
    if not isinstance(config.sources, ConfigSources):
        log.info("configuration not reloaded: the agent was not started from one")
        return ""
    try:
        fresh = reload(config, config.sources)
    except ValidationError as exc:
        log.error("reload failed, keeping the old settings: %s", exc)
        return str(exc)
    for warning in fresh.warnings:
        log.warning("%s", warning)
    config.tags = fresh.tags
    config.log_level = fresh.log_level
    config.notify = fresh.notify
    logging.getLogger().setLevel(fresh.log_level.upper())
    if fresh.needs_restart:
        log.warning(
            "changed settings apply after a restart keys=%s",
            ",".join(fresh.needs_restart),
        )
    log.info(
        "configuration reloaded tags=%s log_level=%s",
        ",".join(f"{k}={v}" for k, v in sorted(fresh.tags.items())),
        fresh.log_level,
    )
    return ""
