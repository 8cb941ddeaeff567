"""The `sgjobs` command: the server's commands (serve, api, worker, migrate, keys, demo-dataset) and
the client's (submit, ls, show, logs, cancel, resume, predict, download, datasets upload), which
speak HTTP only.

The client part imports no database, broker or training code (tests/test_architecture.py): it runs
on a laptop against a remote service. The server commands import theirs when they run.
"""

from __future__ import annotations

import sys

import click
import typer

from app.cli import client, server

cli = typer.Typer(
    name="sgjobs",
    help="Fine-tune YOLO-NAS detectors over HTTP: run the service, or use it from anywhere.",
    no_args_is_help=True,
    add_completion=False,
    # Plain tracebacks: rich's show the locals, which may hold an API key.
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
server.register(cli)
client.register(cli)


def main(argv: list[str] | None = None) -> int:
    """Run `sgjobs` with `argv` (default: the command line); returns the exit code."""
    command = typer.main.get_command(cli)
    try:
        command.main(args=argv, prog_name="sgjobs", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except click.exceptions.Abort:
        return client.EXIT_DETACHED
    return 0
