"""Every command that prints data takes --json; shell completion works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer.main
from conftest import REPO, shell_job
from typer.testing import CliRunner

from cronmesh.cli.main import app
from cronmesh.gossip.keyring import generate_key

# A node and a shell script print no data; a backup is a JSON document.
WITHOUT_JSON = {"cronmesh agent", "cronmesh backup", "cronmesh completion"}


def leaf_commands(command: Any, path: str) -> Iterator[tuple[str, Any]]:
    children = getattr(command, "commands", None)
    if children is None:
        yield path, command
        return
    for name, child in children.items():
        yield from leaf_commands(child, f"{path} {name}")


def test_every_command_that_prints_data_takes_json() -> None:
    root = typer.main.get_command(app)
    missing = {
        path
        for path, command in leaf_commands(root, "cronmesh")
        if not any("--json" in p.opts for p in command.params)
    }
    assert missing == WITHOUT_JSON


def test_json_of_every_command(agent_factory: Any, tmp_path: Path) -> None:
    key, other = generate_key(), generate_key()
    node = agent_factory("--encrypt", key, name="j1")
    runner = CliRunner()

    import time
    t0 = time.monotonic()

    def run(*args: str) -> Any:
        print(round(time.monotonic() - t0, 2), args)
        result = runner.invoke(app, [*args, "--json"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (args, result.output)
        return json.loads(result.stdout)

    at = ("--address", node.url)
    assert run("version")["version"]
    assert len(run("keygen")["key"]) == 44
    assert [m["Name"] for m in run("members", *at)] == ["j1"]
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps(shell_job("js", "echo hi")))
    assert run("jobs", "apply", "-f", str(spec), *at)[0]["name"] == "js"
    assert [j["name"] for j in run("jobs", "list", *at)] == ["js"]
    assert run("jobs", "show", "js", *at)["executor"] == "shell"
    exec_id = run("jobs", "run", "js", *at)["execution_id"]
    node.finished("js")
    assert run("executions", "js", *at)[0]["id"] == exec_id
    assert run("executions", "logs", "js", exec_id, *at)["output"] == "hi\n"
    assert run("jobs", "toggle", "js", *at)["disabled"] is True
    assert run("jobs", "delete", "js", *at)["name"] == "js"
    assert len(run("schedule", "next", "@every 1m", "-n", "2")) == 2
    assert run("raft", "list-peers", *at)[0]["ID"] == "j1"
    where = ("--data-dir", str(node.data_dir))
    assert run("keyring", "list", *where)["keys"] == [key]
    assert run("keyring", "install", other, *where)["keys"] == [key, other]
    assert run("keyring", "use", other, *where)["primary"] == other
    assert run("keyring", "remove", key, *where)["keys"] == [other]
    report = run("doctor", *at, *where)
    assert report["ok"] is True
    assert {c["name"]: c["status"] for c in report["checks"]}["gossip key"] == "ok"
    assert run("leave", *at)["left"] is True
    node.proc.wait(30)
    peers = tmp_path / "peers.json"
    peers.write_text('["j1"]')
    recovered = run("raft", "recover", "--peers", str(peers), *where)
    assert recovered["voters"] == ["j1"] and recovered["index"] > 0


def test_shell_completion_scripts_and_answers() -> None:
    runner = CliRunner()
    bash = runner.invoke(app, ["completion", "bash"])
    assert bash.exit_code == 0
    assert "complete -o default -F _cronmesh_completion cronmesh" in bash.stdout
    zsh = runner.invoke(app, ["completion", "zsh"])
    assert zsh.stdout.startswith("#compdef cronmesh")
    unknown = runner.invoke(app, ["completion", "tcsh"])
    assert unknown.exit_code == 2 and "tcsh" in unknown.output
    # What the bash script runs on <TAB>, through `python -m cronmesh`'s
    # main(), which names the program "cronmesh" whatever the launcher.
    answer = subprocess.run(
        [sys.executable, "-m", "cronmesh"],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "_CRONMESH_COMPLETE": "complete_bash",
            "COMP_WORDS": "cronmesh jobs l",
            "COMP_CWORD": "2",
        },
        cwd=REPO,
        timeout=60,
    )
    assert answer.returncode == 0 and answer.stdout.split() == ["list"]
