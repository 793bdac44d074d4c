"""Unit tests for cronmesh.core.schedule and the ``schedule next`` command."""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cronmesh.cli.schedule import app
from cronmesh.core.schedule import (
    Schedule,
    load_zone,
    next_fires,
    parse_schedule,
)
from cronmesh.errors import ScheduleError, ValidationError


def fires(expr: str, start: str, count: int = 5, tz: str = "UTC", name: str = ""):
    """The next ``count`` fires as ISO strings, from an ISO start."""
    begin = datetime.fromisoformat(start)
    return [d.isoformat() for d in next_fires(expr, tz, begin, count, name)]


def days(expr: str, start: str, count: int = 5, tz: str = "UTC") -> list[str]:
    """Like ``fires`` but only the local dates."""
    return [stamp[:10] for stamp in fires(expr, start, count, tz)]


# --------------------------------------------------------------------------
# Field syntax


def test_five_fields_mean_classic_cron_with_second_zero() -> None:
    assert fires("30 2 * * *", "2024-01-01T00:00:00+00:00", 2) == [
        "2024-01-01T02:30:00+00:00",
        "2024-01-02T02:30:00+00:00",
    ]


def test_six_fields_start_with_seconds() -> None:
    assert fires("*/20 * * * * *", "2024-01-01T00:00:00+00:00", 3) == [
        "2024-01-01T00:00:20+00:00",
        "2024-01-01T00:00:40+00:00",
        "2024-01-01T00:01:00+00:00",
    ]


def test_names_are_case_insensitive() -> None:
    upper = fires("0 0 0 * JAN-MAR MON,FRI", "2024-01-01T00:00:00+00:00")
    lower = fires("0 0 0 * jan-mar mon,fri", "2024-01-01T00:00:00+00:00")
    assert upper == lower
    assert upper[:3] == [
        "2024-01-05T00:00:00+00:00",
        "2024-01-08T00:00:00+00:00",
        "2024-01-12T00:00:00+00:00",
    ]


def test_question_mark_is_a_star() -> None:
    assert fires("0 0 12 ? * ?", "2024-01-01T00:00:00+00:00") == fires(
        "0 0 12 * * *", "2024-01-01T00:00:00+00:00"
    )


@pytest.mark.parametrize("sunday", ["0", "7", "SUN", "sun", "7-7"])
def test_sunday_spellings(sunday: str) -> None:
    # 2024-01-07 is a Sunday.
    assert days(f"0 0 0 * * {sunday}", "2024-01-01T00:00:00+00:00", 2) == [
        "2024-01-07",
        "2024-01-14",
    ]


def test_weekday_range_through_seven() -> None:
    # 5-7 is Friday, Saturday, Sunday.
    assert days("0 0 0 * * 5-7", "2024-01-01T00:00:00+00:00", 3) == [
        "2024-01-05",
        "2024-01-06",
        "2024-01-07",
    ]


def test_ranges_lists_and_steps() -> None:
    assert fires("0 5-10/5,30 9 * * *", "2024-01-01T00:00:00+00:00", 4) == [
        "2024-01-01T09:05:00+00:00",
        "2024-01-01T09:10:00+00:00",
        "2024-01-01T09:30:00+00:00",
        "2024-01-02T09:05:00+00:00",
    ]


def test_single_value_with_step_runs_to_the_field_end() -> None:
    assert fires("0 50/4 * * * *", "2024-01-01T00:00:00+00:00", 4) == [
        "2024-01-01T00:50:00+00:00",
        "2024-01-01T00:54:00+00:00",
        "2024-01-01T00:58:00+00:00",
        "2024-01-01T01:50:00+00:00",
    ]


def test_day_steps_restart_each_month() -> None:
    assert days("0 0 0 */7 * *", "2024-01-28T00:00:00+00:00", 3) == [
        "2024-01-29",
        "2024-02-01",
        "2024-02-08",
    ]


def test_month_steps() -> None:
    assert days("0 0 0 1 */3 *", "2024-01-01T00:00:00+00:00", 3) == [
        "2024-04-01",
        "2024-07-01",
        "2024-10-01",
    ]


def test_dom_and_dow_both_restricted_match_either() -> None:
    # The 13th, or any Friday.
    assert days("0 0 0 13 * FRI", "2024-09-01T00:00:00+00:00", 4) == [
        "2024-09-06",
        "2024-09-13",
        "2024-09-20",
        "2024-09-27",
    ]


def test_a_stepped_dom_counts_as_restricted() -> None:
    # "*/10" is not "*": days 1, 11, 21, 31 or any Sunday.
    assert days("0 0 0 */10 * 0", "2024-03-01T00:00:00+00:00", 4) == [
        "2024-03-03",
        "2024-03-10",
        "2024-03-11",
        "2024-03-17",
    ]


def test_only_dow_restricted_ignores_dom() -> None:
    assert days("0 0 0 * * MON", "2024-01-01T00:00:00+00:00", 2) == [
        "2024-01-08",
        "2024-01-15",
    ]


def test_dom_31_skips_short_months() -> None:
    assert days("0 0 0 31 * *", "2024-01-31T00:00:00+00:00", 3) == [
        "2024-03-31",
        "2024-05-31",
        "2024-07-31",
    ]


def test_february_29_waits_for_leap_years() -> None:
    assert days("0 0 0 29 2 *", "2024-03-01T00:00:00+00:00", 2) == [
        "2028-02-29",
        "2032-02-29",
    ]


