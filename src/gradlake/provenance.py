"""gradlake's provenance metadata on its Parquet outputs (query and top-k tables, samples.parquet,
the reduce's and the rollout's tables): the schema metadata key ``gradlake`` holds a JSON object
naming what the table is (``format``), what it was computed from, and gradlake's version."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

METADATA_KEY = b"gradlake"


def with_description(table: pa.Table, description: dict[str, Any]) -> pa.Table:
    """``table`` with ``description`` (and gradlake's version) as its schema metadata (key ``gradlake``, JSON)."""
    from gradlake import __version__

    about = {**description, "gradlake_version": __version__}
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(about, default=str).encode()})


def description_of(table_or_schema: pa.Table | pa.Schema) -> dict[str, Any]:
    """The description a table (or a Parquet file's schema) carries ({} when it has none)."""
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}
