"""Notifications after executions: webhooks and mail, as Dkron sends them.

Theory of operation: the notifier is a state machine listener. Every server
applies the same events, so only the one that leads sends anything; the
others drop the event. Sending never blocks applying: the listener builds
the message at once (the state is fresh then) and hands it to a task; a
failed send is logged and counted, never retried.

What Dkron does, and so do we:
  - after an execution ends (`execution_done`): a POST of `webhook-payload`
    to `webhook-endpoint` (both must be set), and a mail to the job's
    `owner_email` (when `mail-host` and `mail-port` are set). A failed run
    that will be retried sends nothing; its last attempt does.
  - when an execution starts: a POST of `pre-webhook-payload` to
    `pre-webhook-endpoint` (both must be set).
  - every execution is reported, successful or not.
Payloads are Go-template-like texts; only plain `{{.Field}}` references are
understood (see TEMPLATE_FIELDS).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import smtplib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from functools import partial
from urllib.parse import urlsplit

import httpx
from prometheus_client import CollectorRegistry, Counter

from cronmesh.core.fsm import Event
from cronmesh.core.model import Execution, Job, format_time
from cronmesh.errors import ValidationError
from cronmesh.storage.state import StateStore

__all__ = [
    "TEMPLATE_FIELDS",
    "Notifier",
    "NotifySettings",
    "check_headers",
    "check_template",
    "render",
]

log = logging.getLogger("cronmesh.notify")

# The names a payload template may use, as in Dkron's notifier.
TEMPLATE_FIELDS = (
    "Report",
    "JobName",
    "ReportingNode",
    "StartTime",
    "FinishedAt",
    "Success",
    "NodeName",
    "Output",
)
_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)
_FIELD = re.compile(r"^-?\s*\.([A-Za-z]+)\s*-?$")

SEND_TIMEOUT = 10.0  # seconds one webhook call or mail may take
MAX_PENDING = 1000  # sends waiting or running; beyond this they are dropped
MAX_PARALLEL = 4  # sends running at once


@dataclass
class NotifySettings:
    """Dkron's mail and webhook settings (reloaded on SIGHUP)."""

    mail_host: str = ""
    mail_port: int = 0  # 0: no mail
    mail_username: str = ""
    mail_password: str = field(default="", repr=False)  # never logged
    mail_from: str = ""
    mail_payload: str = ""  # template; empty: the execution's output
    mail_subject_prefix: str = "[cronmesh]"
    webhook_endpoint: str = ""
    webhook_payload: str = ""  # template; empty: no webhook (as in Dkron)
    webhook_headers: list[str] = field(default_factory=list)  # "Name: value"
    pre_webhook_endpoint: str = ""
    pre_webhook_payload: str = ""
    pre_webhook_headers: list[str] = field(default_factory=list)

    def validate(self) -> NotifySettings:
        """Check templates and headers; return self.

        Raises:
            ValidationError: naming the setting (Dkron's key) that is wrong.
        """
        for key in ("mail-payload", "webhook-payload", "pre-webhook-payload"):
            check_template(getattr(self, key.replace("-", "_")), key)
        for key in ("webhook-headers", "pre-webhook-headers"):
            check_headers(getattr(self, key.replace("-", "_")), key)
        for key in ("webhook-endpoint", "pre-webhook-endpoint"):
            url = getattr(self, key.replace("-", "_"))
            parts = urlsplit(url)
            if url and (parts.scheme not in ("http", "https") or not parts.netloc):
                raise ValidationError(
                    f"{key}: {_safe_url(url)!r} is not an http:// or https:// URL",
                    key,
                )
        return self

    def warnings(self) -> list[str]:
        """Settings that look meant to notify but will not (Dkron's rules)."""
        found = []
        for hook in ("webhook", "pre-webhook"):
            attr = hook.replace("-", "_")
            endpoint = getattr(self, f"{attr}_endpoint")
            payload = getattr(self, f"{attr}_payload")
            if bool(endpoint) != bool(payload):
                found.append(
                    f"{hook}-endpoint and {hook}-payload must both be set; "
                    f"no {hook} is sent"
                )
        if bool(self.mail_host) != bool(self.mail_port):
            found.append("mail-host and mail-port must both be set; no mail is sent")
        return found


def check_template(text: str, key: str) -> None:
    """Refuse a template we would render wrongly.

    Raises:
        ValidationError: an action other than `{{.Field}}` with a known field.
    """
    for action in _ACTION.findall(text):
        match = _FIELD.match(action.strip())
        if match is None or match.group(1) not in TEMPLATE_FIELDS:
            known = ", ".join("{{." + name + "}}" for name in TEMPLATE_FIELDS)
            raise ValidationError(
                f"{key}: {{{{{action}}}}} is not supported; use one of {known}",
                key,
            )