# --------------------------------------------------------------------------
# L, W and # extensions


def test_last_day_of_month() -> None:
    assert days("0 0 0 L * *", "2024-01-31T00:00:00+00:00", 3) == [
        "2024-02-29",
        "2024-03-31",
        "2024-04-30",
    ]


def test_last_day_inside_a_list_is_a_union() -> None:
    assert days("0 0 0 1,L * *", "2024-02-02T00:00:00+00:00", 3) == [
        "2024-02-29",
        "2024-03-01",
        "2024-03-31",
    ]


def test_last_weekday_of_month() -> None:
    # 2024-03-31 is a Sunday, 2024-08-31 a Saturday.
    assert days("0 0 0 LW 3 *", "2024-01-01T00:00:00+00:00", 1) == ["2024-03-29"]
    assert days("0 0 0 LW 8 *", "2024-01-01T00:00:00+00:00", 1) == ["2024-08-30"]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("0 0 0 15W 6 *", "2024-06-14"),  # Saturday -> Friday
        ("0 0 0 15W 9 *", "2024-09-16"),  # Sunday -> Monday
        ("0 0 0 15W 10 *", "2024-10-15"),  # weekday stays
        ("0 0 0 1W 6 *", "2024-06-03"),  # Saturday 1st -> Monday 3rd
        ("0 0 0 31W 3 *", "2024-03-29"),  # Sunday 31st -> Friday 29th
    ],
)
def test_nearest_weekday_stays_in_the_month(expr: str, expected: str) -> None:
    assert days(expr, "2024-01-01T00:00:00+00:00", 1) == [expected]


def test_nearest_weekday_skips_months_without_that_day() -> None:
    assert days("0 0 0 31W * *", "2024-04-01T00:00:00+00:00", 1) == ["2024-05-31"]


def test_nth_weekday_skips_months_without_it() -> None:
    assert days("0 0 9 * * MON#5", "2024-10-22T09:00:00+00:00", 2) == [
        "2024-12-30",
        "2025-03-31",
    ]


def test_nth_weekday_does_not_match_later_weeks() -> None:
    # 6#4: fourth Saturday only; 2024-08-31 is the fifth.
    assert days("0 0 0 * * 6#4", "2024-08-02T00:00:00+00:00", 2) == [
        "2024-08-24",
        "2024-09-28",
    ]


def test_nth_weekday_with_a_dom_list_is_a_union() -> None:
    # The 1st, the 15th, or the first Monday (2024-07-01 is both).
    assert days("0 0 0 1,15 * MON#1", "2024-06-02T00:00:00+00:00", 5) == [
        "2024-06-03",
        "2024-06-15",
        "2024-07-01",
        "2024-07-15",
        "2024-08-01",
    ]


def test_nth_weekday_mixed_with_plain_weekdays() -> None:
    # First Monday or any Wednesday; croniter rejects this mixture.
    assert days("0 0 0 * * 1#1,3", "2024-07-01T00:00:00+00:00", 3) == [
        "2024-07-03",
        "2024-07-10",
        "2024-07-17",
    ]


def test_last_given_weekday_of_month() -> None:
    assert days("0 0 0 * * 5L", "2024-01-01T00:00:00+00:00", 3) == [
        "2024-01-26",
        "2024-02-23",
        "2024-03-29",
    ]


# --------------------------------------------------------------------------
# Descriptors


@pytest.mark.parametrize(
    ("descriptor", "expected"),
    [
        ("@yearly", "2025-01-01T00:00:00+00:00"),
        ("@annually", "2025-01-01T00:00:00+00:00"),
        ("@monthly", "2024-07-01T00:00:00+00:00"),
        ("@weekly", "2024-06-16T00:00:00+00:00"),
        ("@daily", "2024-06-13T00:00:00+00:00"),
        ("@midnight", "2024-06-13T00:00:00+00:00"),
        ("@hourly", "2024-06-12T11:00:00+00:00"),
        ("@minutely", "2024-06-12T10:31:00+00:00"),
    ],
)
def test_descriptors(descriptor: str, expected: str) -> None:
    assert fires(descriptor, "2024-06-12T10:30:15+00:00", 1) == [expected]


def test_manually_never_fires() -> None:
    schedule = parse_schedule("@manually", "UTC")
    assert schedule.next_after(datetime.now(UTC)) is None
    assert fires("@manually", "2024-01-01T00:00:00+00:00") == []


# --------------------------------------------------------------------------
# @every


@pytest.mark.parametrize(
    ("duration", "seconds"),
    [
        ("10s", 10),
        ("1000ms", 1),
        ("1440m", 86400),
        ("1h30m10s", 5410),
        ("1.5s", 1),  # truncated to whole seconds
        ("2.5m", 150),
        ("1h0.5s", 3600),
        ("3000000us", 3),
        ("2000000000ns", 2),
    ],
)
def test_every_durations(duration: str, seconds: int) -> None:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    got = parse_schedule(f"@every {duration}", "UTC").next_after(start)
    assert got == start + timedelta(seconds=seconds)


def test_every_floors_to_the_whole_second() -> None:
    assert fires("@every 10s", "2018-12-05T11:30:38.9+00:00", 2) == [
        "2018-12-05T11:30:48+00:00",
        "2018-12-05T11:30:58+00:00",
    ]


