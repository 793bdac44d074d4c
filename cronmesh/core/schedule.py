"""Schedule expressions: parsing them and finding their next fire instant.

Theory of operation
-------------------
A schedule turns "now" into "the next instant this job fires". Five kinds exist:

* cron expressions: six fields ``sec min hour dom month dow`` (Dkron's order) or
  five classic fields with the seconds fixed at 0, plus the ``@daily`` family of
  descriptors, the ``~`` name hash and the ``L``/``W``/``#`` extensions;
* ``@every <Go duration>``: a fixed interval of whole seconds;
* ``@at <RFC3339>``: one instant;
* ``@after <RFC3339> [<ISO-8601 duration]``: one instant plus a grace period;
* ``@manually``: never fires.

Cron search happens in wall-clock time, never in instants. ``_CronSchedule``
walks naive local date-times field by field (month, then day, then time of day)
and only then maps each matching wall time onto the time line. Doing it this
way round is what keeps month and day arithmetic immune to DST: a day is a
calendar day however long it is, so a 23-hour day cannot make us skip a date.

Daylight saving time (ISC/Debian cron, with seconds added)
---------------------------------------------------------
A job is *fixed* when none of its second, minute and hour fields starts with
``*`` or ``?``; otherwise it is a *wildcard* job. This is vixie cron's
MIN_STAR/HR_STAR test, so ``*/15`` is a wildcard while ``2-23/4``, ``0-59`` and
``~`` are fixed. Every matching wall time is then mapped like this:

* wall time exists once: it fires at that instant;
* wall time repeated (clocks went back): a fixed job fires at the first
  occurrence only; a wildcard job fires at both;
* wall time skipped (clocks went forward): a fixed job fires once at the
  instant of the jump (02:30 on a 02:00->03:00 night fires at 03:00 new time);
  a wildcard job does not fire for it.

Several skipped wall times of one fixed job collapse into a single fire at the
jump, because an instant can only be returned once. ``@every`` and ``@at`` deal
in absolute instants and ignore all of this; the zone only renders the result.

Where croniter fits
-------------------
croniter expands the plain items (numbers, ranges, steps) into value sets. We
validate every item first, for messages that name the field, and work around
what croniter gets wrong: it reads a one-value range such as ``5-5`` or ``7-7``
(even ``12-12/3``) as the whole field, so those reach it as a single value; it
wraps backwards ranges, which we reject; it collapses full sets to ``'*'`` and
then treats them as unrestricted for the dom/dow OR rule, so restriction is
decided from the text instead; it reads ``15W`` as plain 15, refuses ``#``
mixed with other weekdays and loses months around ``L``, so ``L``, ``W``,
``#`` and ``dL`` never reach it; and its aware-datetime search runs a fixed
job twice in a repeated hour, so the search and the DST mapping are ours.

The search starts at ``now``'s own wall time. Past it, the earliest valid
instant of each wall time grows with the wall time, so the first hit wins. The
one exception is a repeated stretch that has begun but whose second copy is
still ahead: ``_repeated_before`` looks behind for that wildcard copy.

Limitation: a coming repeated stretch is found by probing the offset 3 hours
ahead, so a zone that moves its clock back by more than 3 hours at once (old
date-line moves) can lose wildcard fires in it. No zone does that today.

The objects are immutable and hold no per-job state. ``@after``'s catch-up
fire is the one place where that matters: see ``_AfterSchedule``.
"""

from __future__ import annotations

import bisect
import calendar
import functools
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import ClassVar, Protocol, runtime_checkable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from cronmesh.errors import ScheduleError

__all__ = [
    "Schedule",
    "ScheduleError",
    "load_zone",
    "next_fires",
    "parse_schedule",
]


@runtime_checkable
class Schedule(Protocol):
    """A parsed schedule; immutable and safe to share between threads.

    ``expr`` is the expression as given (stripped). One-shot schedules
    (``@at``, ``@after``) also carry ``once = True``.
    """

    @property
    def expr(self) -> str: ...

    @property
    def zone(self) -> ZoneInfo:
        """Renders results; after a TZ= prefix, the prefix's zone."""
        ...

    def next_after(self, after: datetime) -> datetime | None:
        """First fire instant strictly after ``after``.

        Args:
            after: an aware datetime (any zone).

        Returns:
            An aware datetime in the schedule's zone, or None when the schedule
            never fires again (``@manually``, a past ``@at``).

        Raises:
            ValueError: ``after`` is naive.
        """
        ...


