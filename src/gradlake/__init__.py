"""gradlake: projected per-example gradients and influence matrices for neural PDE surrogates."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gradlake")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