def test_every_is_absolute_across_dst_but_rendered_in_zone() -> None:
    assert fires(
        "@every 1h", "2025-03-09T01:30:00-08:00", 2, "America/Los_Angeles"
    ) == [
        "2025-03-09T03:30:00-07:00",
        "2025-03-09T04:30:00-07:00",
    ]


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("@every 500ms", "@every duration must be at least 1s"),
        ("@every 0", "@every duration must be at least 1s"),
        ("@every 0s", "@every duration must be at least 1s"),
        ("@every -5s", "@every duration must be at least 1s"),
        ("@every 10", "invalid duration '10'"),
        ("@every 10x", "invalid duration '10x'"),
        ("@every", "invalid duration ''"),
        ("@every 1 h", "invalid duration '1 h'"),
    ],
)
def test_every_rejects(expr: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        parse_schedule(expr, "UTC")


# --------------------------------------------------------------------------
# @at and @after


def test_at_fires_once_at_its_own_offset() -> None:
    schedule = parse_schedule("@at 2024-05-01T10:00:00+02:00", "Asia/Tokyo")
    before = datetime(2024, 5, 1, tzinfo=UTC)
    got = schedule.next_after(before)
    assert got is not None
    assert got.isoformat() == "2024-05-01T17:00:00+09:00"
    assert schedule.next_after(got) is None
    assert schedule.next_after(got + timedelta(days=1)) is None


def test_at_accepts_fractional_seconds() -> None:
    got = fires("@at 2024-05-01T10:00:00.123456789Z", "2024-05-01T00:00:00+00:00")
    assert got == ["2024-05-01T10:00:00.123456+00:00"]


@pytest.mark.parametrize(
    "stamp",
    [
        "2019-04-29 23:46:49",
        "2019-04-29T23:46:49",
        "2019-04-29",
        "2019-02-30T00:00:00Z",
        "2019-04-29T23:46:49+0200",
        "tomorrow",
    ],
)
def test_at_rejects_non_rfc3339(stamp: str) -> None:
    with pytest.raises(ScheduleError, match="@at"):
        parse_schedule(f"@at {stamp}", "UTC")


AFTER = "@after 2024-01-01T09:00:00Z <PT30M"


def test_after_before_the_instant_returns_the_instant() -> None:
    got = fires(AFTER, "2024-01-01T08:00:00+00:00", 3)
    assert got == ["2024-01-01T09:00:00+00:00"]


def test_after_inside_grace_fires_right_away() -> None:
    schedule = parse_schedule(AFTER, "UTC")
    late = datetime(2024, 1, 1, 9, 10, tzinfo=UTC)
    assert schedule.next_after(late) == late + timedelta(microseconds=1)
    assert fires(AFTER, "2024-01-01T09:10:00+00:00", 3) == [
        "2024-01-01T09:10:00.000001+00:00"
    ]


@pytest.mark.parametrize(
    "start", ["2024-01-01T09:00:00+00:00", "2024-01-01T09:30:00+00:00"]
)
def test_after_at_the_instant_or_past_grace_is_spent(start: str) -> None:
    assert fires(AFTER, start) == []


def test_after_without_grace_behaves_like_at() -> None:
    assert fires("@after 2024-01-01T09:00:00Z", "2024-01-01T09:00:01+00:00") == []


@pytest.mark.parametrize(
    ("grace", "seconds"),
    [
        ("PT30M", 1800),
        ("PT1H30M", 5400),
        ("P1D", 86400),
        ("P1W", 7 * 86400),
        ("P1M", 30 * 86400),
        ("P1Y", 365 * 86400),
        ("PT0.5S", 0.5),
        ("P1DT2H", 93600),
    ],
)
def test_after_grace_durations(grace: str, seconds: float) -> None:
    schedule = parse_schedule(f"@after 2024-01-01T00:00:00Z <{grace}", "UTC")
    assert getattr(schedule, "grace") == timedelta(seconds=seconds)  # noqa: B009


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("@after 2024-01-01T09:00:00Z PT30M", "expected '<'"),
        ("@after 2024-01-01T09:00:00Z <30M", "ISO-8601"),
        ("@after 2024-01-01T09:00:00Z <P", "ISO-8601"),
        ("@after 2024-01-01T09:00:00Z <PT", "ISO-8601"),
        ("@after 2024-01-01 <PT30M", "RFC3339"),
    ],
)
def test_after_rejects(expr: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        parse_schedule(expr, "UTC")


# --------------------------------------------------------------------------
# ~ name hash and TZ prefixes


def test_hash_uses_the_code_point_sum_per_field() -> None:
    name = "backup"  # code points sum to 630
    assert sum(map(ord, name)) == 630
    schedule = parse_schedule("~ ~ ~ ~ ~ ~", "UTC", name)
    fields = getattr(schedule, "fields")  # noqa: B009
    assert fields.seconds == (630 % 60,)
    assert fields.minutes == (630 % 60,)
    assert fields.hours == (630 % 24,)
    assert fields.days.dom == frozenset({630 % 28 + 1})
    assert fields.months == frozenset({630 % 12 + 1})
    assert fields.days.dow == frozenset({630 % 7})


def test_hash_in_five_field_form_hashes_by_field_meaning() -> None:
    # "~ 3 * * *": the ~ is the minute, so it hashes modulo 60.
    assert fires("~ 3 * * *", "2024-01-01T00:00:00+00:00", 1, name="backup") == [
        "2024-01-01T03:30:00+00:00"
    ]


def test_hash_inside_a_step() -> None:
    # "~/15" with hash 30 is "30/15", i.e. minutes 30 and 45.
    assert fires("0 ~/15 * * * *", "2024-01-01T00:00:00+00:00", 3, name="backup") == [
        "2024-01-01T00:30:00+00:00",
        "2024-01-01T00:45:00+00:00",
        "2024-01-01T01:30:00+00:00",
    ]


def test_hash_needs_a_job_name() -> None:
    with pytest.raises(ScheduleError, match="needs a job name"):
        parse_schedule("0 ~ * * * *", "UTC")


@pytest.mark.parametrize("prefix", ["TZ", "CRON_TZ"])
def test_tz_prefix_overrides_the_job_zone(prefix: str) -> None:
    got = fires(f"{prefix}=Asia/Tokyo 0 0 9 * * *", "2024-01-01T00:00:00+00:00", 1)
    assert got == ["2024-01-02T09:00:00+09:00"]


def test_tz_prefix_is_kept_in_expr_and_sets_the_zone() -> None:
    schedule = parse_schedule("  CRON_TZ=Asia/Tokyo @daily ", "UTC")
    assert schedule.expr == "CRON_TZ=Asia/Tokyo @daily"
    assert schedule.zone == ZoneInfo("Asia/Tokyo")


def test_tz_prefix_with_an_unknown_zone() -> None:
    unknown = "unknown time zone 'Mars/Base'"
    with pytest.raises(ScheduleError, match=unknown) as prefixed:
        parse_schedule("TZ=Mars/Base 0 0 9 * * *", "UTC")
    # The zone came from the schedule, so the error names that field.
    assert prefixed.value.field == "schedule"
    assert str(prefixed.value).startswith("schedule: ")
    with pytest.raises(ScheduleError) as field:
        parse_schedule("0 0 9 * * *", "Mars/Base")
    assert field.value.field == "timezone"
    assert str(field.value).startswith("timezone: ")


# --------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "schedule: is empty"),
        ("   ", "schedule: is empty"),
        ("* * * *", "expected 5 or 6 fields, found 4"),
        ("0 0 0 * * * *", "expected 5 or 6 fields, found 7"),
        ("0 0 25 * * *", "field 'hour' value 25 out of range 0-23"),
        ("60 * * * * *", "field 'second' value 60 out of range 0-59"),
        ("0 60 * * * *", "field 'minute' value 60 out of range 0-59"),
        ("0 0 0 0 * *", "field 'day-of-month' value 0 out of range 1-31"),
        ("0 0 0 32 * *", "field 'day-of-month' value 32 out of range 1-31"),
        ("0 0 0 * 13 *", "field 'month' value 13 out of range 1-12"),
        ("0 0 0 * * 8", "field 'day-of-week' value 8 out of range 0-7"),
        ("0 0 0 * FOO *", "field 'month' has unknown value 'FOO'"),
        ("0 0 0 * * MONDAY", "field 'day-of-week' has unknown value 'MONDAY'"),
        ("0 */0 * * * *", "field 'minute' step in '\\*/0' must be at least 1"),
        ("0 50-10 * * * *", "field 'minute' range '50-10' runs backwards"),
        ("0 0 L * * *", "field 'hour' does not accept 'L'"),
        ("0 0 0 * 5W *", "field 'month' does not accept '5W'"),
        ("0 0 0 * * MON#6", "'#6' out of range 1-5"),
        ("0 0 0 1,,2 * *", "empty list item"),
        ("0 0 0 1-2-3 * *", "malformed item '1-2-3'"),
        ("0 0 0 30 2 *", "day-of-month 30 never occurs in month\\(s\\) 2"),
        ("0 0 0 31 4,6 *", "day-of-month 31 never occurs"),
        ("@fortnightly", "unknown descriptor '@fortnightly'"),
        ("@daily 5", "unknown descriptor"),
        ("TZ= 0 0 * * *", "empty TZ= prefix"),
        ("@every 0s", "@every duration must be at least 1s"),
        ("@every 10x", "@every: invalid duration '10x'"),
        ("@at tomorrow", "@at: 'tomorrow' is not an RFC3339 time"),
        ("@after 2026-01-01T00:00:00Z <P1", "@after: grace 'P1'"),
    ],
)
def test_errors_name_the_problem(expr: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message) as caught:
        parse_schedule(expr, "UTC")
    # Every message names its field first, as the API's other errors do.
    assert str(caught.value).startswith("schedule: ")
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ValidationError)


