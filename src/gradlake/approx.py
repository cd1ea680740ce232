"""The old name of :mod:`gradlake.approximate_index`, kept for scripts that import it (with a
FutureWarning); it will go."""

import warnings

from gradlake.approximate_index import INDEX_DIR, ApproximateIndex, build_index, index_records

__all__ = ["INDEX_DIR", "ApproximateIndex", "build_index", "index_records"]

warnings.warn("gradlake.approx is renamed gradlake.approximate_index; the old name will stop working",
              FutureWarning, stacklevel=2)
