"""The report stage (no Ray): plan the page, draw its figures (the units), write the page.

:func:`plan` reads the gradient store, its reduce, the training runs and the LDS output and
plans the page (gradlake.report: the sections in page order, each figure a named drawing call
into gradlake.report.figures; a missing input becomes a note in its section); a unit draws one
figure and writes ``figures/<name>.png``; :func:`finish` writes ``index.html`` and
``report.json`` (the files this report wrote: a rerun removes those it no longer makes).
Deterministic; no completion records: a rerun redraws every figure (cheap beside its inputs).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable

from gradlake import fsio
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


@dataclass(frozen=True)
class ReportSpec:
    """One report: of the store's reduce ``reduce_name``, into ``out_dir``.

    ``normalizations``: those of the influence figures (default: row-std, the paper's, when the
    reduce computed it); the exact-versus-projected section shows every one. ``train_dir``: the
    training runs (curves, rollouts); ``lds_dir``: a job's LDS output (its section)."""

    store_url: str
    out_dir: str
    reduce_name: str = "default"
    train_dir: str | None = None
    storage_options: dict[str, Any] | None = None
    normalizations: tuple[str, ...] | None = None
    lds_dir: str | None = None


@dataclass(frozen=True)
class Figure:
    """One unit: a figure's file (``figures/<name>.png``) and its drawing call."""

    src: str
    draw: Callable[..., None]


@dataclass
class Page:
    """The planned page: its figures (the units: iterating a page gives them), its layout
    (sections and drawing calls), and what its table of provenance reads."""

    layout: Plan
    summary: dict[str, Any]
    results: ReduceResults | None
    exact: dict[str, Any] | None

    @property
    def figures(self) -> list[Figure]:
        return [Figure(src, draw) for src, draw in self.layout.draws.items()]

    def __iter__(self):
        return iter(self.figures)


def plan(spec: ReportSpec) -> Page:
    """Read the inputs and plan the page: its sections in order and their figures."""
    from gradlake.store import GradientStore

    store = GradientStore.open(spec.store_url, spec.storage_options)
    summary = store.summary()
    reduce_url = store.reduce_url(spec.reduce_name)
    results = ReduceResults.open(reduce_url, spec.storage_options)

    layout, exact = Plan(), None
    if results is not None:
        layout.normalizations = choose_normalizations(list(results.settings.get("normalize", [])), spec.normalizations)
    runs = add_training(layout, spec.train_dir, spec.storage_options)
    add_rollout(layout, runs, store.provenance, spec.storage_options)
    if results is None:
        add_missing_reduce(layout, spec.reduce_name, reduce_url)
    else:
        exact = add_exact(layout, results)
        for add in (add_spectrum, add_twotime, add_lags, add_transfer, add_distance):
            add(layout, results)
    if spec.lds_dir is not None:
        from gradlake.report.lds import add_section

        add_section(layout, spec.lds_dir, spec.storage_options)
    return Page(layout, summary, results, exact)


def run_unit(spec: ReportSpec, unit: Figure) -> str:
    """Draw the figure and write its file; its path in the report."""
    buffer = io.BytesIO()
    unit.draw(out=buffer)
    fsio.Folder(spec.out_dir, spec.storage_options).write_bytes(unit.src, buffer.getvalue())
    return unit.src


def finish(spec: ReportSpec, page: Page, records: list[str]) -> str:
    """index.html, then report.json (the figures written, ``records``, and index.html); the
    path of index.html."""
    files = ReportFiles(spec.out_dir, spec.storage_options)
    html = render_index(f"gradlake report: {page.summary.get('url', spec.store_url)}",
                        provenance_rows(page.summary, page.results, spec.reduce_name, page.layout.normalizations),
                        page.layout.sections)
    files.write_bytes(INDEX, html.encode())
    exact = page.exact
    files.finish([*records, INDEX], {"exact": {key: exact.get(key) for key in (
        "checkpoint", "minibatches", "batch_size", "damping", "headline", "paper", "solver")}} if exact else {})
    return fsio.join(spec.out_dir, INDEX)