def test_next_after_needs_an_aware_datetime() -> None:
    schedule = parse_schedule("0 * * * * *", "UTC")
    with pytest.raises(ValueError, match="aware"):
        schedule.next_after(datetime(2024, 1, 1))


def test_parsed_schedules_satisfy_the_protocol() -> None:
    for expr in ("0 * * * *", "@every 1s", "@at 2024-01-01T00:00:00Z", "@manually"):
        schedule = parse_schedule(expr, "UTC")
        assert isinstance(schedule, Schedule)
        assert schedule.expr == expr


# --------------------------------------------------------------------------
# Zones


def test_load_zone_by_name() -> None:
    assert load_zone("Europe/Berlin") == ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize("name", ["America/New York", "Nowhere", "../etc/passwd"])
def test_load_zone_rejects_unknown_names(name: str) -> None:
    with pytest.raises(ScheduleError, match=f"unknown time zone '{name}'"):
        load_zone(name)


def test_load_zone_empty_follows_tz(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    assert load_zone("") == ZoneInfo("Asia/Kolkata")
    monkeypatch.setenv("TZ", ":Europe/Paris")
    assert load_zone("") == ZoneInfo("Europe/Paris")


def test_load_zone_empty_survives_a_bad_tz(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Not/AZone")
    assert isinstance(load_zone(""), ZoneInfo)


def test_schedules_render_in_their_zone() -> None:
    assert fires("0 0 9 * * *", "2024-07-01T00:00:00+00:00", 1, "Asia/Kolkata") == [
        "2024-07-01T09:00:00+05:30"
    ]


# --------------------------------------------------------------------------
# Daylight saving time


BERLIN = "Europe/Berlin"  # 2023-10-29 03:00 CEST -> 02:00 CET
LA = "America/Los_Angeles"  # 2025-03-09 02:00 PST -> 03:00 PDT


def test_wildcard_hour_fires_in_both_copies_of_a_repeated_hour() -> None:
    assert fires("0 0 * * * *", "2023-10-29T01:30:00+02:00", 3, BERLIN) == [
        "2023-10-29T02:00:00+02:00",
        "2023-10-29T02:00:00+01:00",
        "2023-10-29T03:00:00+01:00",
    ]


def test_wildcard_minute_fires_in_both_copies() -> None:
    assert fires("0 */30 2 * * *", "2023-10-29T01:30:00+02:00", 5, BERLIN) == [
        "2023-10-29T02:00:00+02:00",
        "2023-10-29T02:30:00+02:00",
        "2023-10-29T02:00:00+01:00",
        "2023-10-29T02:30:00+01:00",
        "2023-10-30T02:00:00+01:00",
    ]


def test_fixed_time_fires_only_at_the_first_copy() -> None:
    assert fires("0 30 2 * * *", "2023-10-29T01:30:00+02:00", 2, BERLIN) == [
        "2023-10-29T02:30:00+02:00",
        "2023-10-30T02:30:00+01:00",
    ]


def test_start_inside_the_first_copy_still_sees_the_second() -> None:
    # 02:10 CET comes after 02:30 CEST on the time line.
    assert fires("0 10 * * * *", "2023-10-29T02:30:00+02:00", 2, BERLIN) == [
        "2023-10-29T02:10:00+01:00",
        "2023-10-29T03:10:00+01:00",
    ]


def test_start_exactly_at_a_wall_time_that_repeats() -> None:
    assert fires("0 0 * * * *", "2023-10-29T02:00:00+02:00", 2, BERLIN) == [
        "2023-10-29T02:00:00+01:00",
        "2023-10-29T03:00:00+01:00",
    ]


def test_every_second_across_the_fall_back_is_fast() -> None:
    schedule = parse_schedule("* * * * * *", BERLIN)
    start = datetime.fromisoformat("2023-10-29T02:59:59+02:00")
    began = time.perf_counter()
    got = schedule.next_after(start)
    assert time.perf_counter() - began < 0.05
    assert got is not None and got.isoformat() == "2023-10-29T02:00:00+01:00"


def test_start_inside_the_second_copy() -> None:
    assert fires("0 10 * * * *", "2023-10-29T02:30:00+01:00", 1, BERLIN) == [
        "2023-10-29T03:10:00+01:00"
    ]


def test_fixed_time_in_a_gap_fires_once_at_the_jump() -> None:
    assert fires("0 0,30 2 * * *", "2025-03-09T00:00:00-08:00", 3, LA) == [
        "2025-03-09T03:00:00-07:00",
        "2025-03-10T02:00:00-07:00",
        "2025-03-10T02:30:00-07:00",
    ]


def test_fixed_time_in_a_gap_and_at_the_jump_fires_once() -> None:
    assert fires("0 0 2,3 * * *", "2025-03-09T00:00:00-08:00", 2, LA) == [
        "2025-03-09T03:00:00-07:00",
        "2025-03-10T02:00:00-07:00",
    ]


def test_wildcard_in_a_gap_does_not_fire() -> None:
    assert fires("0 */20 2 * * *", "2025-03-09T00:00:00-08:00", 1, LA) == [
        "2025-03-10T02:00:00-07:00"
    ]
    assert fires("* * * * * *", "2025-03-09T01:59:59-08:00", 2, LA) == [
        "2025-03-09T03:00:00-07:00",
        "2025-03-09T03:00:01-07:00",
    ]


def test_half_hour_dst_shift() -> None:
    # Lord Howe moves its clocks by 30 minutes: 02:00 -> 02:30 on 2024-10-06.
    assert fires(
        "0 15 2 * * *", "2024-10-05T12:00:00+10:30", 2, "Australia/Lord_Howe"
    ) == [
        "2024-10-06T02:30:00+11:00",
        "2024-10-07T02:15:00+11:00",
    ]


def test_midnight_gap_does_not_lose_the_day() -> None:
    # Sao Paulo 2018-11-04: 00:00 -> 01:00.
    assert fires(
        "0 0 0 * * *", "2018-11-03T12:00:00-03:00", 2, "America/Sao_Paulo"
    ) == [
        "2018-11-04T01:00:00-02:00",
        "2018-11-05T00:00:00-02:00",
    ]


def test_next_after_is_fast() -> None:
    schedule = parse_schedule("0 */5 9-17 * * MON-FRI", BERLIN)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    began = time.perf_counter()
    for _ in range(2000):
        schedule.next_after(start)
    # Generous bound for slow CI machines; measured at ~15 µs a call.
    assert (time.perf_counter() - began) / 2000 < 0.001


# --------------------------------------------------------------------------
# Property tests

ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/Los_Angeles",
    "Australia/Sydney",
    "America/Sao_Paulo",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
]


@st.composite
def cron_field(draw: st.DrawFn, low: int, high: int) -> tuple[str, set[int], bool]:
    """A field text, the values it selects and whether it starts with '*'."""
    kind = draw(st.sampled_from(["star", "value", "range", "step", "list"]))
    if kind == "star":
        return "*", set(range(low, high + 1)), True
    if kind == "step":
        step = draw(st.integers(1, high - low + 1))
        return f"*/{step}", set(range(low, high + 1, step)), True
    if kind == "value":
        value = draw(st.integers(low, high))
        return str(value), {value}, False
    if kind == "range":
        first = draw(st.integers(low, high))
        last = draw(st.integers(first, high))
        step = draw(st.integers(1, 5))
        return f"{first}-{last}/{step}", set(range(first, last + 1, step)), False
    values = draw(st.sets(st.integers(low, high), min_size=1, max_size=4))
    return ",".join(map(str, sorted(values))), values, False


@st.composite
def cron_expr(draw: st.DrawFn) -> tuple[str, list[tuple[str, set[int], bool]]]:
    fields = [
        draw(cron_field(0, 59)),
        draw(cron_field(0, 59)),
        draw(cron_field(0, 23)),
        draw(cron_field(1, 31)),
        draw(cron_field(1, 12)),
        draw(cron_field(0, 6)),
    ]
    return " ".join(text for text, _, _ in fields), fields


def wall_matches(fields: list[tuple[str, set[int], bool]], wall: datetime) -> bool:
    """Independent matcher: the six value sets and cron's dom/dow OR rule."""
    sec, minute, hour, dom, month, dow = (values for _, values, _ in fields)
    dom_free = fields[3][0] == "*"
    dow_free = fields[5][0] == "*"
    day_ok_dom = wall.day in dom
    day_ok_dow = (wall.isoweekday() % 7) in dow
    if dom_free:
        day_ok = day_ok_dow
    elif dow_free:
        day_ok = day_ok_dom
    else:
        day_ok = day_ok_dom or day_ok_dow
    return (
        wall.second in sec
        and wall.minute in minute
        and wall.hour in hour
        and wall.month in month
        and day_ok
    )


def parse_or_reject(text: str, zone: str) -> Schedule:
    """Parse, discarding examples such as "0 0 0 31 2 *" that can never fire."""
    try:
        return parse_schedule(text, zone)
    except ScheduleError as exc:
        assert "never occurs" in str(exc)
        assume(False)
        raise


def gap_start(fire: datetime) -> timedelta | None:
    """The size of a clock jump that happens exactly at ``fire``, if any."""
    before = (fire - timedelta(seconds=1)).utcoffset()
    after = fire.utcoffset()
    assert before is not None and after is not None
    return after - before if after > before else None


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    expr=cron_expr(),
    zone=st.sampled_from(ZONES),
    start=st.datetimes(
        datetime(1995, 1, 1), datetime(2035, 1, 1), timezones=st.just(UTC)
    ),
)
def test_property_increasing_and_matching(
    expr: tuple[str, list[tuple[str, set[int], bool]]], zone: str, start: datetime
) -> None:
    text, fields = expr
    fixed = not any(star for _, _, star in fields[:3])
    schedule = parse_or_reject(text, zone)
    previous = start
    for _ in range(6):
        fire = schedule.next_after(previous)
        assert fire is not None
        assert fire.timestamp() > previous.timestamp()
        wall = fire.replace(tzinfo=None, fold=0)
        if wall_matches(fields, wall):
            # A fixed job never fires in the second copy of a repeated hour.
            if fixed and fire.fold == 1:
                assert fire.replace(fold=0).utcoffset() == fire.utcoffset()
        else:
            # Only a fixed job may fire off-pattern: at a clock jump, for a
            # wall time the jump skipped.
            jump = gap_start(fire)
            assert fixed and jump is not None, (text, fire.isoformat())
            skipped = (
                wall - jump + timedelta(seconds=s)
                for s in range(int(jump.total_seconds()))
            )
            assert any(wall_matches(fields, moment) for moment in skipped)
        previous = fire


