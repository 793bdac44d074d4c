"""The gossip package exports a complete public API, and it stays pure."""

from __future__ import annotations

import ast
from pathlib import Path

import cronmesh.gossip as gossip

PURE = ["awareness", "broadcast", "config", "core", "messages", "outputs"]
PURE += ["suspicion", "tags"]


def test_all_resolves_without_duplicates() -> None:
    # Order is enforced by ruff (RUF022, isort-style: constants first).
    assert len(set(gossip.__all__)) == len(gossip.__all__)
    for name in gossip.__all__:
        assert getattr(gossip, name) is not None


def test_core_modules_import_no_clock_socket_or_global_rng() -> None:
    root = Path(gossip.__file__).parent
    for module in PURE:
        tree = ast.parse((root / f"{module}.py").read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in (
                node.names
                if isinstance(node, ast.Import)
                else [ast.alias(node.module or "")]
            )
        }
        assert not imported & {"time", "socket", "asyncio", "os"}, module
        source = (root / f"{module}.py").read_text()
        assert "random.random(" not in source and "random.randrange(" not in source
