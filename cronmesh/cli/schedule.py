"""``cronmesh schedule``: look at what a schedule expression means.

``cronmesh schedule next EXPR`` lists the next fire instants, in the manner of
``systemd-analyze calendar``: a table of local time, UTC and distance from
now, or a JSON list of RFC3339 strings with ``--json``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated
from zoneinfo import ZoneInfo

import typer
from rich.console import Console
from rich.table import Table

from cronmesh.cli.client import fail
from cronmesh.core.schedule import next_fires, parse_schedule
from cronmesh.errors import ScheduleError

__all__ = ["app"]

app = typer.Typer(
    help="Inspect schedule expressions.",
    no_args_is_help=True,
    add_completion=False,
)

# Exit status for input the user got wrong, as for every ValidationError.
_EXIT_BAD_INPUT = 2


@app.callback()
def _group() -> None:
    """Inspect schedule expressions."""
    # A callback keeps "next" a subcommand even while it is the only one.


@app.command("next")
def next_command(
    expr: Annotated[str, typer.Argument(help="Schedule, e.g. '0 30 2 * * *'.")],
    tz: Annotated[
        str, typer.Option("--tz", help="IANA zone of the job; default: local.")
    ] = "",
    start: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="ISO time to start after (no offset: in --tz); default: now.",
        ),
    ] = None,
    count: Annotated[
        int, typer.Option("-n", "--count", min=1, max=10_000, help="How many.")
    ] = 5,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON list of RFC3339 times.")
    ] = False,
    job_name: Annotated[
        str, typer.Option("--job-name", help="Job name that '~' hashes.")
    ] = "",
) -> None:
    """Show the next times EXPR fires."""
    now = datetime.now(UTC)
    try:
        schedule = parse_schedule(expr, tz, job_name)
        begin = _parse_start(start, schedule.zone, now)
        fires = next_fires(expr, tz, begin, count, job_name)
    except ScheduleError as exc:
        fail(str(exc), _EXIT_BAD_INPUT)
    if as_json:
        typer.echo(json.dumps([fire.isoformat() for fire in fires]))
        return
    _print_table(expr, str(schedule.zone), fires, now)


def _parse_start(text: str | None, zone: ZoneInfo, now: datetime) -> datetime:
    """``--from`` as an aware datetime; a naive time is read in the job zone."""
    if text is None:
        return now
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ScheduleError(f"--from: '{text}' is not an ISO time") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone)
    return parsed


def _print_table(expr: str, zone: str, fires: list[datetime], now: datetime) -> None:
    console = Console()
    if not fires:
        console.print(f"{expr!r} never fires again.")
        return
    table = Table(title=f"{expr}  ({zone})", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column(f"Local ({zone})")
    table.add_column("UTC")
    table.add_column("From now", justify="right")
    for index, fire in enumerate(fires, start=1):
        table.add_row(
            str(index),
            fire.strftime("%a %Y-%m-%d %H:%M:%S %Z"),
            fire.astimezone(UTC).strftime("%a %Y-%m-%d %H:%M:%S UTC"),
            _relative(fire - now),
        )
    console.print(table)


def _relative(delta: timedelta) -> str:
    """A rough human distance such as ``in 2d 3h`` or ``5min ago``."""
    seconds = round(abs(delta.total_seconds()))
    units = (("y", 365 * 86400), ("d", 86400), ("h", 3600), ("min", 60), ("s", 1))
    parts = []
    for name, size in units:
        if seconds >= size:
            parts.append(f"{seconds // size}{name}")
            seconds %= size
        if len(parts) == 2:  # two units are plenty for a glance
            break
    text = " ".join(parts) or "0s"
    return f"{text} ago" if delta < timedelta(0) else f"in {text}"
