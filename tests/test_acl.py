"""Token parsing and matching, and the agent's start-up security warnings."""

from __future__ import annotations

from pathlib import Path

import pytest

from cronmesh.agent import AgentConfig
from cronmesh.api.acl import AccessList, parse_token, presented_token
from cronmesh.cli.agent_cmd import security_warnings
from cronmesh.errors import ValidationError

VALUE = "0123456789abcdef:with-colon"


def test_parse_token_keeps_colons_in_the_value_and_only_a_digest() -> None:
    token = parse_token(f"ci:write:{VALUE}", "--acl-token")
    assert (token.name, token.scope) == ("ci", "write")
    assert VALUE not in repr(token)
    assert AccessList([token]).match(VALUE) == token
    assert AccessList([token]).match(VALUE + "x") is None


@pytest.mark.parametrize(
    ("entry", "message", "secret"),
    [
        ("ci:write", "expected NAME:SCOPE:TOKEN", None),
        (f":write:{VALUE}", "expected NAME:SCOPE:TOKEN", VALUE),
        (f"ci:admin:{VALUE}", "token 'ci' has scope 'admin'", VALUE),
        ("ci:read:tiny-val", "'ci' is shorter than 16", "tiny-val"),
        (f"ci:read: {VALUE}", "spaces around it", VALUE),
    ],
)
def test_bad_entries_name_the_problem_but_not_the_value(
    entry: str, message: str, secret: str | None
) -> None:
    with pytest.raises(ValidationError) as caught:
        AccessList.load([entry])
    assert message in str(caught.value)
    assert str(caught.value).startswith("--acl-token: ")
    if secret is not None:
        assert secret not in str(caught.value)


def test_duplicate_names_or_values_are_refused() -> None:
    with pytest.raises(ValidationError, match="two tokens are named 'a'"):
        AccessList.load([f"a:read:{VALUE}", f"a:write:{VALUE}x"])
    with pytest.raises(ValidationError, match="'b' has the same value"):
        AccessList.load([f"a:read:{VALUE}", f"b:write:{VALUE}"])


def test_tokens_file_skips_comments_and_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n\nops:read:{VALUE}\n  # indented comment\n")
    path.chmod(0o600)
    acl = AccessList.load([f"ci:write:{VALUE}-2"], str(path))
    assert sorted(t.name for t in acl.tokens) == ["ci", "ops"]
    path.write_text(f"ops:read:{VALUE}\nbroken\n")
    with pytest.raises(ValidationError, match=r"tokens line 2: expected"):
        acl.reload([])
    assert sorted(t.name for t in acl.tokens) == ["ci", "ops"]  # kept


@pytest.mark.parametrize(
    ("headers", "found"),
    [
        ([(b"authorization", b"Bearer abc")], "abc"),
        ([(b"Authorization", b"bearer  abc ")], "abc"),
        ([(b"authorization", b"Basic abc")], None),
        ([(b"x-dkron-token", b"xyz")], "xyz"),
        ([(b"authorization", b"Basic abc"), (b"X-Dkron-Token", b"xyz")], "xyz"),
        ([(b"authorization", b"Bearer abc"), (b"x-dkron-token", b"xyz")], "abc"),
        ([], None),
    ],
)
def test_presented_token(headers: list[tuple[bytes, bytes]], found: str | None) -> None:
    assert presented_token(headers) == found


def test_the_api_binds_to_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    config = AgentConfig(bind_addr="127.0.0.1:8946")
    assert config.http_addr.startswith("127.0.0.1:")
    assert security_warnings(config) == []
    hidden = AgentConfig(encrypt="a-gossip-key", acl_tokens=[f"a:read:{VALUE}"])
    assert "a-gossip-key" not in repr(hidden) and VALUE not in repr(hidden)
    exposed = AgentConfig(http_addr="0.0.0.0:8080", bind_addr="10.1.2.3:8946")
    warnings = " ".join(security_warnings(exposed))
    assert "without API tokens" in warnings
    assert "plain HTTP" in warnings
    assert "not encrypted" in warnings
    tokens = tmp_path / "tokens"
    tokens.write_text(f"a:read:{VALUE}\n")
    tokens.chmod(0o640)
    exposed.acl_tokens_file, exposed.tls_cert, exposed.rpc_ca = str(tokens), "c", "a"
    assert security_warnings(exposed) == [
        f"the tokens file {tokens} is readable by group or others (mode 640); "
        "chmod 600 it"
    ]
    tokens.chmod(0o600)
    assert security_warnings(exposed) == []


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_websockets_need_a_token_too() -> None:
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocket, WebSocketDisconnect

    from cronmesh.api.acl import TokenAuth

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/ws", echo)])
    app.add_middleware(TokenAuth, acl=AccessList.load([f"ops:read:{VALUE}"]))
    client = TestClient(app)
    with pytest.raises(WebSocketDisconnect) as refused:
        with client.websocket_connect("/ws"):
            pass
    assert refused.value.code == 1008
    with client.websocket_connect("/ws", headers={"X-Dkron-Token": VALUE}) as ws:
        assert ws.receive_text() == "hello"