# --------------------------------------------------------------------------
# Time zones


def load_zone(name: str) -> ZoneInfo:
    """Return the zone called ``name``; ``""`` and ``"Local"`` mean this machine's.

    Raises:
        ScheduleError: no zone of that name exists.
    """
    if name in ("", "Local"):
        return _local_zone()
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ScheduleError(
            f"timezone: unknown time zone '{name}'", field="timezone"
        ) from exc


def _local_zone() -> ZoneInfo:
    # The machine's zone has no portable name; TZ wins, then the target of the
    # /etc/localtime link (".../zoneinfo/Europe/Berlin"), then UTC.
    candidates = [os.environ.get("TZ", "").lstrip(":")]
    try:
        link = os.readlink("/etc/localtime")
    except OSError:
        link = ""
    if "zoneinfo/" in link:
        candidates.append(link.split("zoneinfo/", 1)[1])
    for name in candidates:
        if not name:
            continue
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            continue
    return ZoneInfo("UTC")


def _require_aware(after: datetime) -> datetime:
    if after.tzinfo is None or after.utcoffset() is None:
        raise ValueError("next_after needs an aware datetime")
    return after.astimezone(UTC)


# --------------------------------------------------------------------------
# Cron fields


@dataclass(frozen=True)
class _FieldSpec:
    """Static facts about one of the six cron fields."""

    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()  # names[i] stands for low + i


_SECOND = _FieldSpec("second", 0, 59)
_MINUTE = _FieldSpec("minute", 0, 59)
_HOUR = _FieldSpec("hour", 0, 23)
_DOM = _FieldSpec("day-of-month", 1, 31)
_MONTH = _FieldSpec(
    "month",
    1,
    12,
    (
        "JAN",
        "FEB",
        "MAR",
        "APR",
        "MAY",
        "JUN",
        "JUL",
        "AUG",
        "SEP",
        "OCT",
        "NOV",
        "DEC",
    ),
)
# 7 is accepted as a second Sunday (crontab(5)); it is folded to 0 on parse.
_DOW = _FieldSpec(
    "day-of-week", 0, 7, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
)
_FIELDS = (_SECOND, _MINUTE, _HOUR, _DOM, _MONTH, _DOW)

# Dkron's name hash: the modulus and offset that turn the hash into a value,
# per field index (second, minute, hour, dom, month, dow).
_HASH_RULES = ((60, 0), (60, 0), (24, 0), (28, 1), (12, 1), (7, 0))

_DESCRIPTORS = {
    "@yearly": "0 0 0 1 1 *",
    "@annually": "0 0 0 1 1 *",
    "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0",
    "@daily": "0 0 0 * * *",
    "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
    "@minutely": "0 * * * * *",
}

_PLAIN_ITEM = re.compile(r"^(\*|[0-9A-Z]+(?:-[0-9A-Z]+)?)(?:/(\d+))?$")
_W_ITEM = re.compile(r"^(\d+|L)W$")
_NTH_ITEM = re.compile(r"^([0-9A-Z]+)#(\d+)$")
_LAST_DOW_ITEM = re.compile(r"^([0-9A-Z]+)L$")
_EXTENSION_ITEM = re.compile(r"^(?:[0-9A-Z]+#\d+|\d*(?:LW|L|W))$")


@dataclass(frozen=True)
class _DaySpec:
    """What the day-of-month and day-of-week fields ask for.

    ``dom``/``dow`` hold plain values (dow with Sunday = 0); the tuples hold
    the extension items. ``*_restricted`` is False only for ``*`` and ``?``.
    """

    dom: frozenset[int]
    dom_last: bool  # L
    dom_weekday: tuple[int, ...]  # nW: nearest weekday to day n
    dom_last_weekday: bool  # LW
    dom_restricted: bool
    dow: frozenset[int]
    dow_nth: tuple[tuple[int, int], ...]  # (weekday, n) for weekday#n
    dow_last: tuple[int, ...]  # weekday L: last such weekday of the month
    dow_restricted: bool


def _field_error(spec: _FieldSpec, problem: str) -> ScheduleError:
    return ScheduleError(f"schedule: field '{spec.name}' {problem}", field="schedule")


