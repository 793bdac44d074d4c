"""The API of an agent without --server: answered by a server.

Such an agent holds no jobs or executions, so most API requests travel over
gRPC (`Executions.Http`) to a server, which runs them through its own HTTP
application in-process and sends the answer back. Reads come from that
server's state, writes are forwarded by it to the leader. Node-local routes
(health, members, leave, metrics, the agent's info) are answered here.

Headers travel both ways, so an API token is checked by the server.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp

from cronmesh.errors import CronmeshError
from cronmesh.rpc import agent_pb2

__all__ = ["LOCAL_PATHS", "call_app", "forwarding_middleware", "request_message"]

log = logging.getLogger("cronmesh.api")

# Answered by every node itself.
LOCAL_PATHS = ("/health", "/metrics", "/v1", "/v1/", "/v1/members", "/v1/leave")
# Not worth carrying to the server.
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "host", "upgrade"}


async def request_message(request: Request) -> agent_pb2.HttpRequest:
    body = await request.body()
    return agent_pb2.HttpRequest(
        method=request.method,
        path=request.url.path,
        query=request.url.query,
        headers=[
            agent_pb2.Header(name=k, value=v)
            for k, v in request.headers.items()
            if k.lower() not in HOP_HEADERS
        ],
        body=body,
    )


def reply_response(reply: agent_pb2.HttpReply) -> Response:
    headers = {
        h.name: h.value
        for h in reply.headers
        if h.name.lower() not in HOP_HEADERS and h.name.lower() != "content-length"
    }
    return Response(content=reply.body, status_code=reply.status, headers=headers)


async def call_app(app: ASGIApp, message: agent_pb2.HttpRequest) -> agent_pb2.HttpReply:
    """Run one HTTP request through an ASGI app in this process."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": message.method,
        "scheme": "http",
        "path": message.path,
        "raw_path": message.path.encode(),
        "query_string": message.query.encode(),
        "root_path": "",
        "headers": [
            (h.name.lower().encode("latin-1"), h.value.encode("latin-1"))
            for h in message.headers
        ]
        + [(b"x-cronmesh-forwarded", b"1")],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    sent = False

    async def receive() -> MutableMapping[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": message.body, "more_body": False}

    status = 500
    headers: list[agent_pb2.Header] = []
    chunks: list[bytes] = []

    async def send(event: MutableMapping[str, Any]) -> None:
        nonlocal status
        if event["type"] == "http.response.start":
            status = event["status"]
            for name, value in event.get("headers", []):
                headers.append(
                    agent_pb2.Header(
                        name=name.decode("latin-1"), value=value.decode("latin-1")
                    )
                )
        elif event["type"] == "http.response.body":
            chunks.append(event.get("body", b""))

    await app(scope, receive, send)
    return agent_pb2.HttpReply(status=status, headers=headers, body=b"".join(chunks))


def forwarding_middleware(
    forward: Callable[[agent_pb2.HttpRequest], Awaitable[agent_pb2.HttpReply]],
    is_local: Callable[[str], bool],
) -> Callable[..., Awaitable[Response]]:
    """An HTTP middleware that forwards what this node cannot answer."""

    async def middleware(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if is_local(request.url.path):
            return await call_next(request)
        try:
            reply = await forward(await request_message(request))
        except CronmeshError as exc:
            log.debug("cannot forward request path=%s error=%s", request.url.path, exc)
            return JSONResponse(
                {"error": f"no server answered for this agent: {exc}"}, 503
            )
        return reply_response(reply)

    return middleware
