"""The grads stage with an energy allocation: calibrated once, recorded in store.json, kept on resume."""

import dataclasses

import numpy as np
import pytest

from gradlake.distributed.grads_stage import run_grads
from gradlake.errors import InputError
from gradlake.store import GradientStore

from grads_fixtures import SETTINGS

pytestmark = pytest.mark.slow  # a real Ray actor (~10 s of start-up on 2 busy cores)


def test_energy_allocated_store_round_trips(ray_session, grads_inputs, tmp_path):
    from gradlake.data import Dataset
    from gradlake.grads import Projector, compute
    from gradlake.grads.allocation import calibrate
    from gradlake.models.checkpoint import load_checkpoint

    data, checkpoints = grads_inputs
    settings = dataclasses.replace(SETTINGS, allocation="energy", k_total=150, calibration_samples=4, workers=1)
    url = str(tmp_path / "store")
    run_grads(data, checkpoints, url, settings)
    store = GradientStore.open(url)
    spec = store.spec.projector
    assert spec["allocation"] == "energy" and spec["k_total"] == 150 and store.k == spec["k"] <= 150
    ds = Dataset.open(data)
    train = ds.index().select(splits=["train"])
    rows = spec["calibration"]["rows"]
    assert len(rows) == 4 and set(rows) <= set(train.tolist()) and rows[0] == train[0] and rows[-1] == train[-1]
    # Calibrated on the run's last checkpoint and those rows: the same rows per layer, bit for bit.
    model, _ = load_checkpoint(checkpoints[-1])
    x, y = ds.samples(np.array(rows))
    again = calibrate(model, x, y, 150, seed=settings.seed, observables=settings.observables,
                      channels=ds.channels, rows=rows)
    assert again.spec(model) == spec
    # The stored φ are those of the recorded projector, for every checkpoint.
    held = ds.index().select(splits=settings.splits)
    projector = Projector.from_spec(spec)
    for path in checkpoints:
        model, _ = load_checkpoint(path)
        x, y = ds.samples(held)
        expected = compute(model, x, y, ("C",), projector, channels=ds.channels)["C"].numpy()
        got = store.read(path.rsplit("/", 1)[-1], "C", held).astype(np.float32)
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-3 * np.abs(expected).max())
    # Resumed with the same settings: the recorded calibration is kept, nothing recomputed.
    assert run_grads(data, checkpoints, url, settings)["shards_computed"] == 0
    with pytest.raises(InputError, match="projector"):
        run_grads(data, checkpoints, url, dataclasses.replace(settings, k_total=120))
