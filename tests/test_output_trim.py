"""Cutting outputs to a size (cronmesh.core.output) and the places using it:
the capped buffer, the state machine's --max-output, a follower's stream."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cronmesh.core.executors import OutputBuffer
from cronmesh.core.fsm import StateMachine, encode_command
from cronmesh.core.model import Execution
from cronmesh.core.output import (
    OutputFollower,
    complete_end,
    cut_marker,
    split_cut,
    trim_output,
    trim_text,
)
from cronmesh.rpc import agent_pb2
from cronmesh.rpc.agent_rpc import AgentService
from cronmesh.storage.env import DataDir
from cronmesh.storage.state import StateStore

MARKER = re.compile(rb"\[\.\.\. (\d+) bytes cut \.\.\.\]\n")


def accounted(trimmed: bytes) -> int:
    """Bytes the trimmed output stands for: what its marker says was cut
    plus what it kept."""
    cut, body = split_cut(trimmed)
    return cut + len(body)


# One-byte, two-, three- and four-byte characters, mixed so that a cut at
# any offset can land inside a character.
TEXTS = {
    "ascii": "line of text\n" * 300,
    "two-byte": "é" * 1500,
    "three-byte": "€" * 1100,
    "four-byte": "😀" * 900,
    "mixed": "a€😀é\n" * 400,
}


@pytest.mark.parametrize("name", sorted(TEXTS))
@pytest.mark.parametrize("limit", [100, 101, 102, 103, 500, 1023, 1024])
def test_trim_keeps_whole_characters_within_the_limit(name: str, limit: int) -> None:
    data = TEXTS[name].encode()
    trimmed = trim_output(data, limit)
    assert len(trimmed) <= limit
    assert len(MARKER.findall(trimmed)) == 1
    cut, body = split_cut(trimmed)
    # The kept end is the original end, starts on a character, and the
    # count covers exactly what is missing.
    assert data.endswith(body) and cut + len(body) == len(data)
    body.decode("utf-8")  # strict: raises on half a character
    # Little more than needed was given up: at most 3 bytes of a character,
    # and a digit the count turned out not to need.
    assert limit - len(trimmed) <= 4


def test_an_output_that_fits_is_returned_as_it_is() -> None:
    data = b"short\n"
    assert trim_output(data, 6) is data
    text = "déjà\n"
    assert trim_text(text, 100) is text
    # An output already cut and within the limit keeps its marker unchanged.
    cut = cut_marker(40) + b"tail\n"
    assert trim_output(cut, len(cut)) is cut


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_repeated_trims_give_one_marker_with_the_total(name: str) -> None:
    data = TEXTS[name].encode()
    once = trim_output(data, 300)
    again = trim_output(trim_output(trim_output(data, 2000), 900), 300)
    assert again == once
    assert len(MARKER.findall(again)) == 1
    assert accounted(again) == len(data)


def test_an_executor_cut_followed_by_notes_is_counted_once() -> None:
    # The executor kept its end and marked the cut, then lines were added.
    executor = cut_marker(344_000) + b"x" * 1000 + b"\nEND\n"
    stored = trim_output(executor + b"[cronmesh] a note\n", 512)
    assert stored.count(b"bytes cut") == 1 and len(stored) <= 512
    assert stored.endswith(b"END\n[cronmesh] a note\n")
    assert accounted(stored) == 344_000 + 1000 + len(b"\nEND\n[cronmesh] a note\n")


def test_the_marker_grows_a_digit_without_passing_the_limit() -> None:
    # 9,990 bytes cut before, a few more now: the count needs a fifth digit.
    data = cut_marker(9_990) + b"z" * 200
    trimmed = trim_output(data, 150)
    assert len(trimmed) <= 150
    assert accounted(trimmed) == 9_990 + 200
    assert split_cut(trimmed)[0] >= 10_000


def test_a_limit_below_the_marker_keeps_the_bare_end() -> None:
    assert trim_output(b"0123456789abcdef", 10) == b"6789abcdef"
    # Never half a character, even then.
    assert trim_text("ab€€€", 4) == "€"


def test_trim_text_survives_a_lone_surrogate() -> None:
    text = "\ud800" + "y" * 300
    trimmed = trim_text(text, 100)
    assert trimmed.endswith("y" * 50) and "bytes cut" in trimmed


def test_complete_end_holds_back_half_a_character() -> None:
    euro = "€".encode()
    assert complete_end(b"abc") == 3
    assert complete_end(b"ab" + euro) == 5
    assert complete_end(b"ab" + euro[:2]) == 2
    assert complete_end(b"ab" + euro[:1]) == 2
    assert complete_end("😀".encode()[:3]) == 0
    assert complete_end(b"") == 0
    # Bytes no character starts with are passed on, not held.
    assert complete_end(b"\xff") == 1


# --------------------------------------------------------------------------
# The capped buffer


def test_output_buffer_counts_its_marker_in_its_size() -> None:
    buf = OutputBuffer(100)
    for _ in range(50):
        buf.write(b"0123456789")
    value = buf.getvalue()
    assert len(value) <= 100 and value.endswith(b"0123456789")
    assert accounted(value) == buf.total == 500


def test_output_buffer_never_starts_inside_a_character() -> None:
    buf = OutputBuffer(100)
    buf.write("€".encode() * 200)  # 600 bytes; 100 kept would split one
    value = buf.getvalue()
    assert split_cut(value)[1].decode("utf-8") == "€" * (len(value) // 3 - 8)
    assert accounted(value) == 600


# --------------------------------------------------------------------------
# A follower of the capped buffer


def follow(buf: OutputBuffer, follower: OutputFollower, *, last: bool = False) -> bytes:
    kept, end = buf.read_from(follower.offset)
    return follower.take(kept, end, last=last)


def test_a_follower_that_keeps_up_gets_every_byte() -> None:
    buf, follower = OutputBuffer(100), OutputFollower()
    got = b""
    for i in range(30):
        buf.write(f"line {i}\n".encode())
        got += follow(buf, follower)
    assert got == b"".join(f"line {i}\n".encode() for i in range(30))
    assert follower.offset == buf.total and follower.skipped == 0


def test_a_follower_that_falls_behind_is_told_what_it_skipped() -> None:
    buf, follower = OutputBuffer(100), OutputFollower()
    buf.write(b"first line\nhalf a li")
    got = follow(buf, follower)
    buf.write(b"ne\n" + b"x" * 500 + b"\nlast\n")
    got += follow(buf, follower, last=True)
    # The marker starts a line of its own, counts exactly the bytes missing,
    # and the offset is the buffer's total, markers not counted.
    head, marker, tail = got.partition(cut_marker(follower.skipped))
    assert head == b"first line\nhalf a li\n" and marker
    assert tail.endswith(b"x\nlast\n")
    assert len(b"first line\nhalf a li") + follower.skipped + len(tail) == buf.total
    assert follower.offset == buf.total


def test_a_follower_gets_no_half_character_around_a_skip() -> None:
    buf, follower = OutputBuffer(100), OutputFollower()
    euro = "€".encode()
    buf.write(b"ab" + euro[:1])  # the rest of the character is not written yet
    got = follow(buf, follower)
    assert got == b"ab" and follower.offset == 2
    buf.write(euro[1:] + euro * 100)  # 302 more: the follower fell behind
    got += follow(buf, follower, last=True)
    text = got.decode("utf-8")  # strict
    assert text.startswith("ab\n[... ") and text.endswith("€")
    assert follower.offset == buf.total
    _, skipped_and_rest = text.split("\n", 1)
    cut, body = split_cut(skipped_and_rest.encode())
    assert 2 + cut + len(body) == buf.total


def test_one_read_of_a_cut_buffer_starts_with_the_marker() -> None:
    buf = OutputBuffer(100)
    buf.write(b"y" * 1000)
    got = OutputFollower().take(*buf.read_from(0), last=True)
    assert accounted(got) == 1000 and got.startswith(b"[... ")


# --------------------------------------------------------------------------
# The state machine's --max-output


def test_stored_output_keeps_one_marker_with_the_total(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "d")
    fsm = StateMachine(StateStore(data), max_output=1024)
    job = {"name": "j", "schedule": "@every 1m", "executor": "shell"}
    job["executor_config"] = {"command": "true"}
    at = datetime(2026, 1, 1, tzinfo=UTC)
    started = Execution(job_name="j", started_at=at, node_name="n", group=1)
    done = Execution(
        job_name="j",
        started_at=at,
        node_name="n",
        group=1,
        finished_at=at,
        success=False,
        output=cut_marker(5000).decode() + "é" * 700 + "\n[cronmesh] killed\n",
    )
    results = fsm.apply_batch(
        [
            (1, encode_command("set_job", job=job)),
            (2, encode_command("execution_started", execution=started.to_json())),
            (3, encode_command("execution_done", execution=done.to_json())),
        ]
    )
    assert all(r.ok for r in results), results
    stored = fsm.store.executions("j")[0].output.encode()
    assert len(stored) <= 1024 and stored.count(b"bytes cut") == 1
    assert stored.endswith("é\n[cronmesh] killed\n".encode())
    assert accounted(stored) == 5000 + len(done.output.encode()) - len(cut_marker(5000))
    data.close()


def test_the_output_rpc_marks_a_skip_and_keeps_counting_job_bytes() -> None:
    buf = OutputBuffer(100)
    buf.write(b"hello\n")
    reads: list[int] = []

    def output(exec_id: str, offset: int) -> tuple[bytes, int, bool]:
        reads.append(offset)
        if len(reads) == 2:  # the job wrote faster than the follower read
            buf.write(b"y" * 500 + b"\nbye\n")
        kept, end = buf.read_from(offset)
        return kept, end, len(reads) >= 2

    async def no_run(job: dict[str, object], execution: dict[str, object]) -> None:
        return None

    service = AgentService(no_run, lambda exec_id: False, output)
    request = agent_pb2.OutputRequest(execution_id="e", follow=True)

    async def collect() -> list[agent_pb2.OutputChunk]:
        return [chunk async for chunk in service.Output(request, None)]  # type: ignore[arg-type]

    chunks = asyncio.run(collect())
    assert [c.offset for c in chunks] == [6, buf.total] and chunks[-1].finished
    assert reads == [0, 6]
    stream = b"".join(c.data for c in chunks)
    assert stream.startswith(b"hello\n[... ") and stream.endswith(b"y\nbye\n")
    cut, rest = split_cut(stream[len(b"hello\n") :])
    assert 6 + cut + len(rest) == buf.total
