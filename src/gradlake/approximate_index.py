"""An approximate top-k index beside a gradient store (faiss IVF / IVF-PQ, optional extra).

The index holds the whitened rows ψ_B = φ_B W (W Wᵀ = (η̃ + λI)⁻¹, λ fixed when it is
built) of a candidate selection under inner-product search: H(i, j) = ψ_{A,i} · ψ_{B,j},
and its lists cluster the space that H measures. The top list searches ψ_A, the bottom
list -ψ_A. Each search returns ``refine`` × k
candidates, which are re-scored exactly from the store, so the influences reported are
exact and only membership is approximate (recall@k against the brute-force pass:
benchmarks/bench_query.py). η̃ of the selection is saved with the index, so a query needs
no pass over the store. The command line: ``gradlake index build`` and ``gradlake topk --index``.

    <store>/index/<name>/index.faiss   faiss.serialize_index bytes
    <store>/index/<name>/metric.npy    η̃ [k, k] float64 of the selection (metric observable)
    <store>/index/<name>/index.json    what it indexes; written last (no record: no index)

Install with ``pip install 'gradlake[index]'`` (faiss-cpu).
"""

from __future__ import annotations

import datetime
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gradlake import __version__, fsio
from gradlake.errors import InputError
from gradlake.progress import progress
from gradlake.query import (SAMPLE_COLUMNS, block_rows_for, check_metric, describe, in_process, metric_of, open_store,
                            with_description)
from gradlake.reduce.metric import Metric
from gradlake.reduce.pairwise import TopK, whiten
from gradlake.stages.query import LABELS
from gradlake.topk_table import topk_table

INDEX_DIR = "index"
RECORD = "index.json"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise InputError("the approximate index needs faiss-cpu: pip install 'gradlake[index]'") from None
    return faiss


