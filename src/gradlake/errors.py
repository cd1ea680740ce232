"""The errors gradlake raises on purpose; the CLI maps them to exit codes."""


class GradlakeError(Exception):
    """A failure while doing the work (exit code 1)."""


class InputError(GradlakeError):
    """Bad input from the user: a setting, file, URL or argument (exit code 2).

    The message names the offending file, field or setting and what was expected.
    """