def _value(spec: _FieldSpec, token: str) -> int:
    """One number or name of a field, range-checked."""
    if token.isdigit():
        number = int(token)
    elif token in spec.names:
        number = spec.low + spec.names.index(token)
    else:
        raise _field_error(spec, f"has unknown value '{token}'")
    if not spec.low <= number <= spec.high:
        raise _field_error(spec, f"value {number} out of range {spec.low}-{spec.high}")
    return number


def _check_plain_item(spec: _FieldSpec, item: str) -> str:
    """Validate a number/name/range/step item; return it with names resolved.

    Checking here, before croniter sees the item, is what gives every error a
    message naming the field, and it rejects backwards ranges, which croniter
    would silently wrap around.
    """
    match = _PLAIN_ITEM.match(item)
    if match is None:
        raise _field_error(spec, f"has malformed item '{item}'")
    body, step = match.groups()
    if step is not None and int(step) == 0:
        raise _field_error(spec, f"step in '{item}' must be at least 1")
    if body == "*":
        return item
    first, _, last = body.partition("-")
    low = _value(spec, first)
    high = _value(spec, last) if last else low
    if high < low:
        raise _field_error(spec, f"range '{body}' runs backwards")
    if last and low == high:
        # croniter reads "5-5" (and "5-5/2") as the whole field; it is just 5.
        return str(low % 7 if spec is _DOW else low)
    if not last:
        low = low % 7 if spec is _DOW else low  # a lone 7 is Sunday
        if step is None:
            return str(low)
        # "5/15" means 5-59/15; a weekday step stops at Saturday, as robfig.
        return f"{low}-{6 if spec is _DOW else spec.high}/{step}"
    return f"{low}-{high}" if step is None else f"{low}-{high}/{step}"


def _hash_value(index: int, job_name: str) -> str:
    if not job_name:
        raise ScheduleError("schedule: '~' needs a job name to hash", field="schedule")
    modulus, offset = _HASH_RULES[index]
    return str(sum(ord(char) for char in job_name) % modulus + offset)


def _split_field(index: int, text: str, job_name: str) -> tuple[list[str], bool]:
    """Resolve ``?`` and ``~`` in one field; return its items and the star flag.

    The star flag is vixie cron's: the field's text starts with ``*``/``?``.
    """
    star = text[0] in "*?"
    if "~" in text:
        text = text.replace("~", _hash_value(index, job_name))
    items = text.replace("?", "*").split(",")
    if any(not item for item in items):
        raise _field_error(_FIELDS[index], f"has an empty list item in '{text}'")
    return items, star


def _expand_plain(plain: list[list[str]]) -> list[list[int]]:
    """Expand validated plain items with croniter; ``[]`` fields stay empty.

    croniter's expansion is right once its inputs are clean; around it we
    restore full ranges where it collapses them to ``'*'`` (we need the values
    either way), and feed ``*`` for fields that had only extension items.
    """
    text = " ".join(",".join(items) if items else "*" for items in plain)
    try:
        expanded, _ = croniter.expand(text, second_at_beginning=True)
    except CroniterError as exc:  # pragma: no cover - items are prevalidated
        raise ScheduleError(f"schedule: {exc}", field="schedule") from exc
    # croniter returns minute..dow first and the seconds last.
    ordered = [expanded[5], *expanded[:5]]
    return [
        _values_of(spec, items, values)
        for spec, items, values in zip(_FIELDS, plain, ordered, strict=True)
    ]


def _values_of(spec: _FieldSpec, items: list[str], values: list[object]) -> list[int]:
    if not items:
        return []
    if values == ["*"]:
        high = 6 if spec is _DOW else spec.high
        return list(range(spec.low, high + 1))
    numbers = {int(str(value)) for value in values}
    if spec is _DOW:
        numbers = {number % 7 for number in numbers}
    return sorted(numbers)


def _parse_dom_items(items: list[str]) -> tuple[list[str], bool, tuple[int, ...], bool]:
    """Split day-of-month items into plain ones and the L/W extensions.

    Returns the plain items, whether ``L`` was given, the days of ``nW`` items
    and whether ``LW`` was given.
    """
    plain: list[str] = []
    last = last_weekday = False
    weekday: list[int] = []
    for item in items:
        if item == "L":
            last = True
        elif item == "LW":
            last_weekday = True
        elif (match := _W_ITEM.match(item)) is not None:
            weekday.append(_value(_DOM, match.group(1)))
        else:
            plain.append(_check_plain_item(_DOM, item))
    return plain, last, tuple(weekday), last_weekday


