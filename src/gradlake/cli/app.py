"""The typer application every command module registers on, and the options they share."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="gradlake",
    help="Projected per-example gradients and influence matrices for neural PDE surrogates.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)

Address = typer.Option("", "--address",
                       help="Ray cluster to join; default RAY_ADDRESS, else an embedded local Ray.")
NumCpus = typer.Option(0, "--num-cpus", help="CPUs of the embedded local Ray; 0 = all.")


def _quiet(value: bool) -> bool:
    """--quiet takes effect as soon as it is parsed, for every command that declares it."""
    if value:
        from gradlake.progress import set_quiet

        set_quiet(True)
    return value


Quiet = typer.Option(False, "--quiet", "-q", callback=_quiet,
                     help="No progress bars: throttled JSON lines (as when output is not a terminal).")
EndpointUrl = typer.Option("", "--endpoint-url",
                           help="S3-compatible endpoint for s3:// URLs, e.g. http://127.0.0.1:9000.")
Profile = typer.Option("", "--profile",
                       help="AWS profile for s3:// URLs. Credentials never go on the command line: "
                            "they come from the environment or the profile.")


def setting(section, name: str, *flags: str, **kw):
    """The option of job-file setting ``name`` of ``section`` (a gradlake.config dataclass): its
    default and help come from the field, its flag is --name-with-dashes unless ``flags``;
    a list setting is comma-separated on the command line."""
    import dataclasses

    from gradlake.config import help_of

    field = {f.name: f for f in dataclasses.fields(section)}[name]
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    if isinstance(default, tuple):
        default = ",".join(str(v) for v in default)
    flags = flags or ("--" + name.replace("_", "-"),)
    return typer.Option(default, *flags, help=help_of(section, name), **kw)


def storage_options(endpoint_url: str = "", profile: str = "") -> dict[str, str]:
    """Non-secret fsspec storage options from the command line."""
    options = {}
    if endpoint_url:
        options["endpoint_url"] = endpoint_url
    if profile:
        options["profile"] = profile
    return options


def names(text: str) -> list[str]:
    """A comma-separated list on the command line."""
    return [part.strip() for part in text.split(",") if part.strip()]


def numbers(text: str, option: str) -> list[float]:
    """A comma-separated list of numbers on the command line (bad input: one line, exit 2)."""
    try:
        return [float(part) for part in names(text)]
    except ValueError:
        from gradlake.errors import InputError

        raise InputError(f"{option}: expected comma-separated numbers, got {text!r}") from None
