"""The ``http`` executor: sends one HTTP request, Dkron-compatible.

Config keys (all strings): ``method`` and ``url`` (required), ``headers`` (a
JSON array of ``"Name: value"`` strings), ``body``, ``timeout`` (whole
seconds for the entire exchange, default 30, 0 = none), ``expectCode`` (a
comma-separated list such as ``200,206``), ``expectBody`` (a regular
expression searched anywhere in the body), ``debug``, and the TLS keys
``tlsNoVerifyPeer``, ``tlsCertificateFile``, ``tlsCertificateKeyFile``,
``tlsRootCAsFile``.

As in Dkron, any HTTP answer counts as success unless ``expectCode`` or
``expectBody`` says otherwise; a 500 without ``expectCode`` succeeds. The
output is the response body followed by one ``[cronmesh] HTTP <code>`` line.
Like Dkron's Go client we follow up to 10 redirects, verify certificates
against the system store, and ignore proxy environment variables.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import ssl
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from cronmesh.core.executors.base import (
    MAX_OUTPUT_BYTES,
    ExecResult,
    OutputBuffer,
    OutputSink,
    TeeSink,
    check_string_config,
    parse_go_bool,
)
from cronmesh.errors import ValidationError

__all__ = [
    "HttpConfig",
    "HttpExecutor",
    "TlsOptions",
    "describe_http_error",
    "parse_http_config",
]

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
DEFAULT_TIMEOUT = 30
# expectBody is matched against at most this many leading bytes of the body.
# Limitation: a match that only occurs after the first 1 MiB is missed.
BODY_MATCH_BYTES = 1 << 20
_MAX_REDIRECTS = 10
_SSL_CACHE_SIZE = 32
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass(frozen=True)
class TlsOptions:
    """The TLS keys; one SSL context is built and cached per distinct value."""

    no_verify: bool
    cert_file: str
    key_file: str
    root_cas_file: str


@dataclass(frozen=True)
class HttpConfig:
    """A validated http executor config."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    # Whole seconds for connect + send + read; 0 means no limit.
    timeout: int
    # Accepted status codes; empty means any status is accepted.
    expect_codes: frozenset[int]
    expect_body: re.Pattern[str] | None
    debug: bool
    tls: TlsOptions


def parse_http_config(config: dict[str, str]) -> HttpConfig:
    """Validate an http executor config and return its parsed form.

    Raises:
        ValidationError: naming ``executor_config.<key>``.
    """
    config = check_string_config(config)
    return HttpConfig(
        method=_parse_method(config.get("method", "")),
        url=_parse_url(config.get("url", "")),
        headers=_parse_headers(config.get("headers", "")),
        body=config.get("body", "").encode(),
        timeout=_parse_timeout(config.get("timeout", "")),
        expect_codes=_parse_codes(config.get("expectCode", "")),
        expect_body=_parse_regex(config.get("expectBody", "")),
        debug=_parse_flag(config, "debug"),
        tls=_parse_tls(config),
    )


def _invalid(key: str, problem: str) -> ValidationError:
    field = f"executor_config.{key}"
    return ValidationError(f"{field}: {problem}", field=field)


def _parse_method(text: str) -> str:
    # Dkron asks for upper case; we accept any case and send upper case.
    method = text.strip().upper()
    if not method:
        raise _invalid("method", "is required")
    if method not in METHODS:
        raise _invalid("method", f"{text!r} is not one of {', '.join(sorted(METHODS))}")
    return method


def _parse_url(text: str) -> str:
    if not text:
        raise _invalid("url", "is required")
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise _invalid("url", f"{text!r} is not a valid URL ({exc})") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise _invalid("url", f"{text!r} must be an absolute http:// or https:// URL")
    return text


def _parse_headers(text: str) -> tuple[tuple[str, str], ...]:
    if not text:
        return ()
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _invalid("headers", f"is not JSON ({exc})") from exc
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise _invalid("headers", 'must be a JSON array of "Name: value" strings')
    headers = []
    for item in items:
        if not item:
            continue  # Dkron skips empty strings
        # Dkron cuts the value at a second colon; we keep all of it.
        name, sep, value = item.partition(":")
        name = name.strip()
        if not sep or not _TOKEN.fullmatch(name):
            raise _invalid("headers", f'{item!r} is not "Name: value"')
        headers.append((name, value.strip()))
    return tuple(headers)