def check_headers(headers: list[str], key: str) -> None:
    """Each header is `Name: value` (Dkron's format).

    Raises:
        ValidationError: a header without a colon or a name.
    """
    for header in headers:
        name, sep, _ = header.partition(":")
        if not sep or not name.strip() or any(c.isspace() for c in name.strip()):
            raise ValidationError(f"{key}: {header!r} is not 'Name: value'", key)


def render(template: str, values: dict[str, str]) -> str:
    """Substitute `{{.Field}}` references (checked by check_template)."""

    def one(match: re.Match[str]) -> str:
        found = _FIELD.match(match.group(1).strip())
        return values.get(found.group(1), "") if found else match.group(0)

    return _ACTION.sub(one, template)


def _headers(items: list[str]) -> dict[str, str]:
    headers = {}
    for item in items:
        name, _, value = item.partition(":")
        headers[name.strip()] = value.strip()
    return headers


def _safe_url(url: str) -> str:
    """Scheme and host only: webhook paths often carry a secret (Slack)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}" if parts.scheme else "<url>"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Notifier:
    """Sends webhooks and mail for executions while this node leads."""

    def __init__(
        self,
        node_name: str,
        settings: NotifySettings,
        *,
        store: StateStore,
        is_leader: Callable[[], bool],
        registry: CollectorRegistry | None = None,
        webhook_failed: Callable[[str], None] | None = None,
    ) -> None:
        self.node_name = node_name
        self.settings = settings
        self.store = store
        self.is_leader = is_leader
        # Counts a failed webhook by job name (Metrics.webhook_failed).
        self.webhook_failed = webhook_failed or (lambda job_name: None)
        self.mail_failures = Counter(
            "cronmesh_mail_failures",
            "Notification mails that could not be handed to the mail server",
            registry=registry,
        )
        self.dropped = Counter(
            "cronmesh_notifications_dropped",
            f"Notifications not sent because {MAX_PENDING} were pending already",
            registry=registry,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_PARALLEL)
        self._client: httpx.AsyncClient | None = None
        # An ephemeral job's last run deletes the job in the same batch; its
        # `execution_done` waits here for the `job_deleted` that follows.
        self._orphans: dict[str, Execution] = {}

    def configure(self, settings: NotifySettings) -> None:
        """Use new settings from the next event on (SIGHUP)."""
        self.settings = settings

    # -- the listener
    def on_event(self, event: Event) -> None:
        """State machine listener; returns at once, sends in the background.

        Call it in the event loop's thread (it starts tasks).
        """
        # Limitation: "leads" is asked when the event is applied, so around a
        # change of leader a notification can be lost (the old leader stepped
        # down first) or sent twice (both still believed they led).
        if not self.is_leader():
            self._orphans.clear()
            return
        if event.kind == "execution_started" and event.execution is not None:
            self._started(event.execution)
        elif event.kind == "execution_done" and event.execution is not None:
            job = self.store.get_job(event.job)
            if job is None:
                self._orphans[event.job] = event.execution
            else:
                self._done(job, event.execution)
        elif event.kind == "job_deleted":
            execution = self._orphans.pop(event.job, None)
            if execution is not None and event.previous is not None:
                self._done(event.previous, execution)

    def _started(self, execution: Execution) -> None:
        s = self.settings
        if s.pre_webhook_endpoint and s.pre_webhook_payload:
            body = self._render(s.pre_webhook_payload, execution)
            self._spawn(
                partial(
                    self._post,
                    "pre",
                    execution.job_name,
                    s.pre_webhook_endpoint,
                    body,
                    s.pre_webhook_headers,
                )
            )

    def _done(self, job: Job, execution: Execution) -> None:
        if not execution.success and execution.attempt < job.retries + 1:
            return  # the dispatcher retries it; the last attempt notifies
        s = self.settings
        if s.webhook_endpoint and s.webhook_payload:
            body = self._render(s.webhook_payload, execution)
            self._spawn(
                partial(
                    self._post,
                    "post",
                    execution.job_name,
                    s.webhook_endpoint,
                    body,
                    s.webhook_headers,
                )
            )
        if s.mail_host and s.mail_port and job.owner_email:
            if s.mail_payload:
                text = self._render(s.mail_payload, execution)
            else:
                text = execution.output
            status = "Success" if execution.success else "Failed"
            # Dkron's subject, prefix and status without a space between.
            subject = f"{s.mail_subject_prefix}{status} {job.name} execution report"
            self._spawn(partial(self._mail, replace(s), job.owner_email, subject, text))

    def _render(self, template: str, execution: Execution) -> str:
        values = {
            # The report reads the execution group from the store: only
            # when the template asks for it.
            "Report": self._report(execution) if ".Report" in template else "",
            "JobName": execution.job_name,
            "ReportingNode": self.node_name,
            "StartTime": format_time(execution.started_at) or "",
            "FinishedAt": format_time(execution.finished_at) or "",
            "Success": "true" if execution.success else "false",
            "NodeName": execution.node_name,
            "Output": execution.output,
        }
        return render(template, values)

    def _report(self, execution: Execution) -> str:
        group = [
            e
            for e in self.store.executions(execution.job_name, with_output=False)
            if e.group == execution.group
        ]
        lines = [
            f"Executed: {execution.job_name}",
            f"Reporting node: {self.node_name}",
            f"Start time: {format_time(execution.started_at)}",
            f"End time: {format_time(execution.finished_at) or ''}",
            f"Success: {'true' if execution.success else 'false'}",
            f"Node: {execution.node_name}",
            f"Output: {execution.output}",
            f"Execution group: {execution.group}",
        ]
        for e in group:
            lines.append(
                f"\t[Node]: {e.node_name} [Start]: {format_time(e.started_at)} "
                f"[End]: {format_time(e.finished_at) or ''} "
                f"[Success]: {'true' if e.success else 'false'}"
            )
        return "\n".join(lines) + "\n"

    # -- sending
    def _spawn(self, send: Callable[[], Awaitable[None]]) -> None:
        """Run `send()` in a task, at most MAX_PARALLEL at once."""
        if len(self._tasks) >= MAX_PENDING:
            self.dropped.inc()
            log.warning("notification dropped: too many pending limit=%d", MAX_PENDING)
            return
        task = asyncio.get_running_loop().create_task(self._limited(send))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _limited(self, send: Callable[[], Awaitable[None]]) -> None:
        async with self._slots:
            await send()

    async def _post(
        self, hook: str, job_name: str, endpoint: str, body: str, headers: list[str]
    ) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=SEND_TIMEOUT)
        where = _safe_url(endpoint)
        try:
            response = await self._client.post(
                endpoint, content=body.encode(), headers=_headers(headers)
            )
        except httpx.HTTPError as exc:
            self.webhook_failed(job_name)
            log.warning(
                "webhook failed hook=%s endpoint=%s error=%s",
                hook,
                where,
                type(exc).__name__,
            )
            return
        if response.status_code >= 400:
            self.webhook_failed(job_name)
            log.warning(
                "webhook failed hook=%s endpoint=%s status=%d",
                hook,
                where,
                response.status_code,
            )
            return
        log.debug(
            "webhook sent hook=%s endpoint=%s status=%d",
            hook,
            where,
            response.status_code,
        )

    async def _mail(
        self, settings: NotifySettings, to: str, subject: str, text: str
    ) -> None:
        try:
            await asyncio.to_thread(_send_mail, settings, to, subject, text)
        except (OSError, smtplib.SMTPException, ValidationError) as exc:
            self.mail_failures.inc()
            # The exception text is smtplib's or the server's, never the
            # password; still keep it to the class and the server's code.
            code = getattr(exc, "smtp_code", "")
            log.warning(
                "mail failed host=%s port=%d to=%s error=%s%s",
                settings.mail_host,
                settings.mail_port,
                to,
                type(exc).__name__,
                f" code={code}" if code else "",
            )
            return
        log.debug("mail sent host=%s to=%s", settings.mail_host, to)

    async def close(self) -> None:
        """Stop pending sends (shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _send_mail(settings: NotifySettings, to: str, subject: str, text: str) -> None:
    """One mail over SMTP, STARTTLS when the server offers it (blocking).

    Limitation: no implicit TLS (port 465), as in Dkron; the password is
    only sent over TLS, or in clear to a loopback server (Go's rule).
    """
    message = EmailMessage()
    message["From"] = settings.mail_from
    message["To"] = to
    message["Subject"] = subject
    message.set_content(text)
    with smtplib.SMTP(
        settings.mail_host, settings.mail_port, timeout=SEND_TIMEOUT
    ) as smtp:
        smtp.ehlo()
        secure = False
        if smtp.has_extn("starttls"):
            smtp.starttls(context=ssl.create_default_context())
            smtp.ehlo()
            secure = True
        if settings.mail_username and settings.mail_password:
            if not secure and not _is_loopback(settings.mail_host):
                raise ValidationError(
                    "mail-password: the server offers no STARTTLS; "
                    "refusing to send the password in clear"
                )
            smtp.login(settings.mail_username, settings.mail_password)
        smtp.sendmail(settings.mail_from, [to], message.as_bytes())
