"""Which nodes run a job: Dkron's tag rules, as a pure function.

A job's tags select nodes. Each tag `key: value` must be present with that
value on a node; a value may end in `:N` to run on at most N of the
matching nodes, picked at random (with several such tags the smallest N
counts). Only alive members of the leader's region qualify, and not one
that is draining (stopping: it gossips the tag `draining: true` and takes
no new runs), so N is picked among the others. A job without tags runs on
every alive node of the region.

The randomness is passed in, so the choice is reproducible in tests.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["DRAINING_TAG", "Candidate", "parse_tags", "select_targets"]

# The tag a stopping node gossips; its value is "true".
DRAINING_TAG = "draining"


@dataclass(frozen=True)
class Candidate:
    """A member as the scheduler sees it."""

    name: str
    tags: dict[str, str]
    status: str = "alive"


def parse_tags(tags: dict[str, str]) -> tuple[dict[str, str], int | None]:
    """Split `value:N` tags into bare values and the smallest N (None: all).

    A count that is not a whole number counts as 0 (no node), as in Dkron;
    job validation rejects such tags before they are stored.
    """
    bare: dict[str, str] = {}
    count: int | None = None
    for key, value in tags.items():
        head, sep, tail = value.partition(":")
        bare[key] = head
        if sep:
            n = int(tail) if tail.isdigit() else 0
            count = n if count is None else min(count, n)
    return bare, count


def select_targets(
    tags: dict[str, str],
    region: str,
    members: Iterable[Candidate],
    rng: random.Random,
) -> tuple[list[str], str]:
    """The names of the nodes to run on, sorted, and why none ("" if some)."""
    bare, count = parse_tags(tags)
    alive = [
        m for m in members if m.status == "alive" and m.tags.get(DRAINING_TAG) != "true"
    ]
    in_region = [m for m in alive if m.tags.get("region") == region]
    matching = [
        m for m in in_region if all(m.tags.get(k) == v for k, v in bare.items())
    ]
    if count is not None and count < len(matching):
        matching = rng.sample(matching, count)
    names = sorted(m.name for m in matching)
    if names:
        return names, ""
    if count == 0:
        return [], "the job's tags ask for 0 nodes"
    if not in_region:
        return [], f"no alive node in region {region!r}"
    wanted = ", ".join(f"{k}={v}" for k, v in sorted(bare.items()))
    return [], f"no alive node in region {region!r} has the tags {wanted}"