def _parse_timeout(text: str) -> int:
    if not text:
        return DEFAULT_TIMEOUT
    try:
        seconds = int(text)
    except ValueError:
        raise _invalid(
            "timeout", f"{text!r} is not a whole number of seconds"
        ) from None
    if seconds < 0:
        raise _invalid("timeout", f"{text!r} is negative")
    return seconds


def _parse_codes(text: str) -> frozenset[int]:
    if not text.strip():
        return frozenset()
    codes = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit() or not 100 <= int(item) <= 599:
            raise _invalid("expectCode", f"{item!r} is not an HTTP status (100-599)")
        codes.add(int(item))
    return frozenset(codes)


def _parse_regex(text: str) -> re.Pattern[str] | None:
    if not text:
        return None
    # Limitation: Python's re, not Go's RE2; the common syntax is the same but
    # RE2-only forms such as \pN or (?P<name>) variants may differ.
    try:
        return re.compile(text)
    except re.error as exc:
        raise _invalid(
            "expectBody", f"is not a valid regular expression ({exc})"
        ) from exc


def _parse_flag(config: dict[str, str], key: str) -> bool:
    text = config.get(key, "")
    return parse_go_bool(text, f"executor_config.{key}") if text else False


def _parse_tls(config: dict[str, str]) -> TlsOptions:
    tls = TlsOptions(
        no_verify=_parse_flag(config, "tlsNoVerifyPeer"),
        cert_file=config.get("tlsCertificateFile", ""),
        key_file=config.get("tlsCertificateKeyFile", ""),
        root_cas_file=config.get("tlsRootCAsFile", ""),
    )
    if tls.key_file and not tls.cert_file:
        raise _invalid("tlsCertificateKeyFile", "needs tlsCertificateFile as well")
    return tls


class HttpExecutor:
    """Sends ``executor_config`` as one HTTP request and judges the answer.

    Args:
        max_output: bytes of output kept in the result (the end is kept).
    """

    name = "http"
    # The executor_config keys it reads (others are named in a warning).
    config_keys = frozenset(
        (
            "method",
            "url",
            "headers",
            "body",
            "timeout",
            "expectCode",
            "expectBody",
            "debug",
            "tlsNoVerifyPeer",
            "tlsCertificateFile",
            "tlsCertificateKeyFile",
            "tlsRootCAsFile",
        )
    )

    def __init__(self, *, max_output: int = MAX_OUTPUT_BYTES) -> None:
        self.max_output = max_output
        # Building an SSL context reads the CA store (milliseconds), so the
        # last few are kept per TLS options and certificate file mtimes.
        self._ssl_cache: OrderedDict[tuple[object, ...], ssl.SSLContext] = OrderedDict()

    def validate(self, config: dict[str, str]) -> None:
        """Raise ValidationError if ``config`` cannot be run.

        Certificate files are node-local, so they are checked when it runs.
        """
        parse_http_config(config)

    async def run(
        self,
        config: dict[str, str],
        sink: OutputSink,
        *,
        job_name: str,
        execution_id: str,
        env_extra: dict[str, str] | None = None,
        cancel: asyncio.Event | None = None,
        on_start: Callable[[int, Callable[[], bool]], None] | None = None,
    ) -> ExecResult:
        """Send the request once and return how it went.

        ``job_name``, ``execution_id``, ``env_extra`` and ``on_start`` are
        accepted for the common interface and not used (no process starts).
        Network errors, timeouts and unexpected answers come back as a failed
        ExecResult.

        Raises:
            asyncio.CancelledError: if the task running this is cancelled.
        """
        out = TeeSink(OutputBuffer(self.max_output), sink)
        try:
            cfg = parse_http_config(config)
        except ValidationError as exc:
            return _fail(out, f"invalid config: {exc}", str(exc))
        try:
            context = self._ssl_context(cfg.tls)
        except (OSError, ssl.SSLError) as exc:
            return _fail(out, f"cannot load TLS files: {exc}", f"tls: {exc}")
        exchange = _Exchange(cfg, out, context)
        if cancel is None:
            return await exchange.run()
        return await _race_cancel(exchange, cancel, out)

    def _ssl_context(self, tls: TlsOptions) -> ssl.SSLContext:
        files = (tls.cert_file, tls.key_file, tls.root_cas_file)
        key = (tls, *(os.stat(f).st_mtime_ns if f else 0 for f in files))
        context = self._ssl_cache.get(key)
        if context is None:
            context = _build_ssl_context(tls)
            self._ssl_cache[key] = context
            if len(self._ssl_cache) > _SSL_CACHE_SIZE:
                self._ssl_cache.popitem(last=False)
        return context


