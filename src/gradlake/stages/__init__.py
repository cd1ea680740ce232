"""The stages, free of Ray: each a frozen spec, its plan (the units, resumed from their
completion records, gradlake.stages.records), its units of work (what one unit reads, computes
and writes) and its finish. The stages of a job, in order, and their units:

- data (data.py): one unit, the dataset, generated or opened;
- train (train.py): a unit per training run (a seed of ``train.seeds``);
- grads: grads_inputs.py (the checks), grads_plan.py (projector, store, shards left) and
  grads_unit.py (ShardTask, the ShardWorker that computes and commits one shard): a unit per
  shard of a checkpoint;
- reduce: reduce_plan.py (spec, checks, plan, finish) with the units in reduce_source.py,
  reduce_blocks.py (parts of the samples table), reduce_aggregates.py (row blocks) and
  reduce_pairwise.py (tile bands, query blocks, distance pairs);
- exact: exact_plan.py (spec, plan, resume), exact_unit.py (a unit per minibatch),
  exact_finish.py and exact_ridge.py (μ_k of a store);
- lds: lds_plan.py (spec, subsets, predictions, resume), lds_unit.py (a unit per retraining on
  an α-subset), lds_finish.py (the scores);
- report (report.py): a unit per figure; the finish writes the page.

A query is interactive, no stage: its passes (the metric's moments, the top-k lists) have the
shape, with the parts of whole shards as units (query.py).

gradlake.distributed.executor runs the units (in process, as Ray tasks or on Ray actors;
``run_stage`` runs a stage here); the numerics they call live in gradlake.reduce,
gradlake.grads, gradlake.lds and gradlake.train, the I/O in gradlake.store, gradlake.data and
gradlake.report.
"""
