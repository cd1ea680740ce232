"""The report's provenance table: where the store, its dataset, model, checkpoints,
projector and reduce came from, as (field, value) rows."""

from __future__ import annotations

import json
from typing import Any

from gradlake import __version__
from gradlake.report.inputs import ReduceResults


def _short_json(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def provenance_rows(summary: dict[str, Any], results: ReduceResults | None, reduce_name: str,
                    normalizations: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(field, value) rows of the provenance table, from the store summary and the reduce's."""
    prov = summary.get("provenance", {})
    ds, model, proj = prov.get("dataset", {}), prov.get("model", {}), prov.get("projector", {})
    rows = [("gradient store", f"{summary.get('url', '')} (written by gradlake {prov.get('gradlake_version', '?')}, "
                               f"created {prov.get('created', '?')})")]
    rows.append(("dataset", f"{ds.get('family', '?')}: {ds.get('n_trajectories', '?')} trajectories × "
                            f"{ds.get('n_times', '?')} times, channels {', '.join(ds.get('channels', []))}; "
                            f"{ds.get('url', '')}"))
    rows.append(("dataset fingerprint", str(ds.get("fingerprint", "?"))))
    model_text = f"{model.get('name', '?')}"
    if "preset" in model:
        model_text += (f" ({model['preset']}, {model.get('resolution', '?')}², "
                       f"{model.get('channels', '?')} channels)")
    rows.append(("model", model_text))
    rows.append(("model parameters", _short_json(model.get("params", model))))
    for name, info in summary.get("checkpoints", {}).items():
        state = ("complete" if info.get("complete")
                 else f"{info.get('shards_done')}/{info.get('shards_total')} shards")
        rows.append((f"checkpoint {name}", f"sha256 {info.get('sha256', '?')} ({state})"))
    proj_keys = [k for k in ("kind", "seed", "allocation", "k_total") if k in proj]
    if proj.get("allocation", "uniform") == "uniform":
        proj_keys += [k for k in ("k_in", "k_out", "k_dense") if k in proj]
    rows.append(("projector", f"k = {summary.get('k')}" + "".join(f", {k} = {proj[k]}" for k in proj_keys)))
    rows.append(("observables", f"{', '.join(summary.get('observables', []))} (probes for V: "
                                f"{summary.get('probes', '?')}; stored as {summary.get('dtype', '?')})"))
    rows.append(("samples", f"{summary.get('n_samples', '?')} of {summary.get('n_rows', '?')} "
                            f"(splits {', '.join(summary.get('splits', []))})"))
    if results is None:
        rows.append((f"reduce {reduce_name}", "not found"))
    else:
        s = results.settings
        rows.append(("reduce", f"{reduce_name} ({results.url})"))
        rows.append(("lambda (damping)", f"{results.damping:g}" + (
            f"; sweep {', '.join(f'{x:g}' for x in s.get('lambdas', []))}" if s.get("lambdas") else "")))
        estimator = s.get("metric_estimator", "probes")
        rows.append(("metric", f"η̃ from φ_{s.get('metric', '?')} over the {s.get('reference_split', '?')} split"
                               + ("" if estimator == "probes" else f" ({estimator} estimator)")))
        rows.append(("pairs, normalisations", f"{', '.join(s.get('pairs', []))}; "
                                              f"{', '.join(s.get('normalize', []))}"))
        rows.append(("reduced checkpoints", ", ".join(results.checkpoints)))
        rows.append(("normalisations drawn", ", ".join(normalizations)))
    rows.append(("report", f"gradlake {__version__}"))
    return rows

