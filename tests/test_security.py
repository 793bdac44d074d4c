"""API tokens, HTTPS for the API, mutual TLS between servers, and secrets
kept out of logs and answers: real agents on loopback."""

from __future__ import annotations

import asyncio
import re
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from conftest import AgentProcess, shell_job
from fastapi.routing import APIRoute
from tls_certs import Authority
from typer.testing import CliRunner

from cronmesh.api.acl import AccessList
from cronmesh.api.app import create_app
from cronmesh.cli.main import app
from cronmesh.gossip.keyring import generate_key
from cronmesh.rpc.tls import RpcSecurity

READ = "reader-0123456789abcdef-read"
WRITE = "writer-fedcba9876543210-write"


def cli(*args: str, env: dict[str, str] | None = None) -> SimpleNamespace:
    """The `cronmesh` command, run in this process (no start-up per call)."""
    env = {"CRONMESH_TOKEN": "", "CRONMESH_CA_CERT": "", **(env or {})}
    result = CliRunner().invoke(app, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return SimpleNamespace(
        returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr
    )


def tokens_file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "tokens"
    path.write_text("# name:scope:token\n" + "\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def with_token(node: AgentProcess, token: str) -> AgentProcess:
    node.http.headers["Authorization"] = f"Bearer {token}"
    return node


def app_routes() -> list[tuple[str, str]]:
    """(method, path) of every route the API serves, path parameters
    filled with names that do not exist."""
    stub = SimpleNamespace(node_name="x", acl=AccessList([]), cluster=object())
    found = []
    for route in create_app(stub).routes:  # type: ignore[arg-type]
        if not isinstance(route, APIRoute):
            continue
        path = re.sub(r"\{(\w+)\}", r"no-such-\1", route.path)
        found += [(method, path) for method in sorted(route.methods)]
    return sorted(set(found))


@pytest.fixture
def secured(agent_factory: Any, tmp_path: Path) -> AgentProcess:
    path = tokens_file(tmp_path, f"ops:read:{READ}", f"ci:write:{WRITE}")
    node = agent_factory("--acl-tokens-file", str(path), start=False)
    return with_token(node, WRITE).start()


def test_every_route_needs_a_token_with_the_right_scope(secured: AgentProcess) -> None:
    routes = app_routes()
    assert ("GET", "/v1/jobs") in routes and ("POST", "/v1/leave") in routes
    client = httpx.Client(base_url=secured.url, timeout=10)
    bearer_read = {"Authorization": f"Bearer {READ}"}
    dkron_write = {"X-Dkron-Token": WRITE}
    for method, path in routes:
        if path == "/v1/leave":
            continue  # stops the agent: last
        anonymous = client.request(method, path)
        if path == "/health":
            assert anonymous.status_code == 200, anonymous.text
            continue
        where = f"{method} {path}"
        assert anonymous.status_code == 401, where
        assert "missing API token" in anonymous.json()["error"], where
        assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = client.request(method, path, headers={"X-Dkron-Token": READ + "x"})
        assert wrong.status_code == 401, where
        read = client.request(method, path, headers=bearer_read)
        write = client.request(method, path, headers=dkron_write)
        assert write.status_code not in (401, 403), where
        if method == "GET":
            assert read.status_code == write.status_code, where
        else:
            assert read.status_code == 403, where
            assert "'ops' has read scope" in read.json()["error"]
    # Both headers carry either token; a write token changes state.
    created = client.post(
        "/v1/jobs",
        json=shell_job("t", "true"),
        headers={"Authorization": f"Bearer {WRITE}"},
    )
    assert created.status_code == 201, created.text
    listed = client.get("/v1/jobs", headers={"X-Dkron-Token": READ})
    assert [j["name"] for j in listed.json()] == ["t"]
    assert client.post("/v1/leave", headers=bearer_read).status_code == 403
    assert client.post("/v1/leave").status_code == 401
    assert client.post("/v1/leave", headers=dkron_write).status_code == 200
    assert secured.proc is not None
    assert secured.proc.wait(30) == 0


def test_cli_sends_the_token_from_flag_or_environment(secured: AgentProcess) -> None:
    job = secured.data_dir.parent / "job.json"
    job.write_text(
        '{"name": "c", "schedule": "@manually", "executor": "shell", '
        '"executor_config": {"command": "true"}}'
    )
    url = ["--address", secured.url]
    anonymous = cli("jobs", "list", *url)
    assert anonymous.returncode == 1
    assert "missing API token" in anonymous.stderr and "HTTP 401" in anonymous.stderr
    assert cli("jobs", "list", *url, "--token", READ).returncode == 0
    refused = cli("jobs", "apply", "-f", str(job), *url, "--token", READ)
    assert refused.returncode == 1 and "HTTP 403" in refused.stderr
    applied = cli("jobs", "apply", "-f", str(job), *url, env={"CRONMESH_TOKEN": WRITE})
    assert applied.returncode == 0, applied.stderr
    shown = cli("jobs", "show", "c", "--json", *url, env={"CRONMESH_TOKEN": READ})
    assert shown.returncode == 0 and '"name": "c"' in shown.stdout
    members = cli("members", *url, env={"CRONMESH_TOKEN": READ})
    assert members.returncode == 0, members.stderr
    # backup and restore take --token too.
    saved = secured.data_dir.parent / "backup.json"
    assert cli("backup", "-o", str(saved), *url).returncode == 1
    backed = cli("backup", "-o", str(saved), *url, "--token", WRITE)
    assert backed.returncode == 0, backed.stderr
    assert '"name": "c"' in saved.read_text() or '"name":"c"' in saved.read_text()
    checked = cli("restore", str(saved), "--dry-run", *url, "--token", WRITE)
    assert checked.returncode == 0, checked.stderr


def test_secrets_stay_out_of_logs_errors_and_answers(
    agent_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gossip_key = generate_key()
    env_token = "envtoken-aabbccddeeff00112233"
    path = tokens_file(tmp_path, f"ops:read:{READ}", f"ci:write:{WRITE}")
    node = agent_factory(
        "--acl-tokens-file",
        str(path),
        "--encrypt",
        gossip_key,
        "--log-level",
        "debug",
        start=False,
    )
    monkeypatch.setenv("CRONMESH_ACL_TOKENS", f"env:read:{env_token}")
    with_token(node, WRITE).start()
    guess = WRITE[:-1] + "?"  # a wrong token must not be echoed either
    secrets = [READ, WRITE, env_token, gossip_key, guess]
    seen: list[str] = []
    client = httpx.Client(base_url=node.url, timeout=10)
    from_env = client.get("/v1/jobs", headers={"Authorization": f"Bearer {env_token}"})
    assert from_env.status_code == 200
    node.post_job(shell_job("j", "echo hi"))
    node.http.post("/v1/jobs/j/run")
    node.finished("j")
    for method, path in app_routes():
        if method == "GET":
            for headers in ({}, {"X-Dkron-Token": WRITE}, {"X-Dkron-Token": READ}):
                answer = client.get(path.replace("no-such-job", "j"), headers=headers)
                seen.append(str(answer.headers) + answer.text)
    for answer in (
        client.post("/v1/jobs", headers={"X-Dkron-Token": READ}, json={}),
        client.post("/v1/jobs", headers={"X-Dkron-Token": WRITE}, content=b"{"),
        client.get("/v1/jobs", headers={"X-Dkron-Token": guess}),
    ):
        seen.append(str(answer.headers) + answer.text)
    # Rotation: SIGHUP re-reads the file; a broken file keeps the old tokens.
    rotated = "rotated-read-token-5566778899"
    secrets.append(rotated)
    tokens_file(tmp_path, f"ops2:read:{rotated}", f"ci:write:{WRITE}")
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)
    node.wait_for("reload", lambda: "api tokens reloaded" in node.log())
    assert client.get("/v1/jobs", headers={"X-Dkron-Token": READ}).status_code == 401
    assert client.get("/v1/jobs", headers={"X-Dkron-Token": rotated}).status_code == 200
    tokens_file(tmp_path, f"ops2:read:{rotated}", f"ci:write:{WRITE}", "broken")
    node.proc.send_signal(signal.SIGHUP)
    node.wait_for("refused reload", lambda: "api tokens not reloaded" in node.log())
    assert client.get("/v1/jobs", headers={"X-Dkron-Token": rotated}).status_code == 200
    assert node.stop() == 0
    seen.append(node.log())
    # Refusals are logged at debug, by token name.
    assert "api token lacks write scope token=ops POST /v1/jobs" in node.log()
    for text in seen:
        for secret in secrets:
            assert secret not in text
    # A rejected token names where it came from, never its value.
    bad = "shortsecret"
    refused = cli(
        "agent", "--data-dir", str(tmp_path / "x"), "--acl-token", f"me:write:{bad}"
    )
    assert refused.returncode == 2 and "--acl-token" in refused.stderr
    assert bad not in refused.stderr
    scope = cli(
        "agent", "--data-dir", str(tmp_path / "x"), "--acl-token", f"me:admin:{WRITE}"
    )
    assert scope.returncode == 2 and "'admin'" in scope.stderr
    assert WRITE not in scope.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    base = tmp_path_factory.mktemp("pki")
    good = Authority(base / "good", "good-ca")
    bad = Authority(base / "bad", "bad-ca")
    yield SimpleNamespace(good=good, bad=bad)


def test_https_api_needs_the_ca_that_signed_it(
    agent_factory: Any, pki: SimpleNamespace
) -> None:
    pair = pki.good.issue("http")
    node = agent_factory(
        "--tls-cert",
        str(pair.cert),
        "--tls-key",
        str(pair.key),
        "--acl-token",
        f"ci:write:{WRITE}",
        start=False,
    )
    node.url = node.url.replace("http://", "https://")
    node.http = httpx.Client(
        base_url=node.url,
        timeout=10,
        verify=ssl.create_default_context(cafile=str(pki.good.ca_file)),
    )
    with_token(node, WRITE).start()
    url = ["--address", node.url, "--token", WRITE]
    listed = cli("jobs", "list", "--json", *url, "--ca-cert", str(pki.good.ca_file))
    assert listed.returncode == 0 and listed.stdout.strip() == "[]", listed.stderr
    by_env = cli("members", *url, env={"CRONMESH_CA_CERT": str(pki.good.ca_file)})
    assert by_env.returncode == 0, by_env.stderr
    unknown = cli("jobs", "list", *url, "--ca-cert", str(pki.bad.ca_file))
    assert unknown.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in unknown.stderr
    system = cli("jobs", "list", *url, env={"CRONMESH_CA_CERT": ""})
    assert system.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in system.stderr
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
        httpx.get(node.url.replace("https://", "http://") + "/health")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rpc-ca", "{good_ca}"], "--rpc-cert, --rpc-key: required"),
        (
            [
                "--rpc-ca",
                "{good_ca}",
                "--rpc-cert",
                "{rogue_cert}",
                "--rpc-key",
                "{rogue_key}",
            ],
            "is not signed by the CA",
        ),
        (
            [
                "--rpc-ca",
                "{good_ca}",
                "--rpc-cert",
                "{node_cert}",
                "--rpc-key",
                "{rogue_key}",
            ],
            "is not the key of the certificate",
        ),
        (
            [
                "--rpc-ca",
                "{node_key}",
                "--rpc-cert",
                "{node_cert}",
                "--rpc-key",
                "{node_key}",
            ],
            "--rpc-ca: {node_key} holds no PEM certificate",
        ),
        (
            [
                "--rpc-ca",
                "/nonexistent/ca.pem",
                "--rpc-cert",
                "{node_cert}",
                "--rpc-key",
                "{node_key}",
            ],
            "--rpc-ca: cannot read /nonexistent/ca.pem",
        ),
        (["--tls-cert", "{node_cert}"], "--tls-key: required"),
        (
            ["--tls-cert", "{node_cert}", "--tls-key", "{rogue_key}"],
            "--tls-key: {rogue_key} does not go with",
        ),
        (
            ["--acl-tokens-file", "/nonexistent/tokens"],
            "--acl-tokens-file: cannot read /nonexistent/tokens",
        ),
    ],
)
def test_bad_security_flags_exit_2_naming_the_flag_and_file(
    tmp_path: Path, pki: SimpleNamespace, flags: list[str], message: str
) -> None:
    node = pki.good.issue("flags")
    rogue = pki.bad.issue("flags")
    names = {
        "good_ca": str(pki.good.ca_file),
        "node_cert": str(node.cert),
        "node_key": str(node.key),
        "rogue_cert": str(rogue.cert),
        "rogue_key": str(rogue.key),
    }
    args = [f.format(**names) for f in flags]
    result = cli(
        "agent", "--data-dir", str(tmp_path / "d"), "--http-addr", "127.0.0.1:0", *args
    )
    assert result.returncode == 2, result.stderr
    assert message.format(**names) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def rpc_flags(authority: Authority, name: str) -> list[str]:
    pair = authority.issue(name)
    return [
        "--rpc-ca",
        str(authority.ca_file),
        "--rpc-cert",
        str(pair.cert),
        "--rpc-key",
        str(pair.key),
    ]