def default_factory(n: int, k: int) -> str:
    """IVF with ~sqrt(n) lists; from 10,000 rows on, 4-bit fast-scan PQ codes of 4
    dimensions each (k/8 bytes a row; fast to train, re-scoring restores the ranking);
    below that, exact vectors in the lists."""
    nlist = int(max(1, min(np.sqrt(n), n // 39)))
    if n < 10_000 or k % 4:
        return f"IVF{nlist},Flat"
    return f"IVF{nlist},PQ{k // 4}x4fs"


def _folder(url: str, name: str, storage_options) -> fsio.Folder:
    if not fsio.is_path_name(name):
        raise InputError(f"index name: expected letters, digits, '.', '_' or '-', got {name!r}")
    return fsio.Folder(fsio.join(url, INDEX_DIR, name), storage_options)


def build_index(url: str, name: str = "default", where: str = "split == 'train'", observable: str = "C",
                metric: str = "V", checkpoint: str | None = None, factory: str | None = None,
                damping: float = 1e-4, train_rows: int = 32_768, seed: int = 0,
                storage_options: dict[str, Any] | None = None, block_rows: int | None = None) -> dict[str, Any]:
    """Build the index of the whitened ``observable`` φ's of the ``where`` samples (η̃ from
    their ``metric`` φ's, damping λ) and save it at ``<url>/index/<name>/``; returns its record."""
    faiss = _faiss()
    store = open_store(url, storage_options)
    ckpt = store.checkpoint(checkpoint)
    folder = _folder(store.url, name, storage_options)
    store.check_observable(observable)
    check_metric(store, metric)
    rows = store.rows(ckpt, where or None)
    if not len(rows):
        raise InputError(f"index: {where!r} selects no sample of store {store.url}")
    factory = factory or default_factory(len(rows), store.k)
    try:
        index = faiss.index_factory(store.k, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise InputError(f"--factory {factory!r}: faiss cannot build it for k = {store.k} "
                         f"({str(err).strip().rsplit(': ', 1)[-1]})") from None
    eta = metric_of(store, where, metric, ckpt, mapper=in_process(desc=f"index {name}: metric")).eta
    whitener = Metric(eta).whitener(damping)
    sample = np.sort(np.random.default_rng(seed).choice(rows, min(train_rows, len(rows)), replace=False))
    with progress(1, f"index {name}: train {factory} on {len(sample)} rows", "step") as bar:
        index.train(whiten(store.read(ckpt, observable, sample), whitener))
        bar.update(1)
    with progress(len(rows), f"index {name}: add", "sample") as bar:
        for block, phi in store.iter_blocks(ckpt, observable, rows, block_rows or block_rows_for(store, observable)):
            index.add_with_ids(whiten(phi, whitener), block)
            bar.update(len(block))
    folder.remove(RECORD)
    folder.write_bytes("index.faiss", faiss.serialize_index(index).tobytes())
    buffer = io.BytesIO()
    np.save(buffer, eta)
    folder.write_bytes("metric.npy", buffer.getvalue())
    sha256 = store.provenance["checkpoints"][ckpt].get("sha256", "")
    record = {"name": name, "checkpoint": ckpt, "checkpoint_sha256": sha256,
              "observable": observable, "where": where, "metric": metric, "damping": damping,
              "factory": factory, "rows": int(len(rows)), "k": store.k, "train_rows": int(len(sample)),
              "gradlake_version": __version__,
              "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    folder.write_json(RECORD, record)
    return record


def index_records(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The records of the complete indexes beside the store at ``url``, by name."""
    folder = fsio.Folder(fsio.join(url, INDEX_DIR), storage_options)
    return {name: folder.read_json(f"{name}/{RECORD}") for name in sorted(folder.ls())
            if folder.exists(f"{name}/{RECORD}")}


class ApproximateIndex:
    """A saved index, loaded: approximate top-k with exact re-scoring.

    Opening it checks that the store still holds the checkpoint (same weights) and the
    projection width it was built from; :meth:`check` also checks a query's settings."""

    def __init__(self, url: str, name: str = "default", storage_options: dict[str, Any] | None = None):
        faiss = _faiss()
        self.store = open_store(url, storage_options)
        self.name = name
        folder = _folder(self.store.url, name, storage_options)
        if not folder.exists(RECORD):
            built = index_records(self.store.url, storage_options)
            raise InputError(f"{folder.url}: no approximate index here (the store has "
                             f"{', '.join(built) if built else 'none'}); build it with `gradlake index build`")
        self.record = folder.read_json(RECORD)
        self._check_store()
        self.index = faiss.deserialize_index(np.frombuffer(folder.read_bytes("index.faiss"), dtype=np.uint8))
        self.metric = Metric(np.load(io.BytesIO(folder.read_bytes("metric.npy"))), f"{folder.url}/metric.npy")
        try:
            self.ivf = faiss.extract_index_ivf(self.index)  # whatever wraps it (OPQ, ...)
        except RuntimeError:
            self.ivf = None  # not an IVF index: every search is exhaustive

    def _rebuild(self) -> str:
        return f"rebuild it with `gradlake index build {self.store.url} --name {self.name} ...`"

    def _check_store(self) -> None:
        record, store = self.record, self.store
        ckpt = record["checkpoint"]
        if ckpt not in store.checkpoints:
            raise InputError(f"index {self.name!r} was built from checkpoint {ckpt}, which store {store.url} "
                             f"no longer holds; {self._rebuild()}")
        sha = store.provenance["checkpoints"][ckpt].get("sha256", "")
        if record.get("checkpoint_sha256", sha) != sha or record["k"] != store.k:
            raise InputError(f"index {self.name!r} was built from other weights or another projection than "
                             f"checkpoint {ckpt} of store {store.url} holds now; {self._rebuild()}")

    def check(self, checkpoint: str | None = None, perturbation: str | None = None, where: str | None = None,
              metric: str | None = None, damping: float | None = None) -> None:
        """InputError (one line) unless the index answers for these settings (None: any): the
        checkpoint (None: the latest), the perturbation observable, the candidates' filter,
        the metric and λ; and unless its filter still selects the rows it indexed."""
        record = self.record
        ckpt = self.store.checkpoint(checkpoint)
        if ckpt != record["checkpoint"]:
            raise InputError(f"index {self.name!r} was built from checkpoint {record['checkpoint']}, not {ckpt}"
                             f"{' (the latest)' if checkpoint is None else ''}; pass --checkpoint "
                             f"{record['checkpoint']} or {self._rebuild()}")
        if perturbation is not None and perturbation != record["observable"]:
            raise InputError(f"index {self.name!r} holds the φ's of observable {record['observable']}, not "
                             f"{perturbation}: its --pair ends in {record['observable']}")
        settings = {"--train-where": (where, record["where"]), "--metric": (metric, record["metric"]),
                    "--lambda": (damping, record["damping"])}
        for what, (asked, built) in settings.items():
            if asked is not None and asked != built:
                raise InputError(f"index {self.name!r} was built with {what} {built!r}, not {asked!r}; "
                                 f"leave {what} out to use the index's, or {self._rebuild()}")
        rows = len(self.store.rows(ckpt, record["where"] or None))
        if rows != record["rows"]:
            raise InputError(f"index {self.name!r} holds {record['rows']} rows but {record['where']!r} selects "
                             f"{rows} now (the store has changed); {self._rebuild()}")

    def topk(self, query_where: str, k: int = 10, response: str = "C", nprobe: int = 16, refine: int = 16,
             exclude_self: bool = True) -> pa.Table:
        """Top-k table like :func:`gradlake.query.topk` (pair = response + the indexed
        observable, λ of the index) over the indexed samples; ``nprobe`` lists searched per
        query, ``refine`` × k candidates per list re-scored exactly. Its description
        (:func:`gradlake.query.description_of`) says so under ``approximate``."""
        store, ckpt, observable = self.store, self.record["checkpoint"], self.record["observable"]
        queries = store.samples(ckpt, query_where, columns=SAMPLE_COLUMNS)
        if queries.num_rows == 0:
            raise InputError(f"--query-where {query_where!r} selects no sample")
        query_rows = queries.column("row").to_numpy().astype(np.int64)
        whitener = self.metric.whitener(self.record["damping"])
        psi = whiten(store.read(ckpt, response, query_rows), whitener)
        if self.ivf is not None:
            self.ivf.nprobe = nprobe = min(nprobe, self.ivf.nlist)
        width = refine * k + int(exclude_self)
        found = np.concatenate([self.index.search(sign * psi, width)[1] for sign in (1, -1)], 1)
        found = np.sort(found, axis=1)
        found[:, 1:][found[:, 1:] == found[:, :-1]] = -1  # a row found by both searches counts once
        candidates = np.unique(found[found >= 0])
        if not len(candidates):
            raise InputError(f"{self.store.url}: the index found no candidate; is it empty?")
        psi_b = whiten(store.read(ckpt, observable, candidates), whitener)
        h = np.einsum("qk,qmk->qm", psi, psi_b[np.searchsorted(candidates, np.maximum(found, 0))])
        best = TopK(query_rows, k, exclude_self)
        best.update(h, found)  # exact H of each query's own candidates
        labels = store.samples(ckpt, pc.field("row").isin(pa.array(candidates, pa.int64())), columns=LABELS)
        record = self.record
        description = describe(store, ckpt, kind="topk", pair=response + observable, response=response,
                               perturbation=observable, normalization="none", metric=record["metric"],
                               damping=record["damping"], query_where=query_where, train_where=record["where"],
                               k=k, approximate={"index": self.name, "factory": record["factory"],
                                                 "nprobe": nprobe if self.ivf is not None else None,
                                                 "refine": refine, "rows": record["rows"],
                                                 "built": record["built"]})
        return with_description(topk_table(response + observable, best.result(), queries, labels), description)
