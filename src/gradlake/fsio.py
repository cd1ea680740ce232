"""URLs and filesystems: the one place gradlake turns a path or URL into fsspec objects."""

from __future__ import annotations

import posixpath
from typing import Any

import fsspec


def filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """(fs, path) for any fsspec URL or local path."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path, keeping the protocol."""
    if "://" in url:
        proto, rest = url.split("://", 1)
        return f"{proto}://" + posixpath.join(rest, *parts)
    return posixpath.join(url, *parts)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")
