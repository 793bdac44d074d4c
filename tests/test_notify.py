"""Webhooks and mail after executions, their SIGHUP reload, and log formats."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import signal
import socketserver
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cronmesh.core.fsm import Event
from cronmesh.core.model import Execution, Job
from cronmesh.core.notify import (
    Notifier,
    NotifySettings,
    check_template,
    render,
)
from cronmesh.errors import ValidationError
from cronmesh.logs import setup_logging, split_fields
from cronmesh.storage.env import DataDir
from cronmesh.storage.state import StateStore
from tests.conftest import AgentProcess, shell_job

# -- servers the tests start on loopback -----------------------------------


class Hooks:
    """An HTTP server on 127.0.0.1 that records every POST."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.calls: list[tuple[str, dict[str, str], str]] = []
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(size).decode()
                headers = {k.lower(): v for k, v in self.headers.items()}
                hooks.calls.append((self.path, headers, body))
                self.send_response(hooks.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self, path: str) -> list[str]:
        return [body for p, _, body in self.calls if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks() -> Iterator[Any]:
    made: list[Hooks] = []

    def make(status: int = 200) -> Hooks:
        made.append(Hooks(status))
        return made[-1]

    yield make
    for server in made:
        server.close()


class MockSMTP(socketserver.ThreadingTCPServer):
    """Just enough SMTP (EHLO, AUTH PLAIN, MAIL, RCPT, DATA) to take mail."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self) -> None:
        self.mails: list[dict[str, Any]] = []
        super().__init__(("127.0.0.1", 0), _SMTPHandler)
        self.port = int(self.server_address[1])
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _SMTPHandler(socketserver.StreamRequestHandler):
    def say(self, text: str) -> None:
        self.wfile.write(text.encode() + b"\r\n")

    def handle(self) -> None:
        server = self.server
        assert isinstance(server, MockSMTP)
        mail: dict[str, Any] = {"to": [], "auth": ""}
        self.say("220 mock ESMTP")
        for raw in self.rfile:
            line = raw.decode().rstrip("\r\n")
            verb = line.split(" ", 1)[0].upper()
            if verb == "EHLO":
                self.say("250-mock\r\n250 AUTH PLAIN")
            elif verb == "AUTH":
                mail["auth"] = base64.b64decode(line.split()[2]).decode()
                self.say("235 ok")
            elif verb == "MAIL":
                mail["from"] = line[10:].strip("<>")
                self.say("250 ok")
            elif verb == "RCPT":
                mail["to"].append(line[8:].strip("<>"))
                self.say("250 ok")
            elif verb == "DATA":
                self.say("354 go on")
                lines = []
                for data in self.rfile:
                    if data in (b".\r\n", b".\n"):
                        break
                    lines.append(data.decode())
                mail["data"] = "".join(lines)
                server.mails.append(dict(mail))
                self.say("250 queued")
            elif verb == "QUIT":
                self.say("221 bye")
                return
            else:
                self.say("250 ok")


# -- units -----------------------------------------------------------------


def test_templates_use_dkron_fields_only() -> None:
    values = {"JobName": "backup", "Success": "true"}
    assert render("{{.JobName}} ok={{ .Success }}", values) == "backup ok=true"
    check_template('payload={"text": "{{.Report}}"}', "webhook-payload")
    for bad in ("{{if .Success}}yes{{end}}", "{{.Nope}}", "{{.JobName | printf}}"):
        with pytest.raises(ValidationError, match="webhook-payload: "):
            check_template(bad, "webhook-payload")


@pytest.mark.parametrize(("leading", "sends"), [(True, 1), (False, 0)])
def test_only_the_leader_sends(tmp_path: Path, leading: bool, sends: int) -> None:
    data = DataDir(tmp_path / "d")
    spawned: list[int] = []

    async def scenario() -> None:
        settings = NotifySettings(
            webhook_endpoint="http://127.0.0.1:9/", webhook_payload="x"
        )
        notifier = Notifier(
            "n1", settings, store=StateStore(data), is_leader=lambda: leading
        )
        execution = Execution("job", datetime.now(UTC), "n1", 1)
        execution.finished_at = execution.started_at
        # The job is not stored: it is held until its `job_deleted` (an
        # ephemeral job's last run), which carries the job.
        notifier.on_event(Event("execution_done", "job", execution=execution))
        notifier.on_event(Event("job_deleted", "job", previous=Job(name="job")))
        spawned.append(len(notifier._tasks))
        await notifier.close()  # cancels the send before it connects

    try:
        asyncio.run(scenario())
    finally:
        data.close()
    assert spawned == [sends]


def test_log_lines_split_fields_and_carry_time(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert split_fields("agent started node=a pid=3") == (
        "agent started",
        {"node": "a", "pid": "3"},
    )
    assert split_fields("run skipped reason=job is gone") == (
        "run skipped reason=job is gone",
        {},
    )
    stream = io.StringIO()
    setup_logging("info", stream=stream)
    try:
        logging.getLogger("cronmesh.test").info("thing done count=%d", 2)
        logging.getLogger("cronmesh.test").debug("not shown")
    finally:
        setup_logging("warning", stream=io.StringIO())
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO thing done count=2\n",
        stream.getvalue(),
    )


# -- real agents -----------------------------------------------------------


def _run(node: AgentProcess, job: str) -> None:
    assert node.http.post(f"/v1/jobs/{job}/run").status_code == 202


def _reload(node: AgentProcess, count: int) -> None:
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)
    node.wait_for(
        f"reload {count}", lambda: node.log().count("configuration reloaded") >= count
    )


def test_webhooks_follow_sighup_and_failures_are_counted(
    agent_factory: Any, hooks: Any, tmp_path: Path
) -> None:
    first, second = hooks(), hooks()
    config = tmp_path / "agent.json"
    settings = {
        "webhook-endpoint": f"{first.url}/done",
        "webhook-payload": "{{.JobName}} {{.Success}} {{.NodeName}} {{.ReportingNode}}",
        "webhook-headers": ["X-Token: a:b", "Content-Type: text/plain"],
        "pre-webhook-endpoint": f"{first.url}/start",
        "pre-webhook-payload": "start {{.JobName}}",
    }
    config.write_text(json.dumps(settings))
    node = agent_factory("--config", str(config))
    assert node.post_job(shell_job("hello", "echo hi")).status_code == 201
    assert node.post_job(shell_job("flaky", "false", retries=1)).status_code == 201
    _run(node, "hello")
    node.wait_for("webhook", lambda: first.bodies("/done"))
    assert first.bodies("/done") == ["hello true node1 node1"]
    assert first.bodies("/start") == ["start hello"]
    done = next(headers for path, headers, _ in first.calls if path == "/done")
    assert done["x-token"] == "a:b"
    # A failed run that is retried notifies once, after its last attempt.
    _run(node, "flaky")
    node.finished("flaky", 2)
    node.wait_for(
        "flaky webhook", lambda: "flaky false node1 node1" in first.bodies("/done")
    )
    assert len(node.executions("flaky")) == 2
    assert first.bodies("/done").count("flaky false node1 node1") == 1

    # SIGHUP: the next execution goes to the new endpoint; no pre-webhook.
    calls_before = len(first.calls)
    settings["webhook-endpoint"] = f"{second.url}/done"
    del settings["pre-webhook-endpoint"], settings["pre-webhook-payload"]
    config.write_text(json.dumps(settings))
    _reload(node, 1)
    _run(node, "hello")
    node.wait_for("webhook after reload", lambda: second.bodies("/done"))
    assert second.bodies("/done") == ["hello true node1 node1"]
    assert len(first.calls) == calls_before

    # An endpoint that answers 500 is a failure: logged and counted.
    second.status = 500
    _run(node, "hello")

    def failures() -> float:
        text = node.http.get("/metrics").text
        pattern = r'cronmesh_webhook_failures_total\{job_name="hello"\} (\S+)'
        found = re.search(pattern, text)
        return float(found.group(1)) if found else 0.0

    node.wait_for("failure counted", lambda: failures() == 1.0)
    assert "webhook failed hook=post endpoint=http://127.0.0.1" in node.log()
    assert "/done" not in node.log()  # the path may hold a secret


def test_invalid_reload_keeps_the_old_settings(
    agent_factory: Any, hooks: Any, tmp_path: Path
) -> None:
    server = hooks()
    config = tmp_path / "agent.yml"
    config.write_text(
        f"webhook-endpoint: {server.url}/done\nwebhook-payload: '{{{{.JobName}}}}'\n"
    )
    node = agent_factory("--config", str(config))
    assert node.post_job(shell_job("hello", "true")).status_code == 201
    config.write_text("webhook-endpoint: 7\n")
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)
    node.wait_for("reload refused", lambda: "reload failed" in node.log())
    assert "webhook-endpoint: expected a string" in node.log()
    _run(node, "hello")
    node.wait_for("webhook with the old settings", lambda: server.bodies("/done"))
    assert server.bodies("/done") == ["hello"]


def test_mail_to_the_owner_never_shows_the_password(agent_factory: Any) -> None:
    smtp = MockSMTP()
    try:
        node = agent_factory(
            "--mail-host",
            "127.0.0.1",
            "--mail-port",
            str(smtp.port),
            "--mail-username",
            "cron",
            "--mail-from",
            "cron@example.com",
            env={"CRONMESH_MAIL_PASSWORD": "s3cret-pw"},
        )
        job = shell_job("mailed", "echo the output", owner_email="owner@example.com")
        assert node.post_job(job).status_code == 201
        assert node.post_job(shell_job("quiet", "true")).status_code == 201
        _run(node, "quiet")  # no owner_email: no mail
        node.finished("quiet")
        _run(node, "mailed")
        node.wait_for("mail", lambda: smtp.mails)
    finally:
        smtp.shutdown()
        smtp.server_close()
    assert len(smtp.mails) == 1
    mail = smtp.mails[0]
    assert mail["to"] == ["owner@example.com"]
    assert mail["from"] == "cron@example.com"
    assert mail["auth"] == "\x00cron\x00s3cret-pw"
    assert "Subject: [cronmesh]Success mailed execution report" in mail["data"]
    assert "the output" in mail["data"]
    for answer in ("/v1", "/v1/members", "/metrics"):
        assert "s3cret-pw" not in node.http.get(answer).text
    assert node.stop() == 0
    assert "s3cret-pw" not in node.log()


def test_log_json_lines_parse(agent_factory: Any) -> None:
    node = agent_factory("--log-json", "--tag", "a=b")
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)
    node.wait_for("reloaded", lambda: "configuration reloaded" in node.log())
    assert node.stop() == 0
    records = [json.loads(line) for line in node.log().splitlines()]
    started = next(r for r in records if r["msg"] == "agent started")
    assert started["level"] == "info"
    assert started["logger"] == "cronmesh.agent"
    assert started["node"] == "node1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", started["time"])
    assert any(r["msg"] == "agent stopped" for r in records)


def test_journald_lines_have_priority_and_no_time(
    agent_factory: Any, tmp_path: Path
) -> None:
    node = agent_factory(start=False)
    node.log_path.touch()
    info = node.log_path.stat()
    node.env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
    node.start()
    assert node.stop() == 0
    lines = node.log().splitlines()
    assert any(line.startswith("<6>INFO agent started node=node1 ") for line in lines)
    assert all(re.match(r"<\d>[A-Z]+ ", line) for line in lines), lines