def nearest_weekday_oracle(day: date) -> date:
    """Search outward from ``day`` for the closest Monday-Friday in its month."""
    for distance in (0, -1, 1, -2, 2):
        moved = day + timedelta(days=distance)
        if moved.month == day.month and moved.weekday() < 5:
            return moved
    raise AssertionError(day)


def day_item_matches(item: str, day: date) -> bool:
    """Independent reading of one dom (``L``, ``LW``, ``nW``, ``n``) or dow
    (``d#n``, ``dL``, ``d``) item, written as plainly as possible."""
    kind, _, body = item.partition(":")
    cron_weekday = day.isoweekday() % 7
    next_month = (day + timedelta(days=1)).month != day.month
    if kind == "dom" and body == "L":
        return next_month
    if kind == "dom" and body == "LW":
        last = day
        while (last + timedelta(days=1)).month == day.month:
            last += timedelta(days=1)
        return nearest_weekday_oracle(last) == day
    if kind == "dom" and body.endswith("W"):
        try:
            target = day.replace(day=int(body[:-1]))
        except ValueError:
            return False
        return nearest_weekday_oracle(target) == day
    if kind == "dom":
        return day.day == int(body)
    if "#" in body:
        weekday, nth = map(int, body.split("#"))
        earlier = sum(
            1
            for back in range(1, day.day)
            if (day - timedelta(days=back)).isoweekday() % 7 == weekday
        )
        return cron_weekday == weekday and earlier + 1 == nth
    if body.endswith("L"):
        same_month_next_week = (day + timedelta(days=7)).month == day.month
        return cron_weekday == int(body[:-1]) and not same_month_next_week
    return cron_weekday == int(body)