def _parse_dow_items(
    items: list[str],
) -> tuple[list[str], tuple[tuple[int, int], ...], tuple[int, ...]]:
    """Split day-of-week items into plain ones, ``d#n`` pairs and ``dL`` days."""
    plain: list[str] = []
    nth: list[tuple[int, int]] = []
    last: list[int] = []
    for item in items:
        if (match := _NTH_ITEM.match(item)) is not None:
            number = int(match.group(2))
            if not 1 <= number <= 5:
                raise _field_error(_DOW, f"'#{number}' out of range 1-5")
            nth.append((_value(_DOW, match.group(1)) % 7, number))
        elif (match := _LAST_DOW_ITEM.match(item)) is not None:
            last.append(_value(_DOW, match.group(1)) % 7)
        else:
            plain.append(_check_plain_item(_DOW, item))
    return plain, tuple(nth), tuple(last)


def _reject_extensions(spec: _FieldSpec, items: list[str]) -> list[str]:
    for item in items:
        if _EXTENSION_ITEM.match(item):
            raise _field_error(
                spec, f"does not accept '{item}'; L, W and # are for day fields"
            )
    return [_check_plain_item(spec, item) for item in items]


@dataclass(frozen=True)
class _CronFields:
    """A cron expression resolved to value sets."""

    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    months: frozenset[int]
    days: _DaySpec
    fixed: bool  # no '*'/'?' leading the second, minute or hour field


def _parse_cron_fields(text: str, job_name: str) -> _CronFields:
    """Parse five or six cron fields into value sets and day rules."""
    fields = text.upper().split()
    if len(fields) == 5:
        fields = ["0", *fields]  # classic cron: fire at second 0
    if len(fields) != 6:
        raise ScheduleError(
            f"schedule: expected 5 or 6 fields, found {len(fields)} in '{text}'",
            field="schedule",
        )
    split = [_split_field(i, part, job_name) for i, part in enumerate(fields)]
    items = [field_items for field_items, _ in split]
    stars = [star for _, star in split]
    dom_plain, dom_last, dom_weekday, dom_last_weekday = _parse_dom_items(items[3])
    dow_plain, dow_nth, dow_last = _parse_dow_items(items[5])
    plain = [
        _reject_extensions(_SECOND, items[0]),
        _reject_extensions(_MINUTE, items[1]),
        _reject_extensions(_HOUR, items[2]),
        dom_plain,
        _reject_extensions(_MONTH, items[4]),
        dow_plain,
    ]
    values = _expand_plain(plain)
    days = _DaySpec(
        dom=frozenset(values[3]),
        dom_last=dom_last,
        dom_weekday=dom_weekday,
        dom_last_weekday=dom_last_weekday,
        # Unlike vixie's DOM_STAR test, "*/2" counts as restricted here.
        dom_restricted=fields[3] not in ("*", "?"),
        dow=frozenset(values[5]),
        dow_nth=dow_nth,
        dow_last=dow_last,
        dow_restricted=fields[5] not in ("*", "?"),
    )
    parsed = _CronFields(
        seconds=tuple(values[0]),
        minutes=tuple(values[1]),
        hours=tuple(values[2]),
        months=frozenset(values[4]),
        days=days,
        fixed=not any(stars[:3]),
    )
    _check_days_exist(parsed)
    return parsed


def _check_days_exist(parsed: _CronFields) -> None:
    """Reject day-of-month/month pairs that never meet, such as 30 February."""
    days = parsed.days
    if days.dow_restricted or not days.dom_restricted:
        return
    if days.dom_last or days.dom_last_weekday:
        return
    wanted = set(days.dom) | set(days.dom_weekday)
    # 2000 is a leap year, so February counts 29 days here.
    longest = max(calendar.monthrange(2000, month)[1] for month in parsed.months)
    if min(wanted) > longest:
        months = ",".join(str(month) for month in sorted(parsed.months))
        raise ScheduleError(
            f"schedule: day-of-month {min(wanted)} never occurs in month(s) {months}",
            field="schedule",
        )


# --------------------------------------------------------------------------
# Cron search

