"""The report's folder: the files one report wrote, and report.json listing them, so that a
rerun removes the figures it no longer makes (and never a file that is not its own)."""

from __future__ import annotations

from typing import Any

from gradlake import __version__, fsio
from gradlake.report.plan import FIGURES, safe_name

MANIFEST = "report.json"
INDEX = "index.html"


def _ours(rel: str) -> bool:
    """A path the report may write: index.html or figures/<safe name>.png."""
    folder, _, name = rel.rpartition("/")
    return rel == INDEX or (folder == FIGURES and name.endswith(".png") and name == safe_name(name)
                            and not name.startswith("."))


class ReportFiles(fsio.Folder):
    """The report's folder (any fsspec URL); report.json lists what the report wrote."""

    def finish(self, written: list[str], numbers: dict[str, Any]) -> None:
        """Remove files an earlier report wrote and this one did not (``written``), then write
        report.json (with the report's headline ``numbers``)."""
        previous = self.read_json(MANIFEST).get("files", []) if self.exists(MANIFEST) else []
        for rel in sorted(set(previous) - set(written)):
            if _ours(rel):  # never follow a manifest outside the report's own files
                self.remove(rel)
        self.write_json(MANIFEST, {"format": "gradlake-report", "gradlake_version": __version__,
                                   "files": sorted(written), **numbers})

