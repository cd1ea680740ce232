"""The typer application every command module registers on."""

import typer

app = typer.Typer(
    name="gradlake",
    help="Projected per-example gradients and influence matrices for neural PDE surrogates.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
