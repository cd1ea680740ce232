"""The reduce stage: the paper's influence quantities from stored projected gradients.

    H_AB(i, j) = φ_{A,i}ᵀ (η̃ + λI)⁻¹ φ_{B,j}      (response A on sample i, perturbation B on j)

Modules: metric (η̃, its eigendecomposition, the whitener), aggregates (group averages in
O(N k²)), pairwise (tiles, top-k, influence vs distance), exact (the paper's matrix-free
minibatch computation; its stage: gradlake.stages.exact_*), output (writing results).
The units of work on store rows: gradlake.stages.reduce_source, reduce_blocks, reduce_aggregates
and reduce_pairwise; the stage's spec, plan and finish:
gradlake.stages.reduce_plan; its driver (entry point ``run_reduce``): gradlake.distributed.reduce_tasks.

Results: ``<store>/reduce/<name>/`` — plain zarr v3 and Parquet, readable without gradlake.
Parquet folders are hive-partitioned by ``checkpoint=<name>`` (read them with
``pyarrow.dataset.dataset(path, partitioning="hive")``). Every zarr array has
``dimension_names``; a labelled dimension has a 1-d coordinate array of the same name
beside it in its group (``xarray.open_zarr(results.zarr, group=<checkpoint>)`` shows them as
coordinates; ``reduce.output.coordinates`` reads them): lambda (the damping first, then the
sweep), pair ("CC", "MC", "EC": response A, perturbation B), normalization ("none",
"row-std", "cosine"), relation ("same_trajectory", "same_class", "other_class"), class,
response_class, perturbation_class (sorted names), t_response, t_perturbation (0..T-1);
in exact/: pair, k, response and perturbation (the batch's sample rows).

    lease.json                held while a reduce writes here (a second reduce of the
                              same name is refused; see gradlake.store.lease)
    summary.json              written LAST: {"complete": true, settings, per-checkpoint
                              summaries (sample counts, metric top eigenvalue, metric_rank,
                              metric_vectors = reference samples × probes, warnings), exact,
                              warnings: [{checkpoint, kind ("undersampled": samples × probes
                              < k; "cliff": the spectrum drops 1e6× within 4 indices),
                              message, remedy, numbers}] (also on stderr and in the report)}
    done/<checkpoint>.json    a checkpoint's completion record (settings hash + summary)
    results.zarr/             zarr v3; consolidated metadata in its root zarr.json (after
                              every array: zarr.open_consolidated / xarray list it in one read)
    results.zarr/<checkpoint>/
      twotime             [lambda, pair, normalization, relation, class, t_response, t_perturbation]
                          mean H over pairs (i, j) with both samples of the class, i at
                          t_response, j at t_perturbation, in the relation (other_class: j in
                          any other class); NaN where no pair
      twotime_pairs       [pair, relation, class, t_response, t_perturbation] pair counts
      class_twotime       [lambda, pair, normalization, response_class, perturbation_class,
                           t_response, t_perturbation] over pairs in different trajectories
      class_twotime_pairs [pair, response_class, perturbation_class, t_response, t_perturbation]
      transfer            [lambda, pair, normalization, response_class, perturbation_class]
                          the class-to-class transfer matrix: class_twotime averaged over all
                          its pairs (time-averaged, pair-weighted)
      transfer_pairs      [pair, response_class, perturbation_class]
      metric              [k, k] η̃ (float64); metric_eigenvalues [k], descending: the
                          k-space NTK spectrum (its top value tracks the largest NTK eigenvalue)
      tiles/<pair>        [response, perturbation] float32 dense H (λ = damping, no
                          normalisation) for tiles/response_rows x tiles/perturbation_rows
    lags.parquet/             per trajectory: lambda, pair, normalization, relation,
                              trajectory, class, lag (= t_response - t_perturbation), value
                              (mean H over that trajectory's pairs at that lag), pairs; with
                              by_layer, share:<group> (gradlake.reduce.layers), summing to value
    lag_stats.parquet/        over trajectories: lambda, pair, normalization, relation, class
                              ("all" or a response class), lag, median, q25, q75,
                              trajectories, pooled_mean (pair-weighted), pairs; with by_layer,
                              pooled_share:<group> (the same pooling), summing to pooled_mean
    lag_checkpoints.parquet   over checkpoints of pooled_mean: group ("*" = all checkpoints,
                              else the name after "seed-<s>-", i.e. across seeds), lambda,
                              pair, normalization, relation, lag, median, q25, q75, checkpoints
    self_influence.parquet/   per sample: row, trajectory, t, class, split, lambda, pair,
                              h_self = H_AB(i, i), row_std = σ_i (the row-std divisor)
    topk.parquet/             the top-k table of gradlake.topk_table (pair, kind, query_row,
                              query_trajectory, query_t, query_class, rank from 1, row,
                              trajectory, t, class, influence; the same as `gradlake topk`);
                              candidates are the reference split, a query never lists itself;
                              with by_layer, share:<group> and block_shares columns
    distance_pairs.parquet/   pair, normalization, row_i, row_j, distance (RMS of x_i - x_j), h
    distance_curve.parquet/   pair, normalization, bin, lo, hi, pairs, distance, mean,
                              median, q25, q75 (equal-count distance bins)
    results.zarr/exact/exact      [pair, response, perturbation] exact H on the batch
    results.zarr/exact/projected  [k, pair, response, perturbation] projected estimates
    exact_batch.parquet       position, row, trajectory, t, class of the batch
    exact_agreement.parquet   k, k_total, pair, normalization, relative_frobenius, spearman
    exact.json                the exact mode's summary (CG iterations and residuals, top
                              eigenvalue of J_B J_Bᵀ + λI with its Lanczos bound), written last

Definitions (exact, checked against dense H in the tests): the metric η̃ is a sum over
the reference split (the paper's η = Σ_i J_iᵀJ_i), a mean over probes. row-std divides
response row i by σ_i, the population standard deviation of H(i, j) over j in the
reference split; cosine is H(i, j)/sqrt(H_AA(i,i) H_BB(j,j)), whose group averages are
computed exactly from sums of unit-normalised whitened φ's.
"""

from __future__ import annotations

__all__: list[str] = []
