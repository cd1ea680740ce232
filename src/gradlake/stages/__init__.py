"""The stages, free of Ray: each a frozen spec, its plan (the units, resumed from their
completion records, gradlake.stages.records), its units of work (what one unit reads, computes
and writes) and its finish: grads_inputs.py (the checks), grads_plan.py (projector, store,
shards left) and grads_unit.py (ShardTask, the ShardWorker that computes and commits one shard);
exact_plan.py (spec, plan, resume), exact_unit.py, exact_finish.py and exact_ridge.py (μ_k of a
store); reduce_plan.py (spec, checks, plan, finish) with the units in reduce_source.py,
reduce_blocks.py, reduce_aggregates.py and reduce_pairwise.py.

gradlake.distributed.executor runs the units (in process, as Ray tasks or on Ray actors); the
numerics they call live in gradlake.reduce and gradlake.grads, the I/O in gradlake.store and
gradlake.data.
"""
