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
    """The report's folder (any fsspec URL); remembers what it wrote in report.json."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        super().__init__(url, storage_options)
        self.written: list[str] = []

    def write(self, rel: str, data: bytes) -> None:
        self.write_bytes(rel, data)
        self.written.append(rel)

    def finish(self, numbers: dict[str, Any]) -> None:
        """Remove files an earlier report wrote and this one did not, then write report.json
        (with the report's headline ``numbers``)."""
        previous = self.read_json(MANIFEST).get("files", []) if self.exists(MANIFEST) else []
        for rel in sorted(set(previous) - set(self.written)):
            if _ours(rel):  # never follow a manifest outside the report's own files
                self.remove(rel)
        self.write_json(MANIFEST, {"format": "gradlake-report", "gradlake_version": __version__,
                                   "files": sorted(self.written), **numbers})

