"""grads.probe_seed: the V probes drawn apart from the projection (issue 18).

Unset, the probes' seed is grads.seed, as before the two were split: a store bit for bit the
one an explicit probe_seed = seed makes. Another probe_seed changes the V probes (so the probe
metric η̃ a reduce builds from them) and the seed the store records, nothing else: not the
projection, not φ of C or M.
"""

import dataclasses

import numpy as np
import pytest

from gradlake.distributed.grads_stage import run_grads
from gradlake.reduce.metric import Metric, Moments
from gradlake.store import GradientStore

from grads_fixtures import SETTINGS

NAME = "epoch-0001"


@pytest.fixture(scope="module")
def stores(ray_session, grads_inputs, tmp_path_factory):
    """probe_seed -> the store of one checkpoint's run with it (grads.seed 0 throughout)."""
    data, checkpoints = grads_inputs
    root = tmp_path_factory.mktemp("probe-seed")
    opened = {}
    for probe_seed in (None, 0, 7):
        url = str(root / f"store-{probe_seed}")
        run_grads(data, checkpoints[:1], url, dataclasses.replace(SETTINGS, workers=1, probe_seed=probe_seed))
        opened[probe_seed] = GradientStore.open(url)
    return opened


def _stored(store, observable):
    return store.read(NAME, observable, dtype=np.dtype(store.spec.dtype))


def _metric(store):
    train = store.samples(NAME, "split == 'train'").column("row").to_numpy()
    v = store.read(NAME, "V", train).astype(np.float64)
    return Metric.from_moments(Moments(v.shape[-1]).add(v)).eta


def test_unset_probe_seed_is_the_projection_seed(stores):
    default, explicit = stores[None], stores[0]
    assert default.spec.to_json() == explicit.spec.to_json()
    assert default.spec.probe_seed == SETTINGS.seed
    for observable in SETTINGS.observables:
        np.testing.assert_array_equal(_stored(default, observable), _stored(explicit, observable))


def test_another_probe_seed_changes_only_the_probes(stores):
    default, other = stores[None], stores[7]
    assert other.spec.probe_seed == 7
    assert other.spec.projector == default.spec.projector and other.spec.projector["seed"] == SETTINGS.seed
    assert {k: v for k, v in other.spec.to_json().items() if k != "probe_seed"} == \
        {k: v for k, v in default.spec.to_json().items() if k != "probe_seed"}
    for observable in ("C", "M"):
        np.testing.assert_array_equal(_stored(other, observable), _stored(default, observable))
    v_default, v_other = _stored(default, "V"), _stored(other, "V")
    assert v_other.shape == v_default.shape
    assert not np.array_equal(v_other, v_default)
    assert not np.allclose(_metric(other), _metric(default), rtol=1e-3)
