"""API tokens: who may read and who may change what the HTTP API serves.

With no token configured the API is open (as Dkron's open-source build,
which has no server-side tokens at all). With one or more tokens, every
request except `/health` must carry one, as `Authorization: Bearer <token>`
(what Dkron's web UI sends) or `X-Dkron-Token: <token>` (the header Dkron's
commercial ACLs document). Scopes:

- `read`: GET and HEAD on any route, `/metrics` included (it names jobs).
- `write`: every method on every route.

A request without a token, or with one that matches none, gets 401; a read
token on anything else than GET/HEAD gets 403. Token values are compared in
constant time, as SHA-256 digests against every configured token (no early
exit), and are kept only as digests: they never reach a log line, a repr or
an API answer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cronmesh.errors import ValidationError

__all__ = ["SCOPES", "AccessList", "Token", "TokenAuth", "parse_token"]

log = logging.getLogger("cronmesh.api.acl")

SCOPES = ("read", "write")
READ_METHODS = frozenset({"GET", "HEAD"})
OPEN_PATHS = frozenset({"/health"})
# Long enough that guessing is hopeless; `cronmesh keygen` prints 44 characters.
MIN_TOKEN_LENGTH = 16

Scope = str
ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[..., Any]],
    Awaitable[None],
]


def _digest(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(raw).digest()


@dataclass(frozen=True)
class Token:
    """One configured token: a name for logs, a scope, the value's digest."""

    name: str
    scope: Scope
    digest: bytes = field(repr=False)


def parse_token(text: str, where: str) -> Token:
    """`NAME:SCOPE:TOKEN` (the token itself may contain colons).

    Raises:
        ValidationError: names `where` and what is wrong, never the value.
    """
    name, _, rest = text.strip().partition(":")
    scope, sep, value = rest.partition(":")
    if not sep or not name or not value:
        raise ValidationError(f"{where}: expected NAME:SCOPE:TOKEN", "acl_tokens")
    if scope not in SCOPES:
        raise ValidationError(
            f"{where}: token {name!r} has scope {scope!r}; expected read or write",
            "acl_tokens",
        )
    if len(value) < MIN_TOKEN_LENGTH or value != value.strip():
        raise ValidationError(
            f"{where}: token {name!r} is shorter than {MIN_TOKEN_LENGTH} characters "
            "or has spaces around it (make one with `cronmesh keygen`)",
            "acl_tokens",
        )
    return Token(name, scope, _digest(value))


def _read_tokens_file(path: Path) -> list[Token]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValidationError(
            f"--acl-tokens-file: cannot read {path}: {exc.strerror}", "acl_tokens_file"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ValidationError(
            f"--acl-tokens-file: {path} is not UTF-8 text", "acl_tokens_file"
        ) from exc
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            tokens.append(parse_token(line, f"--acl-tokens-file {path} line {number}"))
    return tokens


class AccessList:
    """The configured tokens; `scope_of` answers what a presented one may do."""

    def __init__(self, tokens: list[Token], file: str = "") -> None:
        self.tokens = tokens
        self.file = file
        self._check(tokens)

    @staticmethod
    def _check(tokens: list[Token]) -> None:
        names: set[str] = set()
        digests: set[bytes] = set()
        for token in tokens:
            if token.name in names:
                raise ValidationError(
                    f"acl: two tokens are named {token.name!r}", "acl_tokens"
                )
            if token.digest in digests:
                raise ValidationError(
                    f"acl: token {token.name!r} has the same value as another one",
                    "acl_tokens",
                )
            names.add(token.name)
            digests.add(token.digest)

    @classmethod
    def load(cls, entries: list[str], file: str = "") -> AccessList:
        """Tokens from `--acl-token` entries and the tokens file.

        Raises:
            ValidationError: a malformed entry, an unreadable file, a
                duplicate name or value; the message never holds a value.
        """
        tokens = [parse_token(e, "--acl-token") for e in entries]
        if file:
            tokens += _read_tokens_file(Path(file))
        return cls(tokens, file)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def reload(self, entries: list[str]) -> None:
        """Re-read the tokens file (SIGHUP); keeps the old list on error."""
        if not self.file:
            return
        fresh = AccessList.load(entries, self.file)
        self.tokens = fresh.tokens
        log.info("api tokens reloaded count=%d", len(self.tokens))

    def match(self, presented: str) -> Token | None:
        """The token whose value is `presented`, compared in constant time."""
        digest = _digest(presented)
        found: Token | None = None
        for token in self.tokens:
            # No early exit: every token is compared whatever matched.
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found


def presented_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token a request carries (Bearer first, then X-Dkron-Token)."""
    bearer = dkron = None
    for key, value in headers:
        name = key.lower()
        if name == b"authorization":
            scheme, _, rest = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and rest.strip():
                bearer = rest.strip()
        elif name == b"x-dkron-token" and value.strip():
            dkron = value.decode("latin-1").strip()
    return bearer or dkron


class TokenAuth:
    """ASGI middleware in front of the whole app (every route, present and
    future, except `/health`)."""

    def __init__(self, app: ASGIApp, acl: AccessList) -> None:
        self.app = app
        self.acl = acl

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[..., Any],
    ) -> None:
        if (
            scope["type"] not in ("http", "websocket")
            or not self.acl.enabled
            or scope["path"] in OPEN_PATHS
        ):
            await self.app(scope, receive, send)
            return
        # A websocket (none yet; output streaming may add one) only reads.
        method = scope.get("method", "GET")
        refuse = _websocket_denial(send) if scope["type"] == "websocket" else send
        where = f"{method} {scope['path']}"
        client = (scope.get("client") or ("?", 0))[0]
        presented = presented_token(scope.get("headers", []))
        if presented is None:
            log.debug("api request without token %s client=%s", where, client)
            await _deny(
                refuse,
                401,
                "missing API token: send Authorization: Bearer "
                "<token> or X-Dkron-Token: <token>",
            )
            return
        token = self.acl.match(presented)
        if token is None:
            log.debug("api request with unknown token %s client=%s", where, client)
            await _deny(refuse, 401, "invalid API token")
            return
        if token.scope != "write" and method not in READ_METHODS:
            log.debug("api token lacks write scope token=%s %s", token.name, where)
            await _deny(
                refuse,
                403,
                f"token {token.name!r} has read scope; {where} needs a write token",
            )
            return
        scope.setdefault("state", {})["token_name"] = token.name
        await self.app(scope, receive, send)


def _websocket_denial(send: Callable[..., Any]) -> Callable[..., Any]:
    """`send` for a websocket, turning a denial into a refused handshake."""

    async def close(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            await send({"type": "websocket.close", "code": 1008})

    return close


async def _deny(send: Callable[..., Any], status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="cronmesh"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
