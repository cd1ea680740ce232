"""The report's exact section: the exact minibatch H (the paper's quantity), its headline
tables and findings, and how far the projected H is from it."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradlake.report import figures
from gradlake.report.html import Section, Table
from gradlake.report.inputs import ReduceResults, column, select
from gradlake.report.plan import Plan, norm_label, pair_title

HEADLINE_LABELS = {"dt0": "Δt = 0", "dt1": "|Δt| = 1", "tail": "|Δt| ≥ 3", "other_class": "other classes"}


def _number(value) -> str:
    return "—" if value is None else f"{value:.3g}"


def exact_findings(head: dict[str, Any]) -> list[str]:
    """Plain-words checks of the paper's two findings on the exact row-std H_CC (all classes)."""
    dt0, dt1, tail, other = (head.get(k) for k in ("dt0", "dt1", "tail", "other_class"))
    found = []
    if None not in (dt0, dt1):
        decays = dt0 > dt1 and (tail is None or dt1 > tail)
        found.append(("Reproduced" if decays else "NOT reproduced") + ": the diagonal decays with |Δt| "
                     f"(Δt = 0: {dt0:.3g}, |Δt| = 1: {dt1:.3g}, tail: {_number(tail)}).")
    if None not in (dt0, other):
        local = other < (dt1 if dt1 is not None else dt0)
        found.append(("Reproduced" if local else "NOT reproduced") + ": influence across classes stays below "
                     f"influence within a trajectory (other classes: {other:.3g}).")
    return found


def add_exact(plan: Plan, results: ReduceResults) -> dict[str, Any] | None:
    """The exact minibatch H (the paper's quantity) and the projected-vs-exact agreement;
    returns the exact run's record (None when it did not run)."""
    section = plan.section("exact", "Exact minibatch influence (the paper's H) and the projected estimate")
    found = results.exact()
    if found is None:
        section.notes.append("The exact minibatch mode was not run for this reduce (reduce.exact.enabled = "
                             "false), so there is no exact H and no exact-versus-projected comparison.")
        return None
    info, table = found
    section.intro = _intro(info)
    if results.has("exact_sweep.parquet"):
        section.tables.append(_sweep_table(results))
    _headline(section, info)
    _heatmaps(plan, section, results, info)
    if table is None:
        section.notes.append("No projected-vs-exact agreement was computed (reduce.exact.agreement = 0).")
        return info
    section.tables.append(_agreement_table(table))
    _agreement_figures(plan, section, table)
    return info


def _intro(info: dict[str, Any]) -> str:
    """What was solved, how accurately, and what the projected H is against it."""
    solver = info.get("solver", {})
    bound = solver.get("max_h_error_bound")
    accuracy = (f"every entry within the proven bound, at most {_number(bound)} in the units of each normalisation "
                f"(htol {info.get('htol', '?')}), after a median of {_number(solver.get('median_products'))} K·v "
                "products" if bound is not None else
                f"worst relative residual {_number(solver.get('max_relative_residual'))} (rtol {info.get('rtol', '?')})")
    spectrum = (f" K's effective dimension at λ is d_eff(λ) = Σ μ/(μ + λ) ≈ {_number(info['d_eff'])} of "
                f"N·d = {info.get('n_outputs', '?')} outputs (top eigenvalue {_number(info.get('top_eigenvalue'))})."
                if info.get("d_eff") else "")
    intro = (
        f"This section shows the EXACT minibatch influence H = Rᵀ J (JᵀJ + λI)⁻¹ Jᵀ R, the paper's quantity, "
        f"solved on {info.get('minibatches', 1)} minibatch(es) of {info.get('batch_size', '?')} samples "
        f"(per class one trajectory of split {info.get('split', 'test')}, consecutive transitions) from checkpoint "
        f"{str(info.get('checkpoint', '?')).rstrip('/').rsplit('/', 1)[-1]}, λ = {info.get('damping', '?')}, "
        f"{', '.join(solver.get('method', []))} solver in {', '.join(solver.get('space', []))} space, {accuracy}."
        f"{spectrum} The other sections show the PROJECTED estimate from the gradient store; the tables below say "
        "how far it is from the exact H, at λ and at the sketch's effective ridge μ_k.")
    ridge = info.get("effective_ridge") or []
    if ridge and info.get("d_eff"):
        intro += (
            " What the projected H is: a rank-k projection answers at an effective ridge μ_k with d_eff(μ_k) = k, "
            "not at the run's λ — " + "; ".join(f"k = {int(k)}: μ_k = {_number(mu)}" for k, mu in ridge) +
            f". The projected figures show influence at that larger damping; at the run's λ = {info.get('damping')} "
            f"they would need k ≈ d_eff(λ) ≈ {_number(info['d_eff'])}.")
    for row in info.get("paper_solver", []):
        if row["pair"] == "CC" and row["normalization"] == "row-std":
            intro += (
                f" The paper's own solve (float32 MINRES on the stacked right-hand sides, restarted every "
                f"{row['restart']}, stopped at a stacked residual of {row['stop']:g}) on minibatch {row['minibatch']}: "
                f"row-std H_CC {_number(row['relative_frobenius'])} from the converged H (relative Frobenius; "
                f"Spearman {_number(row['spearman'])}) after {row['products']} products, "
                f"{'reaching' if row['reached_stop'] else 'not reaching'} its stop.")
    return intro