DOM_ITEMS = st.sampled_from(["L", "LW", "1W", "15W", "30W", "31W", "1", "31"])
DOW_ITEMS = st.one_of(
    st.builds("{}#{}".format, st.integers(0, 6), st.integers(1, 5)),
    st.builds("{}L".format, st.integers(0, 6)),
    st.builds(str, st.integers(0, 6)),
)


@settings(max_examples=100, deadline=None)
@given(
    dom=st.lists(DOM_ITEMS, max_size=3, unique=True),
    dow=st.lists(DOW_ITEMS, max_size=3, unique=True),
    start=st.dates(date(2000, 1, 1), date(2030, 1, 1)),
)
def test_property_day_extensions_match_a_day_by_day_oracle(
    dom: list[str], dow: list[str], start: date
) -> None:
    assume(dom or dow)
    text = f"0 0 0 {','.join(dom) or '*'} * {','.join(dow) or '*'}"
    items = [f"dom:{item}" for item in dom] + [f"dow:{item}" for item in dow]
    window = [start + timedelta(days=offset) for offset in range(1, 400)]
    expected = [d for d in window if any(day_item_matches(i, d) for i in items)]
    begin = datetime(start.year, start.month, start.day, tzinfo=UTC)
    got = [
        fire.date()
        for fire in next_fires(text, "UTC", begin, len(expected) + 1)
        if fire.date() <= window[-1]
    ]
    assert got == expected, text


