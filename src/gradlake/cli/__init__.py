"""Thin command line: parse, validate, call. Exit codes: 0 ok, 1 failure, 2 usage / bad input."""

from __future__ import annotations

import sys

import typer

from gradlake import __version__
from gradlake.cli.app import app
from gradlake.errors import GradlakeError, InputError
from gradlake.fsio import storage_access_error

# Each module registers its verbs on `app`.
from gradlake.cli import data, grads, jobs, lds, query, reduce, report, train  # noqa: E402,F401


def _version(value: bool):
    if value:
        typer.echo(f"gradlake {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
):
    """gradlake: which training samples shape a PDE surrogate's predictions on which others."""


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="gradlake")
    except InputError as err:
        typer.secho(f"error: {err}", err=True, fg="red")
        sys.exit(2)
    except GradlakeError as err:
        typer.secho(f"failed: {err}", err=True, fg="red")
        sys.exit(1)
    except Exception as err:
        translated = storage_access_error(err)  # missing or refused credentials, wherever they surface
        if translated is None:
            raise
        typer.secho(f"error: {translated}", err=True, fg="red")
        sys.exit(2)
