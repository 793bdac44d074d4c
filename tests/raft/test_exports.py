"""The package root exports a sorted, complete public API.

Submodule ``__all__`` order is enforced by ruff (RUF022).
"""

from __future__ import annotations

import cronmesh.raft as raft
from cronmesh.raft import errors


def test_all_is_sorted_and_resolves() -> None:
    assert raft.__all__ == sorted(raft.__all__)
    for name in raft.__all__:
        assert getattr(raft, name) is not None


def test_errors_are_under_cronmesh_error() -> None:
    from cronmesh.errors import CronmeshError

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), CronmeshError)
