"""The stages' units of work, free of Ray: what one task of a stage reads, computes and writes.

gradlake.distributed runs these units (as Ray tasks or actors); the numerics they call live in
gradlake.reduce and gradlake.grads, the I/O in gradlake.store and gradlake.data.
"""