# (zone, UTC instant of a clock change): forward and back, 60 and 30 minutes.
TRANSITIONS = [
    ("Europe/Berlin", datetime(2023, 3, 26, 1, 0, tzinfo=UTC)),
    ("Europe/Berlin", datetime(2023, 10, 29, 1, 0, tzinfo=UTC)),
    ("America/Los_Angeles", datetime(2025, 3, 9, 10, 0, tzinfo=UTC)),
    ("America/Los_Angeles", datetime(2025, 11, 2, 9, 0, tzinfo=UTC)),
    ("Australia/Sydney", datetime(2019, 10, 5, 16, 0, tzinfo=UTC)),
    ("Australia/Sydney", datetime(2019, 4, 6, 16, 0, tzinfo=UTC)),
    ("Australia/Lord_Howe", datetime(2024, 10, 5, 15, 30, tzinfo=UTC)),
    ("Australia/Lord_Howe", datetime(2024, 4, 6, 15, 0, tzinfo=UTC)),
    ("America/Sao_Paulo", datetime(2018, 11, 4, 3, 0, tzinfo=UTC)),
    ("America/Sao_Paulo", datetime(2019, 2, 17, 2, 0, tzinfo=UTC)),
]


def oracle_fires(
    fields: list[tuple[str, set[int], bool]],
    zone: ZoneInfo,
    start: datetime,
    end: datetime,
) -> list[datetime]:
    """The DST rule restated minute by minute on the time line (seconds = 0).

    Each instant fires when its wall time matches, except a fixed job's
    second copy of a repeated wall time; at a forward jump a fixed job also
    fires when any skipped wall time matches.
    """
    fixed = not any(star for _, _, star in fields[:3])
    found = []
    moment = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while moment <= end:
        local = moment.astimezone(zone)
        wall = local.replace(tzinfo=None, fold=0)
        repeated = local.fold == 1 and local.replace(fold=0).utcoffset() != (
            local.utcoffset()
        )
        fire = wall_matches(fields, wall) and not (fixed and repeated)
        jump = gap_start(local)
        if fixed and jump is not None and not fire:
            minutes = int(jump.total_seconds()) // 60
            skipped = (wall - jump + timedelta(minutes=m) for m in range(minutes))
            fire = any(wall_matches(fields, wall_time) for wall_time in skipped)
        if fire and moment > start:
            found.append(moment)
        moment += timedelta(minutes=1)
    return found


def listed(text: str, values: range | list[int]) -> tuple[str, set[int], bool]:
    return text, set(values), text.startswith("*")


# Minute and hour fields around local 00:00-03:00, where clocks change.
NEAR_MINUTES = [
    listed("0", [0]),
    listed("30", [30]),
    listed("59", [59]),
    listed("0,30", [0, 30]),
    listed("15-45/15", [15, 30, 45]),
    listed("*/20", range(0, 60, 20)),
    listed("*", range(60)),
]
NEAR_HOURS = [
    listed("0", [0]),
    listed("1", [1]),
    listed("2", [2]),
    listed("3", [3]),
    listed("1-3", [1, 2, 3]),
    listed("2-23/4", range(2, 24, 4)),
    listed("*/2", range(0, 24, 2)),
    listed("*", range(24)),
]


