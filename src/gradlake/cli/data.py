"""data commands."""

from gradlake.cli.app import app  # noqa: F401