# How far ahead to probe for an offset drop (a repeated stretch of wall time),
# and how many years to search before declaring that a schedule never fires.
# 100 years covers rare calendars such as MON#5 in February.
_FOLD_PROBE = timedelta(hours=3)
_SEARCH_YEARS = 100
_DAY_CACHE_SIZE = 512
_ONE_SECOND = timedelta(seconds=1)


def _nearest_weekday(year: int, month: int, day: int, last: int) -> int:
    """Quartz's ``dayW``: the weekday nearest to ``day`` within the month."""
    weekday = calendar.weekday(year, month, day)  # Monday = 0
    if weekday == 5:  # Saturday: Friday before, unless that leaves the month
        return day - 1 if day > 1 else day + 2
    if weekday == 6:  # Sunday: Monday after, unless that leaves the month
        return day + 1 if day < last else day - 2
    return day


def _matching_days(days: _DaySpec, year: int, month: int) -> tuple[int, ...]:
    """The days of one month that the dom and dow fields select."""
    first_weekday, last = calendar.monthrange(year, month)
    by_dom = {day for day in days.dom if day <= last}
    if days.dom_last:
        by_dom.add(last)
    if days.dom_last_weekday:
        by_dom.add(_nearest_weekday(year, month, last, last))
    for day in days.dom_weekday:
        if day <= last:
            by_dom.add(_nearest_weekday(year, month, day, last))
    by_dow = set()
    for day in range(1, last + 1):
        weekday = (first_weekday + day) % 7  # cron numbering, Sunday = 0
        if (
            weekday in days.dow
            or (weekday, (day - 1) // 7 + 1) in days.dow_nth
            or (weekday in days.dow_last and day + 7 > last)
        ):
            by_dow.add(day)
    # Both restricted: a day matches when either matches (cron's OR rule).
    if days.dom_restricted and days.dow_restricted:
        chosen = by_dom | by_dow
    elif days.dom_restricted:
        chosen = by_dom
    elif days.dow_restricted:
        chosen = by_dow
    else:
        chosen = set(range(1, last + 1))
    return tuple(sorted(chosen))


def _first_time(
    parsed: _CronFields, hour: int, minute: int, second: int
) -> tuple[int, int, int] | None:
    """The earliest matching time of day at or after hour:minute:second."""
    for h in parsed.hours[bisect.bisect_left(parsed.hours, hour) :]:
        low_minute = minute if h == hour else 0
        for m in parsed.minutes[bisect.bisect_left(parsed.minutes, low_minute) :]:
            low_second = second if (h == hour and m == minute) else 0
            index = bisect.bisect_left(parsed.seconds, low_second)
            if index < len(parsed.seconds):
                return h, m, parsed.seconds[index]
    return None


def _transition(zone: ZoneInfo, before: datetime, after: datetime) -> datetime:
    """The instant between ``before`` and ``after`` where the offset changes."""
    old = before.astimezone(zone).utcoffset()
    low, high = int(before.timestamp()), int(after.timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, zone).utcoffset() == old:
            low = middle
        else:
            high = middle
    return datetime.fromtimestamp(high, UTC)


@dataclass(frozen=True, eq=False)
class _CronSchedule:
    """A cron expression in a zone (see the module comment for DST)."""

    expr: str
    zone: ZoneInfo
    fields: _CronFields
    # Memo of matching days per (year, month); pure, so sharing it is safe.
    _days: dict[tuple[int, int], tuple[int, ...]] = field(
        default_factory=dict, repr=False
    )

    def next_after(self, after: datetime) -> datetime | None:
        """First fire instant strictly after ``after``; see ``Schedule``."""
        now = _require_aware(after)
        offset = now.astimezone(self.zone).utcoffset()
        assert offset is not None
        wall = now.replace(tzinfo=None) + offset
        best = self._first_from(wall, now)
        repeat = self._repeated_before(wall, now, offset)
        if repeat is not None and (best is None or repeat < best):
            best = repeat
        return None if best is None else best.astimezone(self.zone)

    def _first_from(self, wall: datetime, now: datetime) -> datetime | None:
        """The first instant after ``now`` of a matching wall time after ``wall``.

        Past ``now``'s wall time, the earliest valid instant of each wall time
        grows with the wall time, so the first wall time with one wins.
        """
        while (found := self._next_wall(wall)) is not None:
            instants, skip_to = self._instants(found)
            for instant in instants:
                if instant > now:
                    return instant
            wall = found if skip_to is None else skip_to
        return None

    def _repeated_before(
        self, wall: datetime, now: datetime, offset: timedelta
    ) -> datetime | None:
        """A wildcard job's second copy of a wall time earlier than ``wall``.

        When the clocks go back within the probe window, the wall times from
        the start of the repeated stretch up to ``now``'s own come round again
        after ``now``; ``_first_from`` never looks behind ``wall``.
        """
        if self.fields.fixed:
            return None
        ahead = (now + _FOLD_PROBE).astimezone(self.zone).utcoffset()
        assert ahead is not None
        if ahead >= offset:
            return None
        jump = _transition(self.zone, now, now + _FOLD_PROBE)
        repeat_from = (jump + ahead).replace(tzinfo=None)
        found = self._next_wall(repeat_from - _ONE_SECOND)
        if found is None or found > wall:  # later ones: _first_from's job
            return None
        return found.replace(tzinfo=UTC) - ahead

    def _instants(self, wall: datetime) -> tuple[list[datetime], datetime | None]:
        """Map a matching wall time onto UTC instants (the DST rule).

        Returns the instants and, inside a skipped stretch, the last wall time
        of that stretch so the caller can jump over it.
        """
        local = wall.replace(tzinfo=self.zone)
        first = local.utcoffset()
        second = local.replace(fold=1).utcoffset()
        assert first is not None and second is not None
        base = wall.replace(tzinfo=UTC)
        if first == second:
            return [base - first], None
        if first > second:  # repeated wall time: clocks went back
            if self.fields.fixed:
                return [base - first], None
            return [base - first, base - second], None
        # Skipped wall time: clocks went forward.
        jump = _transition(self.zone, base - second, base - first)
        skip_to = (jump + second).replace(tzinfo=None) - _ONE_SECOND
        return ([jump] if self.fields.fixed else []), skip_to

    def _next_wall(self, after: datetime) -> datetime | None:
        """The first matching naive wall time strictly after ``after``."""
        start = after.replace(microsecond=0) + _ONE_SECOND
        year, month, day = start.year, start.month, start.day
        clock = (start.hour, start.minute, start.second)
        while year <= min(start.year + _SEARCH_YEARS, 9998):
            if month in self.fields.months:
                found = self._first_in_month(year, month, day, clock)
                if found is not None:
                    return found
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
            day, clock = 1, (0, 0, 0)
        return None

    def _first_in_month(
        self, year: int, month: int, day: int, clock: tuple[int, int, int]
    ) -> datetime | None:
        days = self._month_days(year, month)
        for candidate in days[bisect.bisect_left(days, day) :]:
            lowest = clock if candidate == day else (0, 0, 0)
            found = _first_time(self.fields, *lowest)
            if found is not None:
                return datetime(year, month, candidate, *found)
        return None

    def _month_days(self, year: int, month: int) -> tuple[int, ...]:
        key = (year, month)
        days = self._days.get(key)
        if days is None:
            if len(self._days) >= _DAY_CACHE_SIZE:
                self._days.clear()
            days = _matching_days(self.fields.days, year, month)
            self._days[key] = days
        return days


# --------------------------------------------------------------------------
# @every, @at, @after, @manually

_GO_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]\d{2}:\d{2})$"
)
_ISO_DURATION = re.compile(
    r"^P(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)W)?(?:(\d+)D)?"
    r"(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?$"
)
# Dkron's ISO-8601 arithmetic: a year is 365 days and a month 30.
_ISO_UNIT_SECONDS = (365 * 86400, 30 * 86400, 7 * 86400, 86400, 3600, 60, 1)