def _build_ssl_context(tls: TlsOptions) -> ssl.SSLContext:
    # Dkron falls back to system CAs (or no client certificate) with a warning
    # when a file cannot be loaded; we fail the run instead, so a typo in a
    # path cannot quietly change who is trusted.
    context = ssl.create_default_context(cafile=tls.root_cas_file or None)
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file or None)
    if tls.no_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def _race_cancel(
    exchange: _Exchange, cancel: asyncio.Event, out: TeeSink
) -> ExecResult:
    if cancel.is_set():
        return _fail(out, "job killed on request before it started", "killed")
    task = asyncio.ensure_future(exchange.run())
    waiter = asyncio.ensure_future(cancel.wait())
    try:
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
    if task.cancelled():
        return _fail(out, "job killed on request; request abandoned", "killed")
    return task.result()


class _Exchange:
    """One request/response, writing to ``out`` as the body arrives."""

    def __init__(self, cfg: HttpConfig, out: TeeSink, context: ssl.SSLContext) -> None:
        self.cfg = cfg
        self.out = out
        self.context = context
        self.head = bytearray()  # the start of the body, for expectBody

    async def run(self) -> ExecResult:
        cfg = self.cfg
        try:
            async with asyncio.timeout(cfg.timeout or None):
                status = await self._send()
        except TimeoutError:
            error = f"timeout after {cfg.timeout}s"
            return _fail(self.out, f"request {error}", error)
        except httpx.HTTPError as exc:
            error = describe_http_error(exc)
            return _fail(self.out, f"request failed: {error}", error)
        return self._judge(status)

    async def _send(self) -> tuple[int, str]:
        cfg = self.cfg
        async with httpx.AsyncClient(
            verify=self.context,
            timeout=None,  # the asyncio.timeout above bounds the whole exchange
            follow_redirects=True,
            max_redirects=_MAX_REDIRECTS,
            trust_env=False,
        ) as client:
            request = client.build_request(
                cfg.method, cfg.url, headers=list(cfg.headers), content=cfg.body or None
            )
            if cfg.debug:
                self._debug_request(request)
            response = await client.send(request, stream=True)
            try:
                if cfg.debug:
                    self._debug_response(response)
                async for chunk in response.aiter_bytes():
                    self._take(chunk)
            finally:
                await response.aclose()
            return response.status_code, response.reason_phrase

    def _take(self, chunk: bytes) -> None:
        room = BODY_MATCH_BYTES - len(self.head)
        if room > 0:
            self.head += chunk[:room]
        self.out.write(chunk)

    def _debug_request(self, request: httpx.Request) -> None:
        lines = [f"> {request.method} {request.url}"]
        lines += [f"> {k}: {v}" for k, v in request.headers.items()]
        self.out.write(("\n".join(lines) + "\n").encode())

    def _debug_response(self, response: httpx.Response) -> None:
        lines = [f"< {response.http_version} {response.status_code}"]
        lines += [f"< {k}: {v}" for k, v in response.headers.items()]
        self.out.write(("\n".join(lines) + "\n").encode())

    def _judge(self, status: tuple[int, str]) -> ExecResult:
        code, reason = status
        cfg = self.cfg
        self.out.note(f"HTTP {code} {reason}".rstrip())
        if cfg.expect_codes and code not in cfg.expect_codes:
            wanted = ",".join(str(c) for c in sorted(cfg.expect_codes))
            error = f"status {code}, expected {wanted}"
            return _fail(self.out, error, error)
        if cfg.expect_body is not None:
            text = self.head.decode("utf-8", "replace")
            if cfg.expect_body.search(text) is None:
                error = f"body does not match expectBody {cfg.expect_body.pattern!r}"
                return _fail(self.out, error, error)
        return ExecResult(True, self.out.buffer.getvalue(), None)


def describe_http_error(exc: httpx.HTTPError) -> str:
    """A short reason for a failed exchange ("connection refused", ...)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED:
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect: {text}"
    return f"{type(exc).__name__}: {text}"


def _fail(out: TeeSink, message: str, error: str) -> ExecResult:
    out.note(message)
    return ExecResult(False, out.buffer.getvalue(), None, error)
