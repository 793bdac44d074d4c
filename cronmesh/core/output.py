"""Keeping the end of a job's output, and saying what was cut.

Every place that keeps only the end of an output uses these helpers: the
executor's and the runner's capped buffers, the state machine's
``--max-output``, the API's ``output_size_limit``, and the output stream a
follower reads (which skips bytes when it falls behind the capped live
buffer). So a cut output reads the same wherever it is seen::

    [... 344000 bytes cut ...]
    <the kept end, byte for byte>

Rules:
  1. One marker line, first, giving the TOTAL bytes cut from the job's
     output: cutting an output that already starts with a marker adds to
     its count instead of stacking a second marker.
  2. The marker counts against the limit: a trimmed output is at most
     ``limit`` bytes, marker included. A limit too small to hold a marker
     (only ``output_size_limit`` allows one, ``--max-output`` is at least
     1024) gets the bare end; the API says so in ``output_truncated``.
  3. A cut never splits a UTF-8 character: the continuation bytes at the
     cut go with it, and are counted.
  4. A follower's stream gets the same marker, on a line of its own, where
     it skipped bytes; the stream offsets keep counting the job's bytes only.

Limitation: an output whose first line is a job's own text in the marker's
exact form is read as a marker when it is cut again, so its count is added.
"""

from __future__ import annotations

import re

__all__ = [
    "OutputFollower",
    "char_start",
    "complete_end",
    "cut_marker",
    "keep_end",
    "split_cut",
    "trim_output",
    "trim_text",
]

_MARKER = re.compile(rb"\[\.\.\. ([0-9]{1,20}) bytes cut \.\.\.\]\n")
# UTF-8 continuation bytes are 0b10xxxxxx.
_CONTINUATION_MASK = 0xC0
_CONTINUATION = 0x80


def cut_marker(cut: int) -> bytes:
    """The marker line that says `cut` bytes are missing here."""
    return f"[... {cut} bytes cut ...]\n".encode()


def split_cut(data: bytes) -> tuple[int, bytes]:
    """Split a leading marker off `data`.

    Returns:
        (bytes the marker says were cut, the rest); (0, data) without one.
    """
    found = _MARKER.match(data)
    if found is None:
        return 0, data
    return int(found.group(1)), data[found.end() :]


def char_start(data: bytes, start: int) -> int:
    """The first index from `start` on that does not fall inside a UTF-8
    character (it moves at most 3 bytes, so binary output costs little)."""
    stop = min(start + 3, len(data))
    while start < stop and data[start] & _CONTINUATION_MASK == _CONTINUATION:
        start += 1
    return start


def complete_end(data: bytes) -> int:
    """The length of `data` without a UTF-8 character begun at its end and
    not finished (the rest of it has not been written yet)."""
    for back in range(1, min(4, len(data)) + 1):
        lead = data[-back]
        if lead & _CONTINUATION_MASK == _CONTINUATION:
            continue
        if lead & 0xE0 == 0xC0:
            size = 2
        elif lead & 0xF0 == 0xE0:
            size = 3
        elif lead & 0xF8 == 0xF0:
            size = 4
        else:  # ASCII, or a byte no UTF-8 character starts with
            size = 1
        return len(data) - back if size > back else len(data)
    return len(data)


def keep_end(tail: bytes, cut: int, limit: int) -> bytes:
    """At most `limit` bytes of an output: `tail` is its end, and the
    `cut` bytes before it are already gone.

    Returns `tail` itself when nothing was cut and it fits; otherwise one
    marker with the total cut, then the longest end of `tail` that fits and
    starts on a character.
    """
    if cut == 0 and len(tail) <= limit:
        return tail
    marker = cut_marker(cut)
    if len(marker) + len(tail) <= limit:
        return marker + tail
    # The count only grows, so a marker sized for the largest possible
    # count is never shorter than the one written.
    room = limit - len(cut_marker(cut + len(tail)))
    if room < 0:
        return tail[char_start(tail, max(len(tail) - limit, 0)) :]
    start = char_start(tail, len(tail) - room)
    return cut_marker(cut + start) + tail[start:]


def trim_output(data: bytes, limit: int) -> bytes:
    """`data` cut to at most `limit` bytes (see the rules above); `data`
    may already start with a marker."""
    if len(data) <= limit:
        return data
    cut, body = split_cut(data)
    return keep_end(body, cut, limit)


def trim_text(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, as ``trim_output``."""
    # surrogatepass: a lone surrogate from JSON must not make this raise.
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    return trim_output(data, limit).decode("utf-8", "surrogatepass")


class OutputFollower:
    """What one follower of a capped live buffer is sent, read after read.

    Each read gives the bytes the buffer still keeps from the follower's
    offset on. When the buffer dropped some of them meanwhile, the follower
    gets a marker saying how many, on a line of its own. A character begun
    at the end of a read is held back until its last byte is written, so
    neither a skip nor a chunk boundary leaves half a character before a
    marker.
    """

    def __init__(self, offset: int = 0) -> None:
        # Bytes of the job's output sent or skipped so far (never a marker's).
        self.offset = offset
        # Whether what was sent so far ends a line (a resumed stream
        # cannot know, and assumes so).
        self.at_line_start = True
        # Bytes reported skipped, in total.
        self.skipped = 0

    def take(self, kept: bytes, end: int, *, last: bool) -> bytes:
        """The next piece of the stream.

        Args:
            kept: the bytes the buffer keeps from `offset` on (or from its
                first kept byte, when it dropped those at `offset`).
            end: the buffer's total, the offset just after `kept`.
            last: no further read follows (the run ended, or one read was
                asked for): send everything.
        """
        start = end - len(kept)
        if start < self.offset:  # bytes the follower has already got
            kept, start = kept[self.offset - start :], self.offset
        marker = b""
        if start > self.offset:
            align = char_start(kept, 0)
            kept, start = kept[align:], start + align
            skipped = start - self.offset
            marker = (b"" if self.at_line_start else b"\n") + cut_marker(skipped)
            self.skipped += skipped
            self.at_line_start = True
        if not last:
            kept = kept[: complete_end(kept)]
        if kept:
            self.at_line_start = kept.endswith(b"\n")
        self.offset = start + len(kept)
        return marker + kept