def go_duration_seconds(text: str) -> float:
    """Go's ``time.ParseDuration`` syntax in seconds.

    Raises:
        ValueError: not a Go duration.
    """
    try:
        return _go_duration_ns(text.strip()) / 1e9
    except ScheduleError as exc:
        raise ValueError(f"invalid duration {text!r} (e.g. 500ms, 5s, 1m30s)") from exc


def _go_duration_ns(text: str) -> int:
    """Parse Go's ``time.ParseDuration`` syntax into whole nanoseconds."""
    sign, body = (-1, text[1:]) if text[:1] == "-" else (1, text.lstrip("+"))
    if body == "0":
        return 0
    total = 0
    position = 0
    for match in _GO_DURATION_PART.finditer(body):
        if match.start() != position:
            break
        number, unit = match.groups()
        whole, _, fraction = number.partition(".")
        unit_ns = _GO_UNIT_NS[unit]
        total += int(whole or 0) * unit_ns
        if fraction:
            total += int(fraction) * unit_ns // 10 ** len(fraction)
        position = match.end()
    if not body or position != len(body):
        raise ScheduleError(
            f"schedule: @every: invalid duration '{text}'", field="schedule"
        )
    return sign * total


def _parse_rfc3339(text: str, what: str) -> datetime:
    match = _RFC3339.match(text)
    if match is None:
        raise ScheduleError(
            f"schedule: {what}: '{text}' is not an RFC3339 time such as "
            "2024-01-31T09:00:00Z",
            field="schedule",
        )
    stamp, fraction, offset = match.groups()
    micro = (fraction or "").ljust(6, "0")[:6]  # truncate below 1 µs
    try:
        parsed = datetime.fromisoformat(f"{stamp}.{micro}")
        zone = datetime.fromisoformat(
            f"2000-01-01T00:00:00{offset.replace('Z', '+00:00')}"
        )
    except ValueError as exc:
        raise ScheduleError(
            f"{what}: '{text}' is not a valid time", field="schedule"
        ) from exc
    return parsed.replace(tzinfo=zone.tzinfo).astimezone(UTC)


