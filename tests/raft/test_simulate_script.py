"""scripts/simulate-raft: runs seeds and prints a replay command on failure."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from cronmesh.raft.sim import SafetyViolation

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "simulate-raft"


def load_script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("simulate_raft", str(SCRIPT))
    spec = importlib.util.spec_from_loader("simulate_raft", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_runs_seeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert load_script().main(["--seeds", "2", "--start", "5", "-v"]) == 0
    out = capsys.readouterr().out
    assert "ok seed=5" in out and "2 seeds, 0 failed" in out


def test_failure_prints_seed_and_replay(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    script = load_script()

    def broken(seed: int, *args: object) -> None:
        raise SafetyViolation("two leaders in term 3: n1 and n2")

    monkeypatch.setattr(script, "run_seed", broken)
    assert script.main(["--seeds", "3", "--start", "41", "--nodes", "5"]) == 1
    err = capsys.readouterr().err
    assert "FAIL seed=41: SafetyViolation: two leaders" in err
    assert "replay: scripts/simulate-raft --start 41 --seeds 1 -vv --nodes 5" in err
