"""gradlake: projected per-example gradients and influence matrices for neural PDE surrogates."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gradlake")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"



def open_store(url: str, storage_options: dict | None = None, allow_partial: bool = False):
    """Open a gradient store read-only; see :class:`gradlake.store.GradientStore`."""
    from gradlake.query import open_store as _open_store

    return _open_store(url, storage_options, allow_partial)


__all__ = ["__version__", "open_store"]
