"""Agent configuration: sources, precedence, Dkron's keys, errors, --check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cronmesh.cli.main import app
from cronmesh.config import (
    IGNORED,
    SETTINGS,
    check_security,
    env_name,
    load,
    markdown_table,
    parse_duration,
)
from cronmesh.errors import ValidationError
from tests.conftest import REPO, free_port
from tests.tls_certs import Authority


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The test's environment without CRONMESH_* and with a private HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRONMESH_")}
    return {**env, "HOME": str(home), **extra}


def check(
    cwd: Path, *args: str, **env: str
) -> tuple[int, dict[str, tuple[Any, str]], str]:
    """`cronmesh agent --check` in this process, from `cwd` with HOME=cwd;
    (exit code, key -> (value, origin), stderr)."""
    here = Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(
            app,
            ["agent", "--check", *args],
            env={
                **{k: None for k in os.environ if k.startswith("CRONMESH_")},
                "HOME": str(cwd),
                **env,
            },
        )
    finally:
        os.chdir(here)
    shown: dict[str, tuple[Any, str]] = {}
    for line in result.stdout.splitlines():
        if line.startswith("#"):
            continue
        key, _, rest = line.partition(" = ")
        value, _, origin = rest.rpartition("  # ")
        shown[key] = (value if value == "(hidden)" else json.loads(value), origin)
    return result.exit_code, shown, result.stderr


def test_precedence_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    config = tmp_path / "agent.yml"
    config.write_text(
        "rpc-port: 1111\nnode-name: from-file\ndata-dir: /srv/file\n"
        "tags:\n  zone: a\n  rack: r1\n"
    )
    code, shown, err = check(
        tmp_path,
        "--config",
        str(config),
        "--rpc-port",
        "3333",
        "--tag",
        "rack=r3",
        CRONMESH_RPC_PORT="2222",
        CRONMESH_NODE_NAME="from-env",
        CRONMESH_TAGS="zone=b,os=linux",
    )
    assert code == 0, err
    assert shown["rpc-port"] == (3333, "flag --rpc-port")
    assert shown["node-name"] == ("from-env", "env CRONMESH_NODE_NAME")
    assert shown["data-dir"] == ("/srv/file", "file")
    assert shown["max-executions"] == (100, "default")
    # Tags merge key by key, the stronger source winning each key.
    assert shown["tags"][0] == {"zone": "b", "rack": "r3", "os": "linux"}


@pytest.mark.parametrize(
    ("name", "text"),
    [
        (
            "c.yaml",
            "server: true\nrpc-port: 7000\nretry-join: [10.0.0.1]\n"
            "retry-interval: 1m30s\ntags: {zone: a}\n",
        ),
        (
            "c.toml",
            'server = true\nrpc-port = 7000\nretry-join = ["10.0.0.1"]\n'
            'retry-interval = "1m30s"\n[tags]\nzone = "a"\n',
        ),
        (
            "c.json",
            '{"server": true, "rpc-port": 7000, "retry-join": ["10.0.0.1"],'
            ' "retry-interval": 90, "tags": {"zone": "a"}}',
        ),
    ],
)
def test_each_file_format(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    config = load(config_file=path, env={}).config
    assert config.server is True
    assert config.rpc_port == 7000
    assert config.retry_join == ["10.0.0.1"]
    assert config.retry_interval == 90.0
    assert config.tags == {"zone": "a"}


def test_a_broken_yaml_file_names_the_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("server: true\ntags: [a, b\nnode-name: x\n")
    with pytest.raises(ValidationError) as caught:
        load(config_file=path, env={})
    message = str(caught.value)
    assert message.startswith(f"{path}: cannot be parsed: line 3, column 10:"), message
    assert "\n" not in message


DKRON_YML = """\
# A dkron.yml as Dkron's docs show one.
server: true
bootstrap-expect: 3
data-dir: /var/lib/dkron
log-level: warn
tags:
  dc2: east
encrypt: 6pFBxMZ6cbgNRiAn8ufyHQ==
retry-join:
  - 10.0.0.1
  - 10.0.0.2
