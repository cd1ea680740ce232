"""Job files (TOML) -> typed, validated settings of :mod:`gradlake.config.schema`; no I/O
beyond reading the job file (what a job resolves to against files: gradlake.pipeline.resolved).

Every field's type and constraint is checked before any work starts, and a bad value is
reported with its full key path: ``grads.k_in: expected int > 0, got -3``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

from gradlake.config.schema import NORMALIZATIONS, OBSERVABLES, STAGES, JobConfig
from gradlake.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Any storage option whose name contains one of these is a credential (at any depth:
# client_kwargs = {aws_secret_access_key = ...} too).
SECRET_WORDS = ("key", "secret", "token", "password", "credential", "sas")


def secret_option(options: dict[str, Any], path: str) -> str | None:
    """The path of the first credential-like option in ``options``, or None."""
    for name, value in options.items():
        if any(word in str(name).lower() for word in SECRET_WORDS):
            return f"{path}.{name}"
        if isinstance(value, dict):
            found = secret_option(value, f"{path}.{name}")
            if found:
                return found
    return None


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        inner = _describe(args[0])
        return f"list of {inner}" if args[-1] is Ellipsis else f"list of {len(args)} {inner}"
    if origin in (dict,):
        return "table"
    if origin in (typing.Union, types.UnionType):  # an optional setting: a job file leaves it out
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, path: str):
    """Convert a TOML value to the annotated type, or raise InputError naming the path."""
    origin = typing.get_origin(tp)

    def bad(expected: str | None = None):
        raise InputError(f"{path}: expected {expected or _describe(tp)}, got {value!r}")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            bad("a table")
        return _build(tp, value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            bad()
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            bad()
        args = typing.get_args(tp)
        if args[-1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            bad()
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            bad()
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, path)
            except InputError:
                continue
        bad()
    if tp is bool:
        if not isinstance(value, bool):
            bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            bad()
        return value
    if tp is Any:
        return value
    if tp is type(None):  # an optional setting left unset (the command line's default)
        if value is not None:
            bad()
        return None
    raise TypeError(f"unsupported setting type {tp!r} at {path}")  # a bug in this module


def _renames(cls, prefix: str = "") -> dict[tuple[str, str], str]:
    """(section, old name) -> new name of every setting of ``cls`` (and its sections) whose field says
    what it ``was`` (:func:`gradlake.config.schema.setting`)."""
    found = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "was" in f.metadata:
            found[(prefix, f.metadata["was"])] = f.name
        if dataclasses.is_dataclass(hints[f.name]):
            found.update(_renames(hints[f.name], f"{prefix}.{f.name}" if prefix else f.name))
    return found


# Settings renamed: (section, old name) -> new name. The old name is still read, with a warning.
RENAMED = _renames(JobConfig)


def _renamed(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``values`` with renamed settings under their new names (a FutureWarning for each)."""
    for (section, old), new in RENAMED.items():
        if section != prefix or old not in values:
            continue
        if new in values:
            raise InputError(f"{prefix}.{old}: renamed {prefix}.{new}; give only {prefix}.{new}")
        warnings.warn(f"{prefix}.{old} is renamed {prefix}.{new}; the old name will stop working",
                      FutureWarning, stacklevel=2)
        values = {(new if k == old else k): v for k, v in values.items()}
    return values


