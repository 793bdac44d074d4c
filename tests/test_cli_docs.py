"""docs/cli.md matches the Typer app (scripts/gen-cli-docs writes it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_cli_docs_are_current(tmp_path: Path) -> None:
    fresh = tmp_path / "cli.md"
    subprocess.run(
        ["bash", str(REPO / "scripts" / "gen-cli-docs"), str(fresh)],
        check=True,
        cwd=REPO,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    text = fresh.read_text()
    # Every command of the app is in it, with its exit codes.
    for heading in ("### `cronmesh doctor`", "### `cronmesh jobs list`", "| 2 |"):
        assert heading in text
    checked_in = (REPO / "docs" / "cli.md").read_text()
    assert text == checked_in, "docs/cli.md is stale: run scripts/gen-cli-docs"
