"""The generated gRPC code in cronmesh/rpc/ matches protos/*.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(REPO / "scripts" / "gen-protos"), str(tmp_path)],
        check=True,
        cwd=REPO,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated, "gen-protos produced nothing"
    for name in generated:
        fresh = (tmp_path / name).read_text()
        checked_in = (REPO / "cronmesh" / "rpc" / name).read_text()
        assert fresh == checked_in, (
            f"cronmesh/rpc/{name} is stale: run scripts/gen-protos"
        )
