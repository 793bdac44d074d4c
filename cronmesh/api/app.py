"""Dkron's REST API (`/v1`), served by FastAPI inside the agent's loop.

Routes, fields, status codes, headers and query parameters follow Dkron's
`dkron/api.go`. Where Dkron's behaviour is a known bug we differ, and say so
in docs/dkron-compatibility.md: errors come as `{"error": "..."}` instead of
an empty body, a manual run answers at once instead of blocking until the
job ends, and `next` is the instant the job really fires.

All errors are translated to HTTP in one place, `_errors`; handlers raise
cronmesh errors and never build error responses themselves.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from cronmesh import __version__
from cronmesh.api.acl import TokenAuth
from cronmesh.core.commitlog import NotLeaderError
from cronmesh.core.executors import unknown_config_keys
from cronmesh.core.model import Job, unknown_job_fields
from cronmesh.core.output import trim_text
from cronmesh.errors import (
    ConflictError,
    CronmeshError,
    NotFoundError,
    StorageError,
    UnavailableError,
    ValidationError,
)

if TYPE_CHECKING:
    from cronmesh.agent import Agent

__all__ = ["create_app"]

MAX_BODY = 4 << 20


class PrettyJSON(JSONResponse):
    """JSON, indented when the request asked for `?pretty`."""

    def __init__(
        self,
        content: Any,
        status_code: int = 200,
        *,
        pretty: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.pretty = pretty
        super().__init__(content, status_code=status_code, headers=headers)

    def render(self, content: Any) -> bytes:
        indent = 4 if self.pretty else None
        separators = None if self.pretty else (",", ":")
        text = json.dumps(
            content, indent=indent, separators=separators, ensure_ascii=False
        )
        if self.pretty:
            text += "\n"
        try:
            return text.encode()
        except UnicodeEncodeError:
            # A lone surrogate (from an old row or an error quoting input):
            # JSON can still carry it escaped.
            return json.dumps(content, indent=indent, separators=separators).encode()


def _reply(
    request: Request,
    content: Any,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> PrettyJSON:
    pretty = "pretty" in request.query_params
    return PrettyJSON(content, status, pretty=pretty, headers=headers)


def _error(request: Request, status: int, message: str, **extra: Any) -> PrettyJSON:
    return _reply(request, {"error": message, **extra}, status)


async def _read_json(request: Request) -> Any:
    body = await request.body()
    if len(body) > MAX_BODY:
        raise ValidationError(f"body: larger than {MAX_BODY} bytes")
    if not body.strip():
        raise ValidationError("body: empty; expected a JSON object")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ValidationError(f"body: invalid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ValidationError("body: JSON nested too deeply") from exc


def _bool_query(value: str | None) -> bool:
    return value is not None and value.lower() not in ("false", "0", "no")


def _slice(items: list[Any], request: Request) -> list[Any]:
    q = request.query_params
    try:
        start = int(q.get("_start", "0"))
        end = int(q["_end"]) if "_end" in q else len(items)
    except ValueError as exc:
        raise ValidationError("_start/_end: expected whole numbers") from exc
    return items[max(start, 0) : max(end, 0)]


def _filter_jobs(jobs: list[Job], request: Request) -> list[Job]:
    q = request.query_params
    text = q.get("q", "")
    status = q.get("status")
    disabled = q.get("disabled")
    metadata = {
        key[len("metadata[") : -1]: value
        for key, value in q.multi_items()
        if key.startswith("metadata[") and key.endswith("]")
    }
    found = []
    for job in jobs:
        if text and text not in job.name and text not in job.displayname:
            continue
        if status == "untriggered" and job.status:
            continue
        if status and status != "untriggered" and job.status != status:
            continue
        if disabled not in (None, "") and str(job.disabled).lower() != disabled.lower():
            continue
        if metadata and any(job.metadata.get(k) != v for k, v in metadata.items()):
            continue
        found.append(job)
    return found


def _sort(items: list[dict[str, Any]], key: str, order: str) -> list[dict[str, Any]]:
    def sort_key(item: dict[str, Any]) -> tuple[int, str]:
        value = item.get(key)
        return (
            (0, "")
            if value is None
            else (1, str(value) if not isinstance(value, int) else f"{value:030d}")
        )

    return sorted(items, key=sort_key, reverse=order.upper() == "DESC")


async def _maybe_consistent(agent: Agent, request: Request) -> None:
    """`?consistent`: read after every write acknowledged before this request
    (a read-index round through the leader); without it reads are local."""
    if _bool_query(request.query_params.get("consistent")):
        await agent.consistent_read()


def create_app(agent: Agent) -> FastAPI:
    """The HTTP application of `agent`."""
    app = FastAPI(title="cronmesh", version=__version__, docs_url=None, redoc_url=None)
    _errors(app)
    if agent.cluster is None:
        # An agent without --server holds no state: a server answers.
        from cronmesh.api.proxy import forwarding_middleware

        app.middleware("http")(forwarding_middleware(agent.link.http, _is_local))
    # Added last, so outermost: in front of every route and of forwarding
    # (the server checks a forwarded request's token again). Open while no
    # token is configured; see cronmesh/api/acl.py.
    app.add_middleware(TokenAuth, acl=agent.acl)
    _meta_routes(app, agent)
    _job_routes(app, agent)
    _execution_routes(app, agent)
    return app


def _errors(app: FastAPI) -> None:
    """Translate cronmesh errors into Dkron status codes with a message."""

    async def validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ValidationError)
        extra: dict[str, Any] = {"field": exc.field} if exc.field else {}
        rejected = getattr(exc, "rejected", None)  # a restore's problems
        if rejected is not None:
            extra.update(jobs=rejected, rejected=len(rejected))
        return _error(request, 400, str(exc), **extra)

    async def conflict(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ConflictError)
        extra = {"execution_id": exc.execution_id} if exc.execution_id else {}
        return _error(request, 409, str(exc), **extra)

    def plain(status: int) -> Callable[[Request, Exception], Awaitable[Response]]:
        async def handler(request: Request, exc: Exception) -> Response:
            return _error(request, status, str(exc))

        return handler

    app.add_exception_handler(ValidationError, validation)
    app.add_exception_handler(ConflictError, conflict)
    app.add_exception_handler(NotFoundError, plain(404))
    app.add_exception_handler(StorageError, plain(503))
    app.add_exception_handler(NotLeaderError, plain(503))
    app.add_exception_handler(UnavailableError, plain(503))
    app.add_exception_handler(CronmeshError, plain(500))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(request, 400, f"{where}: {first.get('msg', 'invalid request')}")


def _meta_routes(app: FastAPI, agent: Agent) -> None:
    app.state.node_name = agent.node_name

    @app.get("/health")
    async def health(request: Request) -> Response:
        body: dict[str, Any] = {"status": "healthy"}
        if agent.config.server:
            body["leader"] = agent.is_leader()
        problems = agent.problems()
        if problems:
            body.update(status="unhealthy", issues=problems)
            return _reply(request, body, 503)
        return _reply(request, body)

    @app.get("/metrics")
    async def metrics() -> Response:
        data = generate_latest(agent.metrics.registry)
        return Response(content=data, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1")
    @app.get("/v1/")
    async def index(request: Request) -> Response:
        body: dict[str, Any] = {
            # `time` is ours: `cronmesh doctor` compares the servers' clocks.
            "agent": {
                "name": agent.node_name,
                "version": __version__,
                "time": datetime.now(UTC).isoformat(),
            },
            "serf": agent.gossip_stats(),
            "tags": agent.tags,
        }
        raft = agent.raft_stats()
        if raft is not None:
            body["raft"] = raft  # ours, as Consul's agent/self stats
        return _reply(request, body)

    @app.get("/v1/members")
    async def members(request: Request) -> Response:
        found = agent.members()
        return _reply(request, found, headers={"X-Total-Count": str(len(found))})

    @app.get("/v1/leader")
    async def leader(request: Request) -> Response:
        name = agent.leader_name()
        if not name:
            raise NotFoundError("no leader known")
        return _reply(request, agent.member(name))

    @app.get("/v1/isleader")
    async def isleader(request: Request) -> Response:
        if agent.is_leader():
            return _reply(request, "I am a leader")
        return _reply(request, "I am a follower", 404)

    @app.post("/v1/leave")
    async def leave(request: Request) -> Response:
        # The agent leaves the mesh (and hands over Raft leadership) as it
        # stops, the same path as SIGTERM.
        agent.stop()
        return _reply(request, sorted(agent.server_peers()))

    @app.get("/v1/raft/peers")
    async def raft_peers(request: Request) -> Response:
        if agent.cluster is None:
            raise NotFoundError("this agent is not a server: it has no Raft peers")
        rows = agent.cluster.peers_table()
        return _reply(request, rows, headers={"X-Total-Count": str(len(rows))})

    @app.delete("/v1/raft/peers/{peer_id}")
    async def remove_peer(request: Request, peer_id: str) -> Response:
        if agent.cluster is None:
            raise NotFoundError("this agent is not a server: it has no Raft peers")
        # Any server: a follower passes it on to the leader.
        rows = await agent.cluster.remove_peer(peer_id)
        return _reply(request, rows)

    @app.get("/v1/busy")
    async def busy(request: Request) -> Response:
        running = sorted(agent.store.running(), key=lambda e: e.started_at)
        body = [agent.execution_json(e) for e in running]
        return _reply(request, body, headers={"X-Total-Count": str(len(body))})

    @app.get("/v1/pause")
    async def pause_status(request: Request) -> Response:
        return _reply(request, {"paused": agent.paused})

    @app.post("/v1/pause")
    async def pause(request: Request) -> Response:
        agent.paused = True
        return _reply(request, {"paused": True})

    @app.post("/v1/unpause")
    async def unpause(request: Request) -> Response:
        agent.paused = False
        return _reply(request, {"paused": False})

    @app.post("/v1/restore")
    async def restore(request: Request) -> Response:
        from cronmesh.api.restore import restore_jobs

        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ValidationError(
                "file: expected a multipart field 'file' with the jobs"
            )
        data = await upload.read()
        dry_run = _bool_query(request.query_params.get("dry_run"))
        return _reply(request, await restore_jobs(agent, data, dry_run=dry_run))

    @app.get("/v1/backup")
    async def backup(request: Request) -> Response:
        from cronmesh.api.backup import capture, render
        from cronmesh.api.restore import settled_read

        # Any server answers, with every write acknowledged before this call.
        await settled_read(agent)
        executions = _bool_query(request.query_params.get("executions"))
        captured = capture(agent.store, executions=executions)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        headers = {
            "X-Total-Count": str(len(captured.jobs)),
            "X-Execution-Count": str(captured.execution_count),
            "Content-Disposition": f'attachment; filename="cronmesh-{stamp}.json"',
        }
        return StreamingResponse(
            render(captured, agent.node_name, executions=executions),
            media_type="application/json",
            headers=headers,
        )


def _job_routes(app: FastAPI, agent: Agent) -> None:
    async def upsert(request: Request, name: str | None = None) -> Response:
        if agent.paused:
            return _error(
                request, 503, "new job submissions are paused (POST /v1/unpause)"
            )
        data = await _read_json(request)
        if name is not None and isinstance(data, dict):
            body_name = data.setdefault("name", name)
            if body_name != name:
                raise ValidationError(
                    f"name: {body_name!r} in the body differs from {name!r} "
                    "in the path",
                    "name",
                )
        job, _ = await agent.set_job(data)
        if "runoncreate" in request.query_params:
            await agent.run_job(job.name)
        location = request.url.path.rstrip("/")
        if name is None:
            location = f"{location}/{job.name}"
        location = quote(location, safe="/")
        body = agent.job_json(job)
        warnings = (
            unknown_job_fields(data)
            + unknown_config_keys(job.executor, job.executor_config)
            + agent.job_warnings(job)
        )
        if warnings:
            body["warnings"] = warnings  # ours; Dkron clients ignore it
        return _reply(request, body, 201, headers={"Location": location})

    @app.post("/v1/jobs")
    @app.patch("/v1/jobs")
    async def create_or_update(request: Request) -> Response:
        return await upsert(request)

    @app.put("/v1/jobs/{job}")
    async def put_job(request: Request, job: str) -> Response:
        return await upsert(request, job)

    @app.patch("/v1/jobs/{job}")
    async def patch_job(request: Request, job: str) -> Response:
        current = agent.get_job(job).to_json()
        changes = await _read_json(request)
        if not isinstance(changes, dict):
            raise ValidationError("body: expected a JSON object")
        if changes.get("name", job) != job:
            raise ValidationError("name: cannot be changed by PATCH", "name")
        current.update(changes)
        stored, _ = await agent.set_job(current)
        body = agent.job_json(stored)
        warnings = (
            unknown_job_fields(changes)
            + unknown_config_keys(stored.executor, stored.executor_config)
            + agent.job_warnings(stored)
        )
        if warnings:
            body["warnings"] = warnings
        return _reply(request, body)

    @app.get("/v1/jobs")
    async def list_jobs(request: Request) -> Response:
        await _maybe_consistent(agent, request)
        jobs = _filter_jobs(agent.store.list_jobs(), request)
        sort = request.query_params.get("_sort", "name")
        sort = "name" if sort == "id" else sort
        body = _sort(
            [agent.job_json(j) for j in jobs],
            sort,
            request.query_params.get("_order", "ASC"),
        )
        return _reply(
            request, _slice(body, request), headers={"X-Total-Count": str(len(body))}
        )

    @app.get("/v1/jobs/{job}")
    async def get_job(request: Request, job: str) -> Response:
        await _maybe_consistent(agent, request)
        return _reply(request, agent.job_json(agent.get_job(job)))

    @app.delete("/v1/jobs/{job}")
    async def delete_job(request: Request, job: str) -> Response:
        return _reply(request, agent.job_json(await agent.delete_job(job)))

    @app.post("/v1/jobs/{job}")
    @app.post("/v1/jobs/{job}/run")
    async def run_job(request: Request, job: str) -> Response:
        if (
            agent.cluster is not None
            and not agent.is_leader()
            and "x-cronmesh-to-leader" not in request.headers
        ):
            # Only the leader dispatches: let it answer.
            from cronmesh.api.proxy import reply_response, request_message

            reply = await agent.ask_leader(await request_message(request))
            if reply.status < 300:
                # Let the caller read the new execution from this server.
                await agent.consistent_read()
            return reply_response(reply)
        force = request.query_params.get("force", "").lower() in ("1", "true", "yes")
        execution = await agent.run_job(job, force=force)
        body = agent.job_json(agent.get_job(job))
        headers = {"Location": quote(request.url.path, safe="/")}
        if execution is not None:
            headers["X-Execution-Id"] = execution.id
            marker = "[cronmesh] not run: "
            if execution.finished_at is not None and execution.output.startswith(
                marker
            ):
                # No node matched: recorded failed at once (Dkron still
                # answers 202 here; scripts and the CLI may read why).
                reason = execution.output[len(marker) :].strip()
                headers["X-Cronmesh-Not-Run"] = reason.encode(
                    "ascii", "backslashreplace"
                ).decode()
        return _reply(request, body, 202, headers=headers)

    @app.post("/v1/jobs/{job}/toggle")
    async def toggle(request: Request, job: str) -> Response:
        stored = await agent.toggle_job(job)
        return _reply(
            request,
            agent.job_json(stored),
            headers={"Location": quote(request.url.path, safe="/")},
        )


def _execution_routes(app: FastAPI, agent: Agent) -> None:
    @app.get("/v1/jobs/{job}/executions")
    async def executions(request: Request, job: str) -> Response:
        await _maybe_consistent(agent, request)
        agent.get_job(job)
        q = request.query_params
        try:
            limit = int(q.get("output_size_limit", "-1"))
        except ValueError as exc:
            raise ValidationError("output_size_limit: expected a whole number") from exc
        body = [agent.execution_json(e) for e in agent.store.executions(job)]
        for item in body:
            # Dkron counts the limit in bytes; ours also marks what it cut.
            kept = trim_text(item["output"], limit) if limit > -1 else item["output"]
            item["output_truncated"] = kept != item["output"]
            item["output"] = kept
        sort = q.get("_sort", "started_at")
        sort = "started_at" if sort in ("id", "") else sort
        body = _sort(body, sort, q.get("_order", "DESC"))
        return _reply(
            request, _slice(body, request), headers={"X-Total-Count": str(len(body))}
        )

    @app.delete("/v1/jobs/{job}/executions")
    async def delete_executions(request: Request, job: str) -> Response:
        return _reply(request, agent.job_json(await agent.delete_executions(job)))

    @app.get("/v1/jobs/{job}/executions/{execution}")
    async def execution(request: Request, job: str, execution: str) -> Response:
        await _maybe_consistent(agent, request)
        found = await agent.find_execution(job, execution)
        body = agent.execution_json(found)
        if found.running:
            live = await agent.live_output(found)
            if live is not None:
                body["output"] = live
        return _reply(request, body)

    @app.get("/v1/jobs/{job}/executions/{execution}/output")
    async def output(request: Request, job: str, execution: str) -> Response:
        """Ours: the output as plain text; `?follow=true` streams it live
        until the execution ends."""
        found = await agent.find_execution(job, execution)
        follow = request.query_params.get("follow", "").lower() in ("1", "true")
        if not follow or not found.running:
            text = found.output
            if found.running:
                text = await agent.live_output(found) or ""
            return Response(content=text, media_type="text/plain; charset=utf-8")
        return StreamingResponse(
            agent.follow_output(found), media_type="text/plain; charset=utf-8"
        )

    @app.post("/v1/jobs/{job}/executions/{execution}/kill")
    async def kill(request: Request, job: str, execution: str) -> Response:
        node = await agent.kill_execution(job, execution)
        return _reply(request, {"killed": execution, "node": node}, 202)


def _is_local(path: str) -> bool:
    """Routes a non-server agent answers itself."""
    from cronmesh.api.proxy import LOCAL_PATHS

    return (
        path in LOCAL_PATHS
        or path == "/v1/isleader"
        or (path.startswith("/v1/jobs/") and path.endswith("/output"))
    )