raft-multiplier: 1
ui: true
enable-prometheus: true
serf-reconnect-timeout: 5s
webhook-url: https://hooks.example.com/services/XXXX
webhook-payload: "payload={\\"text\\": \\"{{.Report}}\\", \\"channel\\": \\"#foo\\"}"
webhook-headers: Content-Type:application/x-www-form-urlencoded
mail-host: email-smtp.eu-west-1.amazonaws.com
mail-port: 25
mail-username: mailuser
mail-password: mailpassword
mail-from: cron@example.com
mail-subject_prefix: "[Dkron]"
mail-payload: "Job {{.JobName}} finished with status {{.Success}} on {{.NodeName}}"
"""


def test_renamed_dkron_yml_is_read_with_dkron_names(tmp_path: Path) -> None:
    path = tmp_path / "config" / "cronmesh.yml"  # dkron.yml, renamed
    path.parent.mkdir()
    path.write_text(DKRON_YML)
    code, shown, err = check(tmp_path)  # found in ./config, no --config
    assert code == 0, err
    assert shown["server"] == (True, "file")
    assert shown["bootstrap-expect"][0] == 3
    assert shown["log-level"][0] == "warning"
    assert shown["serf-reconnect-timeout"][0] == 5.0
    assert shown["retry-join"][0] == ["10.0.0.1", "10.0.0.2"]
    assert shown["webhook-endpoint"][0] == "https://hooks.example.com/services/XXXX"
    assert shown["webhook-headers"][0] == [
        "Content-Type:application/x-www-form-urlencoded"
    ]
    assert shown["mail-subject-prefix"][0] == "[Dkron]"
    assert shown["mail-password"][0] == "(hidden)"
    assert shown["encrypt"][0] == "(hidden)"
    assert "mailpassword" not in err
    # Accepted but not implemented: a warning naming each.
    assert "raft-multiplier: Dkron setting not implemented" in err
    assert "ui: Dkron setting not implemented" in err
    assert "webhook-url is deprecated" in err
    assert "enable-prometheus" not in err  # /metrics is always on


def test_unknown_key_is_rejected_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("rpc-port: 7000\nbind-adr: 127.0.0.1\n")
    code, _, err = check(tmp_path, "--config", str(path))
    assert code == 2
    assert err.count("\n") == 1, err
    assert "bind-adr: unknown setting" in err and "did you mean 'bind-addr'" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rpc-port: many", "rpc-port: expected an integer, got a string 'many'"),
        ("server: 3", "server: expected true or false, got an integer 3"),
        ("retry-join: 10.0.0.1", None),  # one string is a list of one
        ("node-name: [a, b]", "node-name: expected a string, got a list"),
        ("tags: [zone]", "tags: 'zone' is not key=value"),
        ("retry-interval: soon", "retry-interval: expected seconds or a duration"),
        ("profile: fast", "profile: 'fast' is not one of lan, wan, local"),
        ("mail-password: 123456", "mail-password: expected a string (quote it)"),
        ("rpc-port: 70000", "rpc-port: 70000 is above the maximum 65535"),
        ("tags: {server: 'yes'}", "tag 'server' is reserved"),
        ("webhook-payload: '{{if .Success}}ok{{end}}'", "webhook-payload: {{if"),
        ("webhook-headers: [NoColon]", "webhook-headers: 'NoColon' is not"),
        ("encrypt: short", "encrypt:"),
    ],
)
def test_wrong_values_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.yml"
    path.write_text(text + "\n")
    if expected is None:
        load(config_file=path, env={})
        return
    with pytest.raises(ValidationError) as caught:
        load(config_file=path, env={})
    assert expected in str(caught.value)
    assert "123456" not in str(caught.value)  # a secret is never echoed


def test_wrong_type_in_cli_is_one_line_exit_2(tmp_path: Path) -> None:
    code, _, err = check(tmp_path, CRONMESH_RETRY_MAX="twice")
    assert code == 2
    assert err == (
        "cronmesh: error: CRONMESH_RETRY_MAX: expected an integer, "
        "got a string 'twice'\n"
    )


def test_env_formats(tmp_path: Path) -> None:
    env = {
        "CRONMESH_SERVER": "true",
        "CRONMESH_TAGS": '{"zone": "a", "os": "linux"}',
        "CRONMESH_RETRY_JOIN": "10.0.0.1:8946, 10.0.0.2:8946",
        "CRONMESH_WEBHOOK_HEADERS": '["X-A: 1,2", "X-B: 3"]',
        "CRONMESH_SHUTDOWN_GRACE": "2m",
        "CRONMESH_ADDRESS": "http://127.0.0.1:1",  # the client's, not ours
    }
    config = load(env=env, config_file=_empty(tmp_path)).config
    assert config.server is True
    assert config.tags == {"zone": "a", "os": "linux"}
    assert config.retry_join == ["10.0.0.1:8946", "10.0.0.2:8946"]
    assert config.notify.webhook_headers == ["X-A: 1,2", "X-B: 3"]
    assert config.shutdown_grace == 120.0


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.yml"
    path.write_text("")
    return path


def test_search_order_home_before_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if Path("/etc/cronmesh").exists():
        pytest.skip("/etc/cronmesh exists on this machine and would be found first")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "cronmesh.json").write_text('{"rpc-port": 1}')
    loaded = load(env={})
    assert loaded.config.rpc_port == 1
    (tmp_path / ".cronmesh").mkdir()
    (tmp_path / ".cronmesh" / "cronmesh.toml").write_text("rpc-port = 2\n")
    loaded = load(env={})
    assert loaded.config.rpc_port == 2
    assert loaded.sources.file == str(tmp_path / ".cronmesh" / "cronmesh.toml")


def test_reserved_tag_in_config_file_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"tags": {"region": "eu"}}))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cronmesh",
            "agent",
            "--config",
            str(path),
            "--data-dir",
            str(tmp_path / "data"),
            "--http-addr",
            f"127.0.0.1:{free_port()}",
            "--bind-addr",
            f"127.0.0.1:{free_port()}",
            "--rpc-port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_clean_env(tmp_path, PYTHONPATH=str(REPO)),
        timeout=60,
    )
    assert result.returncode == 2
    assert "tag 'region' is reserved" in result.stderr
    assert not (tmp_path / "data").exists()


def test_durations() -> None:
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("500ms") == 0.5
    assert parse_duration("24h") == 86400.0
    assert parse_duration("2.5") == 2.5
    assert parse_duration("5 minutes") is None
    assert parse_duration("") is None


def test_every_setting_has_a_flag_and_is_documented() -> None:
    command = typer.main.get_command(app).commands["agent"]  # type: ignore[attr-defined]
    flags = {opt for param in command.params for opt in param.opts}
    docs = (REPO / "docs" / "configuration.md").read_text()
    assert markdown_table() in docs, (
        "docs/configuration.md is stale: paste cronmesh.config.markdown_table()"
    )
    for setting in SETTINGS:
        assert setting.flag_name in flags
        assert f"`{env_name(setting)}`" in docs
    for key in IGNORED:
        assert f"`{key}`" in docs


ENV_TOKENS = "ci:write:" + "c" * 24 + " ro:read:" + "r" * 24
FLAG_TOKEN = "ops:write:" + "o" * 24


def test_security_settings_flag_replaces_env_tokens_file_adds(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("file:read:" + "f" * 24 + "\n")
    tokens_file.chmod(0o600)
    env = {"CRONMESH_ACL_TOKENS": ENV_TOKENS}
    base = {"data-dir": str(tmp_path), "acl-tokens-file": str(tokens_file)}
    from_env = load(flags=base, env=env, config_file=_empty(tmp_path)).config
    assert [t.split(":")[0] for t in from_env.acl_tokens] == ["ci", "ro"]
    assert check_security(from_env) == 3
    loaded = load(
        flags={**base, "acl-tokens": [FLAG_TOKEN]},
        env=env,
        config_file=_empty(tmp_path),
    )
    flagged = loaded.config
    assert [t.split(":")[0] for t in flagged.acl_tokens] == ["ops"]
    assert check_security(flagged) == 2
    flagged.sources = loaded.sources  # as the agent keeps them for SIGHUP
    assert "o" * 24 not in repr(flagged)
    ca = Authority(tmp_path / "ca", "test-ca")
    node = ca.issue("node")
    code, shown, err = check(
        tmp_path,
        "--acl-token",
        FLAG_TOKEN,
        "--rpc-ca",
        str(ca.ca_file),
        "--rpc-cert",
        str(node.cert),
        "--rpc-key",
        str(node.key),
        CRONMESH_ACL_TOKENS=ENV_TOKENS,
    )
    assert code == 0, err
    assert shown["acl-tokens"] == ("(hidden)", "flag --acl-token")
    assert shown["rpc-key"] == ("(hidden)", "flag --rpc-key")
    assert shown["rpc-ca"] == (str(ca.ca_file), "flag --rpc-ca")


def test_broken_security_files_stop_check_naming_flag_and_file(tmp_path: Path) -> None:
    ca = Authority(tmp_path / "ca", "test-ca")
    code, _, err = check(tmp_path, "--rpc-ca", str(ca.ca_file))
    assert code == 2
    assert "--rpc-cert" in err and "--rpc-key" in err
    missing = tmp_path / "missing.pem"
    code, _, err = check(
        tmp_path, "--tls-cert", str(missing), "--tls-key", str(missing)
    )
    assert code == 2
    assert f"--tls-cert: cannot read {missing}" in err
    bad = tmp_path / "tokens"
    bad.write_text("no-scope-here\n")
    code, _, err = check(tmp_path, CRONMESH_ACL_TOKENS_FILE=str(bad))
    assert code == 2
    assert f"--acl-tokens-file {bad} line 1" in err
