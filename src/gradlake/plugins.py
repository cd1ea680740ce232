"""User code named by import path (``package.module:Name``): models and tasks.

A job's ``python_path`` (directories, relative ones resolved against the job file's folder)
is put on ``sys.path`` by :func:`use_paths` in the driver and in every worker before any
import, so user packages need not be installed.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

from gradlake.errors import InputError


def use_paths(paths: Sequence[str]) -> None:
    """Put these directories first on ``sys.path`` (each once)."""
    for path in reversed([str(p) for p in paths]):
        if path not in sys.path:
            sys.path.insert(0, path)


def import_object(path: str, source: str) -> Any:
    """The object an import path ``package.module:attribute`` names; InputError naming ``source``."""
    module_name, sep, attribute = str(path).partition(":")
    if not sep or not module_name or not attribute:
        raise InputError(f"{source}: expected an import path 'package.module:Name', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(f"{source}: cannot import {module_name!r} ({err}); is its folder in python_path?") from None
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{source}: module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    return obj
