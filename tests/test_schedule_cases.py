"""The shared schedule cases, run through ``cronmesh schedule next --json``.

Every ``check`` and ``extra_checks`` entry of ``schedules.json`` becomes one
test (``S05``, ``S05-extra-1``, ...). A check whose ``next`` is null must be
rejected: exit status 2, one line on stderr, and a ScheduleError from the
parser. Otherwise both the instants and the rendered offsets must match.

The file lives outside the repository, at ``../shared/cases/schedules.json``;
set CRONMESH_CASES_DIR to a directory holding ``schedules.json`` to use
another copy. Without the file the module is skipped.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cronmesh.cli.schedule import app
from cronmesh.core.schedule import parse_schedule
from cronmesh.errors import ScheduleError


def _cases_file() -> Path:
    override = os.environ.get("CRONMESH_CASES_DIR")
    if override:
        return Path(override) / "schedules.json"
    return Path(__file__).resolve().parents[2] / "shared" / "cases" / "schedules.json"


CASES_FILE = _cases_file()
if not CASES_FILE.is_file():
    pytest.skip(f"no schedule cases at {CASES_FILE}", allow_module_level=True)


def _checks() -> list[Any]:
    """One pytest param per check, with ids S01, S05-extra-1, ..."""
    params = []
    for case in json.loads(CASES_FILE.read_text(encoding="utf-8")):
        params.append(pytest.param(case["check"], id=case["id"]))
        for number, extra in enumerate(case.get("extra_checks", []), start=1):
            params.append(pytest.param(extra, id=f"{case['id']}-extra-{number}"))
    return params


runner = CliRunner()


def _run_next(check: dict[str, Any], count: int) -> Any:
    args = ["next", check["expr"], "--tz", check["tz"], "--from", check["start"]]
    return runner.invoke(app, [*args, "-n", str(count), "--json"])


def _instant_and_offset(stamp: str) -> tuple[float, Any]:
    moment = datetime.fromisoformat(stamp)
    return moment.timestamp(), moment.utcoffset()


@pytest.mark.parametrize("check", _checks())
def test_case(check: dict[str, Any]) -> None:
    expected = check["next"]
    if expected is None:
        result = _run_next(check, 1)
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1, result.stderr
        with pytest.raises(ScheduleError):
            parse_schedule(check["expr"], check["tz"])
        return
    # Ask for one more than expected when nothing is: "never" must stay empty.
    result = _run_next(check, max(len(expected), 1))
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert [_instant_and_offset(s) for s in got] == [
        _instant_and_offset(s) for s in expected
    ]
    assert got == expected  # same rendering too, digit for digit