def _sweep_table(results: ReduceResults) -> Table:
    """Exact row-std H_CC (all classes) at every λ of the sweep."""
    sweep = select(results.table("exact_sweep.parquet", partitioned=False), pair="CC", normalization="row-std",
                   **{"class": "all"})
    return Table(
        "Exact row-std H_CC (all classes) at every λ of the sweep, from the same solve: the diagonal's dominance "
        "(Δt = 0 ÷ |Δt| = 1) and the effective dimension d_eff(λ); 'no' where the solve's bound did not reach "
        "htol at that λ.",
        ["λ", *HEADLINE_LABELS.values(), "dominance", "d_eff", "within htol"],
        [[f"{row['lambda']:g}", *(_number(row.get(k)) for k in HEADLINE_LABELS),
          _number(row["dt0"] / row["dt1"]) if row.get("dt0") is not None and row.get("dt1") else "–",
          _number(row.get("d_eff")), "yes" if row["converged"] else "no"] for row in sweep.to_pylist()])


def _headline(section: Section, info: dict[str, Any]) -> None:
    """Per pair and normalisation, the mean exact H at each |Δt| and across classes (with the
    paper's numbers beside H_CC) and whether the paper's two findings hold."""
    head = info.get("headline", {})
    paper = info.get("paper", {}).get("CC", {}).get("row-std", {}).get("all", {})
    for pair in info.get("pairs", []):
        for norm in ("row-std", "none"):
            cells = head.get(pair, {}).get(norm)
            if not cells:
                continue
            rows = [[name, *(_number(cells[name].get(k)) for k in HEADLINE_LABELS)]
                    for name in sorted(cells, key=lambda c: (c == "all", c))]
            if pair == "CC" and norm == "row-std" and paper:
                rows.append(["paper (UNet, CE)", *(_number(paper.get(k)) for k in HEADLINE_LABELS)])
            section.tables.append(Table(
                f"Exact {pair_title(pair)}, {norm_label(norm)}: mean over same-trajectory pairs at each |Δt| and "
                "over pairs of different classes, pooled over minibatches.",
                ["class", *HEADLINE_LABELS.values()], rows))
            if pair == "CC" and norm == "row-std":
                section.notes += exact_findings(cells.get("all", {}))