def _parse_iso_duration(text: str) -> timedelta:
    match = _ISO_DURATION.match(text)
    if match is None or text in ("P", "PT") or text.endswith("T"):
        raise ScheduleError(
            f"schedule: @after: grace '{text}' is not an ISO-8601 duration "
            "such as PT30M",
            field="schedule",
        )
    seconds = sum(
        float(part) * unit
        for part, unit in zip(match.groups(), _ISO_UNIT_SECONDS, strict=True)
        if part is not None
    )
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class _EverySchedule:
    """``@every``: a fixed interval after the previous whole second."""

    expr: str
    zone: ZoneInfo
    interval: timedelta

    def next_after(self, after: datetime) -> datetime | None:
        """Floor ``after`` to the whole second, then add the interval."""
        # Absolute arithmetic in UTC: adding 24h to a Berlin wall time would
        # otherwise land on the same wall time across a DST change.
        now = _require_aware(after).replace(microsecond=0)
        try:
            return (now + self.interval).astimezone(self.zone)
        except OverflowError:
            return None  # past the year 9999: never


@dataclass(frozen=True)
class _AtSchedule:
    """``@at``: one instant; the zone only renders it."""

    expr: str
    zone: ZoneInfo
    instant: datetime
    once: ClassVar[bool] = True

    def next_after(self, after: datetime) -> datetime | None:
        """The instant if it is still ahead of ``after``, else None."""
        if self.instant > _require_aware(after):
            return self.instant.astimezone(self.zone)
        return None


@dataclass(frozen=True)
class _AfterSchedule:
    """``@after``: one instant, or a late catch-up within a grace period.

    ``next_after(t)`` is the instant when ``t`` is before it; ``t`` + 1 µs
    when ``instant < t < instant + grace`` (a late start fires at once); None
    otherwise. ``t == instant`` gives None because that is the call made right
    after firing on time. The object is stateless, so inside the grace period
    every call offers another catch-up: the scheduler must fire it once and
    then treat the job as spent (``once`` is True for that reason).
    """

    expr: str
    zone: ZoneInfo
    instant: datetime
    grace: timedelta
    once: ClassVar[bool] = True

    def next_after(self, after: datetime) -> datetime | None:
        """See the class docstring."""
        now = _require_aware(after)
        if self.instant > now:
            return self.instant.astimezone(self.zone)
        if self.instant < now < self.instant + self.grace:
            return (now + timedelta(microseconds=1)).astimezone(self.zone)
        return None


@dataclass(frozen=True)
class _ManualSchedule:
    """``@manually``: only ever run on demand."""

    expr: str
    zone: ZoneInfo

    def next_after(self, after: datetime) -> datetime | None:
        """Always None."""
        _require_aware(after)
        return None


# --------------------------------------------------------------------------
# Entry points

_TZ_PREFIX = re.compile(r"^(?:CRON_)?TZ=(\S*)\s+(.*)$", re.DOTALL)