@settings(max_examples=200, deadline=None)
@given(
    minute=st.sampled_from(NEAR_MINUTES),
    hour=st.sampled_from(NEAR_HOURS),
    transition=st.sampled_from(TRANSITIONS),
    lead=st.integers(-4 * 3600, 3 * 3600),
)
def test_property_dst_matches_a_time_line_oracle(
    minute: tuple[str, set[int], bool],
    hour: tuple[str, set[int], bool],
    transition: tuple[str, datetime],
    lead: int,
) -> None:
    # Seconds fixed at 0 and every day allowed, so the transition day counts.
    fields = [
        listed("0", [0]),
        minute,
        hour,
        listed("*", range(1, 32)),
        listed("*", range(1, 13)),
        listed("*", range(7)),
    ]
    text = " ".join(field_text for field_text, _, _ in fields)
    zone_name, instant = transition
    schedule = parse_or_reject(text, zone_name)
    start = instant + timedelta(seconds=lead)
    end = instant + timedelta(hours=5)
    expected = oracle_fires(fields, ZoneInfo(zone_name), start, end)
    got = []
    cursor: datetime | None = start
    while cursor is not None:
        cursor = schedule.next_after(cursor)
        if cursor is None or cursor > end:
            break
        got.append(cursor)
    assert [g.timestamp() for g in got] == [e.timestamp() for e in expected]
    assert all(g.tzinfo == ZoneInfo(zone_name) for g in got)


@settings(max_examples=150, deadline=None)
@given(
    expr=cron_expr(),
    start=st.datetimes(datetime(1995, 1, 1), datetime(2035, 1, 1)),
)
def test_property_agrees_with_croniter_in_utc(
    expr: tuple[str, list[tuple[str, set[int], bool]]], start: datetime
) -> None:
    text, fields = expr
    # croniter decides "restricted" after expanding (so 0-6 counts as '*'),
    # which is a different OR rule; compare only where the rules agree.
    if fields[3][0] != "*" and fields[5][0] != "*":
        return
    if fields[3][1] == set(range(1, 32)) or fields[5][1] == set(range(7)):
        return
    parse_or_reject(text, "UTC")
    ours = fires(text, start.replace(tzinfo=UTC).isoformat(), 4)
    # croniter wants the seconds last when it reads six fields.
    parts = text.split()
    reference = croniter(" ".join([*parts[1:], parts[0]]), start)
    theirs = [
        reference.get_next(datetime).replace(tzinfo=UTC).isoformat() for _ in range(4)
    ]
    assert ours == theirs


# --------------------------------------------------------------------------
# CLI

runner = CliRunner()


def test_cli_json_lists_rfc3339_times() -> None:
    result = runner.invoke(
        app,
        [
            "next",
            "0 0 2 * * *",
            "--tz",
            LA,
            "--from",
            "2025-03-08T12:00:00-08:00",
            "-n",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        "2025-03-09T03:00:00-07:00",
        "2025-03-10T02:00:00-07:00",
    ]


def test_cli_reads_a_naive_from_in_the_job_zone() -> None:
    result = runner.invoke(
        app,
        [
            "next",
            "@hourly",
            "--tz",
            "Asia/Tokyo",
            "--from",
            "2024-01-01T00:30:00",
            "-n",
            "1",
            "--json",
        ],
    )
    assert json.loads(result.stdout) == ["2024-01-01T01:00:00+09:00"]


def test_cli_table_shows_local_utc_and_relative() -> None:
    result = runner.invoke(
        app,
        ["next", "0 0 9 * * *", "--tz", "Asia/Tokyo", "--from", "2024-01-01T00:00:00Z"],
    )
    assert result.exit_code == 0, result.output
    assert "2024-01-02 09:00:00 JST" in result.stdout
    assert "2024-01-02 00:00:00 UTC" in result.stdout
    assert "ago" in result.stdout
    assert result.stdout.count("JST") == 5


def test_cli_default_start_is_now() -> None:
    result = runner.invoke(app, ["next", "@every 1h", "-n", "1"])
    assert result.exit_code == 0, result.output
    assert "in 1h" in result.stdout or "in 59min" in result.stdout


def test_cli_hashes_with_job_name() -> None:
    result = runner.invoke(
        app,
        [
            "next",
            "0 ~ * * * *",
            "--job-name",
            "backup",
            "--tz",
            "UTC",
            "--from",
            "2024-01-01T00:00:00Z",
            "-n",
            "1",
            "--json",
        ],
    )
    assert json.loads(result.stdout) == ["2024-01-01T00:30:00+00:00"]


def test_cli_one_shot_that_never_fires() -> None:
    result = runner.invoke(app, ["next", "@at 2019-01-01T00:00:00Z"])
    assert result.exit_code == 0
    assert "never fires again" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["next", "0 0 25 * * *"], "field 'hour' value 25 out of range 0-23"),
        (["next", "@every 1s", "--tz", "America/New York"], "unknown time zone"),
        (["next", "@every 1s", "--from", "yesterday"], "--from: 'yesterday'"),
        (["next", ""], "schedule: is empty"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert message in result.stderr
    assert "Traceback" not in result.output
