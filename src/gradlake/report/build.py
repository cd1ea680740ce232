"""The report: read the gradient store, its reduce and the training run; draw; write index.html.

Planning (reading inputs, deciding figures, captions and notes) is separate from drawing:
every figure is a named call into :mod:`gradlake.report.figures`, drawn in one loop with
progress. A missing input (no reduce, no exact run, no training directory, no rollout)
becomes a note in its section. Output: ``<out>/index.html``, ``<out>/figures/*.png`` and
``<out>/report.json`` (the files this report wrote; a rerun removes those it no longer makes).
"""

from __future__ import annotations

import io
from typing import Any

from gradlake import fsio
from gradlake.progress import progress
from gradlake.report.exact_section import add_exact
from gradlake.report.files import INDEX, ReportFiles
from gradlake.report.html import render_index
from gradlake.report.influence_sections import (
    add_distance,
    add_missing_reduce,
    add_spectrum,
    add_transfer,
    add_twotime,
)
from gradlake.report.inputs import ReduceResults
from gradlake.report.lag_section import add_lags
from gradlake.report.plan import Plan, choose_normalizations
from gradlake.report.provenance_table import provenance_rows
from gradlake.report.training_sections import add_rollout, add_training


def build_report(store_url: str, out_dir: str, reduce_name: str = "default", train_dir: str | None = None,
                 storage_options: dict[str, Any] | None = None, normalizations=None,
                 lds_dir: str | None = None) -> str:
    """Write the report of a gradient store (and its reduce ``reduce_name``) to ``out_dir``;
    returns the path of index.html. Deterministic; rerunning overwrites the report's own files.

    ``normalizations``: those of the influence figures (default: row-std, the paper's, when
    the reduce computed it); the exact-versus-projected section shows every one. ``lds_dir``:
    a job's LDS output (its section, gradlake.report.lds).
    """
    from gradlake.store import GradientStore

    store = GradientStore.open(store_url, storage_options)
    summary = store.summary()
    reduce_url = store.reduce_url(reduce_name)
    results = ReduceResults.open(reduce_url, storage_options)

    plan, exact = Plan(), None
    if results is not None:
        plan.normalizations = choose_normalizations(list(results.settings.get("normalize", [])), normalizations)
    runs = add_training(plan, train_dir, storage_options)
    add_rollout(plan, runs, store.provenance, storage_options)
    if results is None:
        add_missing_reduce(plan, reduce_name, reduce_url)
    else:
        exact = add_exact(plan, results)
        for add in (add_spectrum, add_twotime, add_lags, add_transfer, add_distance):
            add(plan, results)
    if lds_dir is not None:
        from gradlake.report.lds import add_section

        add_section(plan, lds_dir, storage_options)

    files = ReportFiles(out_dir, storage_options)
    bar = progress(len(plan.draws), "report: figures", "figure")
    for src, draw in plan.draws.items():
        buffer = io.BytesIO()
        draw(out=buffer)
        files.write(src, buffer.getvalue())
        bar.update(1)
    bar.close()
    page = render_index(f"gradlake report: {summary.get('url', store_url)}",
                        provenance_rows(summary, results, reduce_name, plan.normalizations), plan.sections)
    files.write(INDEX, page.encode())
    files.finish({"exact": {key: exact.get(key) for key in ("checkpoint", "minibatches", "batch_size", "damping",
                                                              "headline", "paper", "solver")}} if exact else {})
    return fsio.join(out_dir, INDEX)
