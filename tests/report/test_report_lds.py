"""The report's LDS section from a synthetic LDS output: its table against gradlake.lds, its figures, the note."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gradlake import lds
from gradlake.stages.lds_finish import CITATION, change_table
from gradlake.stages.lds_plan import METHODS
from gradlake.report.plan import Plan
from gradlake.report.lds import add_section


def test_lds_section_table_matches_the_scores_and_draws(tmp_path):
    rng = np.random.default_rng(0)
    masks = lds.sample_subsets(6, 5, 0.5, 0)
    test = pa.table({"row": np.arange(4), "trajectory": np.arange(4), "t": np.zeros(4, np.int32),
                     "class": ["rp"] * 4})
    actual = {a: rng.normal(size=(5, 4)) for a in ("C", "M")}
    predicted = {a: {m: actual[a] + rng.normal(scale=s, size=(5, 4)) for m, s in zip(METHODS, (0.5, 3.0))}
                 for a in actual}
    buffer = io.BytesIO()
    pq.write_table(change_table(test, masks, actual, predicted), buffer)
    (tmp_path / "lds.parquet").write_bytes(buffer.getvalue())
    (tmp_path / "lds.json").write_text(json.dumps({
        "subsets": 5, "alpha": 0.5, "subset_size": 3, "training_trajectories": 6, "subset_seed": 0, "train_seed": 0,
        "train_epochs": 1, "test_samples": 4, "citation": CITATION, "checkpoint": "epoch-0001", "k": 8,
        "damping": 1e-3, "effective_ridge": 1e-3, "metric": "V", "reference_split": "train", "methods": list(METHODS),
        "observables": ["C", "M"], "defined_samples": {m: {"C": 4, "M": 4} for m in METHODS},
        "exact": {"skipped": "no exact output"}}))
    plan = Plan()
    add_section(plan, str(tmp_path), None)
    (section,) = plan.sections
    rows = section.tables[0].rows
    for row, method in zip(rows, METHODS):
        for cell, a in zip(row[1:], ("C", "M")):
            score, per_sample = lds.lds(actual[a], predicted[a][method])
            assert cell.startswith(f"{score:.3f} ± {per_sample.std(ddof=1) / 2:.3f}"), (cell, score)
    assert rows[-1][0] == "exact minibatch H" and "no exact output" in section.notes[0]
    for draw in plan.draws.values():
        out = io.BytesIO()
        draw(out=out)
        assert out.getvalue().startswith(b"\x89PNG")


def test_lds_section_without_an_lds_run_is_a_note(tmp_path):
    plan = Plan()
    add_section(plan, str(tmp_path / "lds"), None)
    assert "No LDS" in plan.sections[0].notes[0] and not plan.draws
