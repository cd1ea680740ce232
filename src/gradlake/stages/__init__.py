"""The stages, free of Ray: each a frozen spec, its plan (the units, resumed from their
completion records, gradlake.stages.records), its units of work (what one unit reads, computes
and writes) and its finish (exact.py; reduce_plan.py with the units in reduce.py).

gradlake.distributed.executor runs the units (in process, as Ray tasks or on Ray actors); the
numerics they call live in gradlake.reduce and gradlake.grads, the I/O in gradlake.store and
gradlake.data.
"""
