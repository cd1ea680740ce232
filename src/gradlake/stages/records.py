"""Completion records: how a stage knows which of its units are done, and with which settings.

A unit writes its record last, after its outputs (so nothing half-written is taken as done),
as one JSON file ``<directory>/<prefix><name>.json`` of the stage's output folder. A record
carries the hash of its run's settings (``"settings"``): a rerun keeps the units done with the
same settings (resume) and finds those done with others (replace, or refuse without
``--overwrite``). Used by the reduce (a record per checkpoint), the exact mode (per minibatch)
and the LDS (per subset, in its own folder: ``started`` first, ``record`` last).
"""

from __future__ import annotations

from typing import Any

from gradlake import fsio


class Records:
    """The completion records under ``directory`` of ``folder`` whose names start with ``prefix``."""

    def __init__(self, folder: fsio.Folder, directory: str, prefix: str = ""):
        self.folder, self.directory, self.prefix = folder, directory, prefix

    def path(self, name: str) -> str:
        return f"{self.directory}/{self.prefix}{name}.json"

    def load(self) -> dict[str, dict[str, Any]]:
        """Name -> record, of every unit with one (listed afresh; a killed write's temp file,
        ``.<name>``, is no record)."""
        found = {}
        for entry in self.folder.ls(self.directory):
            if entry.endswith(".json") and entry.startswith(self.prefix) and not entry.startswith("."):
                found[entry[len(self.prefix):-len(".json")]] = self.folder.read_json(f"{self.directory}/{entry}")
        return found

    def write(self, name: str, record: dict[str, Any]) -> None:
        """The unit ``name`` is done: write its record (after everything it wrote)."""
        self.folder.write_json(self.path(name), record)

    def remove(self, name: str) -> None:
        self.folder.remove(self.path(name))


def other_settings(records: dict[str, dict[str, Any]], settings: str) -> bool:
    """Whether any record was made with settings other than ``settings`` (a hash)."""
    return any(record.get("settings") != settings for record in records.values())
