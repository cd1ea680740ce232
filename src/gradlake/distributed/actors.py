"""The grads actor: a :class:`ShardWorker` living in a Ray actor process."""

from __future__ import annotations

from typing import Any

import ray

from gradlake.distributed.plan import ShardTask
from gradlake.distributed.shard_work import ShardWorker, WorkerSettings


@ray.remote
class GradsActor:
    """Loads each checkpoint's model once and works through the shards it is given."""

    def __init__(self, settings: WorkerSettings, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.worker = ShardWorker(settings)

    def run(self, task: ShardTask) -> dict[str, Any]:
        return self.worker.run(task)