def test_mutual_tls_cluster_refuses_servers_without_our_certificate(
    agent_factory: Any, pki: SimpleNamespace, tmp_path: Path
) -> None:
    tokens = tokens_file(tmp_path, f"ops:read:{READ}", f"ci:write:{WRITE}")
    secured = ["--acl-tokens-file", str(tokens)]
    good = [
        agent_factory(
            *rpc_flags(pki.good, f"s{i}"), *secured, name=f"s{i}", start=False
        )
        for i in (1, 2)
    ]
    for node in good:
        node.extra += ["--bootstrap-expect", "2"]
        with_token(node, WRITE)
    good[1].extra += ["--retry-join", good[0].gossip_addr, "--retry-interval", "0.5"]
    for node in good:
        node.start(wait=False)
    for node in good:
        node.wait_ready(timeout=60)
    # A write on either server reaches the leader over mutual TLS.
    for node in good:
        answer = node.post_job(shell_job(f"from-{node.name}", "true"))
        assert answer.status_code == 201, answer.text
    for node in good:
        node.wait_for(
            "both jobs", lambda n=node: len(n.http.get("/v1/jobs").json()) == 2
        )
    leader = next(n for n in good if n.http.get("/v1/isleader").status_code == 200)
    # An agent without --server, with our certificate, gets a job dispatched
    # to it and reports the result, both over mutual TLS. The API requests
    # it passes on to a server carry the caller's token, checked there.
    worker = agent_factory(
        *rpc_flags(pki.good, "w1"),
        *secured,
        "--tag", "role=worker",
        "--retry-join", good[0].gossip_addr,
        "--retry-interval", "0.5",
        name="w1",
        server=False,
        start=False,
    )  # fmt: skip
    with_token(worker, WRITE).start()
    job = shell_job("on-worker", "echo from-worker", tags={"role": "worker"})
    assert leader.post_job(job).status_code == 201
    plain = httpx.Client(base_url=worker.url, timeout=10)
    run_path = "/v1/jobs/on-worker/run"
    assert plain.post(run_path).status_code == 401
    assert plain.post(run_path, headers={"X-Dkron-Token": READ}).status_code == 403
    assert plain.get("/v1/jobs", headers={"X-Dkron-Token": READ}).status_code == 200
    assert worker.http.post(run_path).status_code == 202
    (run,) = leader.finished("on-worker", timeout=30)
    assert (run["node_name"], run["success"]) == ("w1", True), run
    assert "from-worker" in run["output"]
    # s3: a certificate from another CA; s4: no TLS at all.
    rogues = [
        agent_factory(*rpc_flags(pki.bad, "s3"), name="s3", start=False),
        agent_factory(name="s4", start=False),
    ]
    for node in rogues:
        node.extra += [
            "--bootstrap-expect",
            "2",
            "--retry-join",
            good[0].gossip_addr,
            "--retry-interval",
            "0.5",
        ]
        node.start(wait=False)
    for rogue in rogues:
        leader.wait_for(
            f"the leader to refuse {rogue.name}",
            lambda r=rogue: re.search(
                rf"server not added to raft: .*node={r.name} .*(?i:handshake)",
                leader.log(),
            ),
            timeout=60,
        )
    alive = {
        m["Name"]
        for m in leader.http.get("/v1/members").json()
        if m["statusText"] == "alive"
    }
    assert alive == {"s1", "s2", "s3", "s4", "w1"}
    peers = leader.http.get("/v1/raft/peers").json()
    assert sorted(p["ID"] for p in peers) == ["s1", "s2"]
    # The receiving side: a server refuses callers without our certificate
    # at the handshake, and says so in its log.
    target = f"127.0.0.1:{leader.rpc_port}"

    async def probes() -> list[str | None]:
        return [
            await RpcSecurity.from_files(
                str(pki.good.ca_file), *map(str, _pair(pki.good.issue("probe")))
            ).check(target),
            await RpcSecurity.from_files(
                str(pki.bad.ca_file), *map(str, _pair(pki.bad.issue("probe")))
            ).check(target),
            await RpcSecurity().check(target),
        ]

    ours, foreign, plain = asyncio.run(probes())
    assert ours is None
    assert foreign is not None and "handshake" in foreign.lower()
    assert plain is not None and "UNAVAILABLE" in plain
    assert "Handshake failed" in leader.log()


def _pair(pair: Any) -> tuple[Path, Path]:
    return pair.cert, pair.key
