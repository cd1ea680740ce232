"""Small real inputs for the grads stage tests: a dataset in the project's format, checkpoints."""

from __future__ import annotations

import numpy as np

from gradlake.config import GradsConfig

CHANNELS = ("rho", "rho_vx", "rho_vy", "E")
N_TRAJ, N_TIMES, RES = 8, 6, 16  # 8 * 5 = 40 samples
MODEL = {"name": "vit", "preset": "tiny", "channels": 4, "resolution": RES,
         "overrides": {"dim": 8, "depth": 1, "heads": 2, "patch": 4}}
SETTINGS = GradsConfig(observables=("C", "M", "V"), probes=2, k_in=4, k_out=4, shard_rows=8,
                       batch_size=3, workers=2, retries=2, allocation="uniform")  # allocation: its own tests


def write_dataset(url, storage_options=None, seed=0):
    """A tiny Euler-like dataset (random positive fields) written with the real writer."""
    from gradlake.data import DatasetWriter

    rng = np.random.default_rng(seed)
    writer = DatasetWriter(url, n_trajectories=N_TRAJ, times=np.arange(N_TIMES) * 0.1,
                           channels=CHANNELS, resolution=(RES, RES), family="euler",
                           storage_options=storage_options)
    writer.write(0, 1.0 + rng.random((N_TRAJ, N_TIMES, len(CHANNELS), RES, RES)))
    splits = ["train", "train", "val", "test", "train", "test", "train", "train"]
    return writer.finish(classes=["rp", "crp"] * 4, splits=splits, sources=["test"] * N_TRAJ,
                         params=[{}] * N_TRAJ, provenance={"test": True})


def write_checkpoints(train_dir, n=2, seed=0):
    """n checkpoints of one tiny ViT (different weights), as the training stage writes them."""
    import torch

    from gradlake import models
    from gradlake.models.checkpoint import checkpoint_name, save_checkpoint

    config = models.config(MODEL["name"], MODEL["preset"], MODEL["channels"], MODEL["resolution"],
                           **MODEL["overrides"])
    paths = []
    for epoch in range(1, n + 1):
        torch.manual_seed(seed + epoch)
        model = models.from_config(config)
        path = f"{train_dir}/checkpoints/{checkpoint_name(epoch)}"
        paths.append(save_checkpoint(path, model, config, {"epoch": epoch, "channels": list(CHANNELS)}))
    return paths


def reference_phis(data_url, checkpoint, settings=SETTINGS, storage_options=None):
    """φ of every held sample computed directly (one call, no shards, no store, no Ray)."""
    from gradlake.data import Dataset
    from gradlake.grads import Projector, compute
    from gradlake.models.checkpoint import load_checkpoint

    ds = Dataset.open(data_url, storage_options)
    rows = ds.index().select(splits=settings.splits)
    model, _ = load_checkpoint(checkpoint)
    x, y = ds.samples(rows)
    phis, loss = compute(model, x, y, observables=settings.observables,
                         projector=Projector.from_config(settings), channels=ds.channels,
                         sample_ids=rows, probes=settings.probes, probe_seed=settings.effective_probe_seed,
                         return_loss=True)
    return rows, {k: v.numpy() for k, v in phis.items()}, loss.numpy()