def _heatmaps(plan: Plan, section: Section, results: ReduceResults, info: dict[str, Any]) -> None:
    """The exact two-time heatmaps of each pair, in the report's normalisations."""
    values, coords = results.array("exact", "twotime")
    t = np.asarray(coords["t_response"])
    for p, pair in enumerate(coords["pair"]):
        for n, norm in enumerate(coords["normalization"]):
            if norm not in plan.normalizations:
                continue
            panels = [(f"{cls}: {relation.replace('_', ' ')}", values[p, n, r, c])
                      for r, relation in enumerate(coords["relation"]) for c, cls in enumerate(coords["class"])]
            plan.figure(section, f"exact-twotime-{pair}-{norm}",
                        f"EXACT {pair_title(pair)}, {norm}: mean over minibatches of perturbing at t (x) on the "
                        "response at t (y); top row within a trajectory, bottom row across classes, one column per "
                        "class.", figures.two_time_heatmaps, panels=panels, ncols=len(coords["class"]),
                        t_response=t, t_perturbation=t, colorbar_label=norm_label(norm),
                        title=f"Exact {pair_title(pair)}\n{norm_label(norm)}, λ = {info.get('damping')}")


def _agreement_table(table) -> Table:
    """Projected vs exact H per pair, normalisation, allocation and k, means over minibatches."""
    rows = []
    allocations = list(dict.fromkeys(table.column("allocation").to_pylist()))
    for norm in dict.fromkeys(table.column("normalization").to_pylist()):
        for pair in dict.fromkeys(table.column("pair").to_pylist()):
            for allocation in allocations:
                part = select(table, normalization=norm, pair=pair, allocation=allocation)
                for k in np.unique(column(part, "k")):
                    at = select(part, k=int(k))
                    mu = [v for v in at.column("mu_k").to_pylist() if v is not None] \
                        if "mu_k" in at.column_names else []
                    at_mu = [v for v in at.column("relative_frobenius_mu_k").to_pylist() if v is not None] \
                        if mu else []
                    rows.append([pair, norm, allocation, str(int(k)), str(int(column(at, "k_total")[0])),
                                 f"{np.mean(column(at, 'relative_frobenius')):.3g}",
                                 f"{np.mean(column(at, 'spearman')):.3f}",
                                 _number(float(np.median(mu))) if mu else "–",
                                 f"{np.mean(at_mu):.3g}" if at_mu else "–", str(at.num_rows)])
    return Table(
        "Projected vs exact H on the agreement minibatches (the projected H from projected gradients — uniform "
        "k_in = k_out = k, or the energy allocation of the same total k — with the batch's probe metric): relative "
        "Frobenius error and Spearman rank correlation, means over minibatches.",
        ["pair", "normalisation", "allocation", "k", "k total", "rel. Frobenius error at λ", "Spearman", "μ_k",
         "rel. Frobenius error at μ_k", "minibatches"],
        rows)


def _agreement_figures(plan: Plan, section: Section, table) -> None:
    """Error and rank correlation of the projected H against k, per normalisation (energy allocation)."""
    allocations = list(dict.fromkeys(table.column("allocation").to_pylist()))
    table = select(table, allocation=allocations[-1])  # the figures: the energy allocation
    for norm in dict.fromkeys(table.column("normalization").to_pylist()):  # in the reduce's order
        part = select(table, normalization=norm)
        error, rank = {}, {}
        ks = np.unique(column(part, "k"))
        for pair in dict.fromkeys(part.column("pair").to_pylist()):
            sel = select(part, pair=pair)
            error[pair] = np.array([np.mean(column(select(sel, k=int(k)), "relative_frobenius")) for k in ks])
            rank[pair] = np.array([np.mean(column(select(sel, k=int(k)), "spearman")) for k in ks])
        k_total = sorted(set(column(part, "k_total").tolist()))
        plan.figure(section, f"exact-{norm}",
                    f"{norm}: the relative Frobenius error (left) and Spearman rank correlation (right) of the "
                    "projected H against the exact H on the agreement minibatches, against k = k_in = k_out (total "
                    f"projected dimensions {', '.join(map(str, k_total))}), so falling error and rising correlation "
                    "with k mean the projection preserves the influence.",
                    figures.exact_agreement, ks=ks, relative_error=error, rank_correlation=rank,
                    title=f"Projected vs exact influence, {norm_label(norm)}")
