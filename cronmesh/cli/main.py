"""The `cronmesh` command: `agent` starts a node, the rest are API clients.

Data goes to stdout (a Rich table, or JSON with `--json`), errors to stderr
as one line. Exit codes: 0 done, 1 the server said no or could not be
reached, 2 bad usage or bad input (see docs/cli.md).
"""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated

import typer
from typer.completion import get_completion_script

from cronmesh import __version__
from cronmesh.cli import (
    agent_cmd,
    backup_cmd,
    client,
    cluster_cmds,
    doctor,
    executions_cmd,
    keyring_cmd,
    raft,
    schedule,
)
from cronmesh.cli.client import JsonOpt, print_json

__all__ = ["EXIT_CODES", "PROG", "app", "main"]

PROG = "cronmesh"

# Every exit status `cronmesh` uses; scripts/gen-cli-docs lists them.
EXIT_CODES = {
    0: "done (`doctor`: no check failed)",
    1: "the server said no or could not be reached, or a runtime error "
    "(`agent`: it could not start or stopped on an error; `doctor`: a check failed)",
    2: "bad usage or bad input: an unknown flag, an invalid value or file, HTTP 400",
    130: "interrupted: Ctrl-C in a client command (the agent stops gracefully "
    "on SIGINT and exits 0)",
}

app = typer.Typer(
    name=PROG,
    help="A fault-tolerant distributed cron scheduler that speaks Dkron's API.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("agent")(agent_cmd.agent)
app.add_typer(client.jobs_app, name="jobs")
app.add_typer(executions_cmd.app, name="executions")
app.add_typer(schedule.app, name="schedule")
app.add_typer(raft.app, name="raft")
app.command("members")(cluster_cmds.members)
app.command("leave")(cluster_cmds.leave)
app.command("keygen")(cluster_cmds.keygen)
app.add_typer(keyring_cmd.app, name="keyring")
app.command("backup")(backup_cmd.backup)
app.command("restore")(backup_cmd.restore)
app.command("doctor")(doctor.doctor)


@app.command("version")
def version(as_json: JsonOpt = False) -> None:
    """Print the version of cronmesh."""
    if as_json:
        print_json({"version": __version__})
    else:
        typer.echo(f"cronmesh {__version__}")


class Shell(StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"
    powershell = "powershell"
    pwsh = "pwsh"


@app.command("completion")
def completion(
    shell: Annotated[Shell, typer.Argument(help="The shell to complete in.")],
) -> None:
    """Print the shell completion script for SHELL.

    For example `cronmesh completion bash > /etc/bash_completion.d/cronmesh`.
    `cronmesh --install-completion` installs it for the shell it runs in.
    """
    typer.echo(
        get_completion_script(
            prog_name=PROG, complete_var=f"_{PROG.upper()}_COMPLETE", shell=shell.value
        )
    )


def _click_error(name: str) -> type[Exception]:
    # Typer >= 0.20 carries its own copy of click; find its classes by name
    # from a public one, so this works with either.
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


UsageError = _click_error("UsageError")
ClickException = _click_error("ClickException")


def main() -> None:
    """Entry point: run the app, turning usage errors into one line, exit 2."""
    try:
        # A fixed name, so `python -m cronmesh` prints the same usage and
        # completion scripts as the installed command.
        code = app(prog_name=PROG, standalone_mode=False)
    except typer.Abort:
        sys.stderr.write("cronmesh: aborted\n")
        sys.exit(130)
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.exit(2)  # the help text was printed already
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else PROG
        message = exc.format_message()  # type: ignore[attr-defined]
        sys.stderr.write(f"cronmesh: error: {message} (see '{where} --help')\n")
        sys.exit(2)
    except ClickException as exc:
        sys.stderr.write(f"cronmesh: error: {exc.format_message()}\n")  # type: ignore[attr-defined]
        sys.exit(getattr(exc, "exit_code", 1))
    sys.exit(code if isinstance(code, int) else 0)