def _build(cls, values: dict[str, Any], prefix: str):
    values = _renamed(values, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise InputError(
            f"{where}{unknown[0]}: unknown setting; expected one of {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in values.items():
        path = f"{prefix}.{name}" if prefix else name
        converted = _convert(value, hints[name], path)
        check = fields[name].metadata.get("check")
        if check is not None:
            expected = check(converted)
            if expected:
                raise InputError(f"{path}: expected {_describe(hints[name])} {expected}, got {value!r}")
        kwargs[name] = converted
    return cls(**kwargs)


def _validate(job: JobConfig) -> JobConfig:
    """Checks that span several settings."""
    from gradlake.fsio import is_identifier

    for stage in job.stages:
        if stage not in STAGES:
            raise InputError(f"stages: unknown stage {stage!r}; expected some of {', '.join(STAGES)}")
    for obs in job.grads.observables:  # which ones the task defines is checked when it is loaded
        if not is_identifier(obs):
            raise InputError(f"grads.observables: {obs!r} is not an observable name (a letter, then letters, "
                             f"digits, '_'); the default task has {', '.join(OBSERVABLES)}")
    if job.model.path and ":" not in job.model.path:
        raise InputError(f"model.path: expected an import path 'package.module:Name', got {job.model.path!r}")
    if job.model.path and job.model.overrides:
        raise InputError("model.overrides: preset overrides do not apply to model.path; use model.kwargs")
    if job.model.kwargs and not job.model.path:
        raise InputError("model.kwargs: only for a model named by model.path; presets take model.overrides")
    if job.reduce.exact.enabled and "reduce" in job.stages and (job.task.path or job.model.path):
        raise InputError("reduce.exact.enabled: the exact minibatch mode supports the preset models and the "
                         "default task only (not model.path or task.path) so far")
    if job.eval.lds.enabled and "lds" in job.stages and "C" not in job.grads.observables:
        raise InputError("eval.lds.enabled: the predicted changes need the loss gradients; add 'C' to grads.observables")
    if job.train.epochs == 0 and not job.model.checkpoint:
        raise InputError("train.epochs: expected int > 0 (0 only with model.checkpoint: "
                         "analyse those weights as they are)")
    if job.task.path and ":" not in job.task.path:
        raise InputError(f"task.path: expected an import path 'package.module:Name', got {job.task.path!r}")
    for pair in job.reduce.pairs:
        if len(pair) != 2:
            raise InputError(f"reduce.pairs: expected two one-letter observable names like 'CC' or 'MC', got {pair!r}")
        missing = [o for o in pair if o not in job.grads.observables]
        if missing and "grads" in job.stages:
            raise InputError(f"reduce.pairs: {pair!r} needs observable {missing[0]!r}, which grads.observables does not compute")
    if job.reduce.metric not in job.grads.observables and "reduce" in job.stages:
        raise InputError(f"reduce.metric: {job.reduce.metric!r} is not in grads.observables {list(job.grads.observables)}")
    for norm in job.reduce.normalize:
        if norm not in NORMALIZATIONS:
            raise InputError(f"reduce.normalize: unknown normalisation {norm!r}; expected some of {', '.join(NORMALIZATIONS)}")
    fractions = job.data.split_fractions
    if abs(sum(fractions) - 1.0) > 1e-9 or any(s < 0 for s in fractions):
        raise InputError(f"data.split_fractions: expected three fractions >= 0 summing to 1, got {list(fractions)}")
    if job.data.source == "url" and not job.data.url:
        raise InputError("data.url: expected a dataset URL when data.source = 'url'")
    secret = secret_option(job.store.storage_options, "store.storage_options")
    if secret:
        raise InputError(
            f"{secret}: credentials never go into a job file; "
            "set them in the environment (AWS_ACCESS_KEY_ID, ...) or a profile"
        )
    return job


def parse_job(values: dict[str, Any], source: str = "<job>") -> JobConfig:
    """Typed, validated settings from a parsed TOML document."""
    try:
        return _validate(_build(JobConfig, values, ""))
    except InputError as err:
        raise InputError(f"{source}: {err}") from None


def load_job(path: str | Path, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Read and validate a job file; ``overrides`` replace top-level keys (e.g. ``out``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such job file")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{path}: not valid TOML: {err}") from None
    values.update(overrides or {})
    if isinstance(values.get("python_path"), list):
        values["python_path"] = [str((path.parent / p).resolve()) if isinstance(p, str) else p
                                 for p in values["python_path"]]
    return parse_job(values, str(path))


def dumps(job: JobConfig) -> str:
    """The resolved settings as JSON (for `gradlake validate` and provenance)."""
    return json.dumps(job.to_dict(), indent=2, default=list)

