"""Fixtures of the grads stage tests (helpers live in grads_fixtures.py)."""

from __future__ import annotations

import pytest

from grads_fixtures import write_checkpoints, write_dataset


@pytest.fixture(scope="session")
def grads_inputs(tmp_path_factory):
    """(dataset URL, [checkpoint paths]) on local disk, shared by the session."""
    root = tmp_path_factory.mktemp("grads-inputs")
    write_dataset(str(root / "data"))
    return str(root / "data"), write_checkpoints(str(root / "train"))