def parse_schedule(expr: str, timezone: str = "", job_name: str = "") -> Schedule:
    """Parse a schedule expression for a job.

    Args:
        expr: cron fields, a descriptor, ``@every``/``@at``/``@after`` or
            ``@manually``, optionally prefixed with ``TZ=Zone`` or
            ``CRON_TZ=Zone`` (which overrides ``timezone``).
        timezone: the job's IANA zone; ``""`` is the machine's zone.
        job_name: what ``~`` hashes.

    Raises:
        ScheduleError: the expression or zone is invalid; the message names
            the problem in one line.
    """
    text = expr.strip()
    prefix = _TZ_PREFIX.match(text)
    if prefix is not None:
        timezone, text = prefix.group(1), prefix.group(2).strip()
        if not timezone:
            raise ScheduleError("schedule: empty TZ= prefix", field="schedule")
    if not text:
        raise ScheduleError("schedule: is empty", field="schedule")
    name = job_name if "~" in text else ""
    try:
        zone = load_zone(timezone)
    except ScheduleError as exc:
        if prefix is None:
            raise
        # The zone came from the schedule's own prefix: name that field.
        raise ScheduleError(
            f"schedule: unknown time zone '{timezone}' in the TZ= prefix",
            field="schedule",
        ) from exc
    return _parse_cached(expr.strip(), text, zone, name)


@functools.lru_cache(maxsize=4096)
def _parse_cached(original: str, text: str, zone: ZoneInfo, job_name: str) -> Schedule:
    # Parsing is pure, so the 2,000 jobs of a busy scheduler re-parse for free.
    if not text.startswith("@"):
        return _CronSchedule(original, zone, _parse_cron_fields(text, job_name))
    keyword, _, rest = text.partition(" ")
    keyword, rest = keyword.lower(), rest.strip()
    if keyword in _DESCRIPTORS and not rest:
        return _CronSchedule(
            original, zone, _parse_cron_fields(_DESCRIPTORS[keyword], "")
        )
    if keyword == "@manually" and not rest:
        return _ManualSchedule(original, zone)
    if keyword == "@every":
        return _parse_every(original, zone, rest)
    if keyword == "@at":
        return _AtSchedule(original, zone, _parse_rfc3339(rest, "@at"))
    if keyword == "@after":
        return _parse_after(original, zone, rest)
    raise ScheduleError(f"schedule: unknown descriptor '{text}'", field="schedule")


def _parse_every(text: str, zone: ZoneInfo, rest: str) -> _EverySchedule:
    nanoseconds = _go_duration_ns(rest)
    seconds = nanoseconds // 1_000_000_000 if nanoseconds > 0 else 0
    if seconds < 1:
        raise ScheduleError(
            "schedule: @every duration must be at least 1s", field="schedule"
        )
    if nanoseconds >= 1 << 63:
        # Go's time.Duration (and so Dkron) ends at about 292 years.
        raise ScheduleError(
            "schedule: @every duration longer than 2562047h (about 292 years)",
            field="schedule",
        )
    return _EverySchedule(text, zone, timedelta(seconds=seconds))


def _parse_after(text: str, zone: ZoneInfo, rest: str) -> _AfterSchedule:
    instant_text, _, grace_text = rest.partition(" ")
    grace_text = grace_text.strip()
    grace = timedelta(0)
    if grace_text:
        if not grace_text.startswith("<"):
            raise ScheduleError(
                "schedule: @after: expected '<' before the grace period, found "
                f"'{grace_text}'",
                field="schedule",
            )
        grace = _parse_iso_duration(grace_text[1:].strip())
    return _AfterSchedule(text, zone, _parse_rfc3339(instant_text, "@after"), grace)


def next_fires(
    expr: str, timezone: str, start: datetime, count: int, job_name: str = ""
) -> list[datetime]:
    """The next ``count`` fire instants strictly after ``start``.

    One-shot schedules (``@at``, ``@after``) yield at most one instant.

    Raises:
        ScheduleError: the expression or zone is invalid.
        ValueError: ``start`` is naive.
    """
    schedule = parse_schedule(expr, timezone, job_name)
    fires: list[datetime] = []
    cursor = start
    while len(fires) < count:
        fire = schedule.next_after(cursor)
        if fire is None:
            break
        fires.append(fire)
        if getattr(schedule, "once", False):
            break
        cursor = fire
    return fires
