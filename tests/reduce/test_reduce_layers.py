"""Layer groups from the parameter names of the real models' projector specs."""

import numpy as np
import pytest

from gradlake import models
from gradlake.errors import InputError
from gradlake.grads.projector import Projector
from gradlake.reduce.layers import Layers, layer_groups


@pytest.mark.parametrize("name,groups", [("unet", ("encoder", "bottleneck", "decoder")),
                                         ("vit", ("embed", "position", "blocks.0", "blocks.1", "norm", "unpatch"))])
def test_layer_groups_of_the_models(name, groups):
    cfg = models.config(name, "tiny", channels=4, resolution=16)
    spec = Projector().spec(models.from_config(cfg))
    layers = Layers.from_spec(spec, cfg, spec["k"])
    assert layers.groups == groups
    assert layers.blocks == tuple(p["name"] for p in spec["parameters"])
    if name == "unet":  # encoder: proj_in and down; bottleneck: across; decoder: up and proj_out
        for block, g in zip(layers.blocks, layers.group_of):
            assert groups[g] == {"proj_in": "encoder", "down": "encoder", "across": "bottleneck"}.get(
                block.split(".")[0], "decoder")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3, spec["k"]))
    shares = layers.block_shares(a, b)
    np.testing.assert_allclose(shares.sum(1), (a * b).sum(1), rtol=1e-12)
    np.testing.assert_allclose(layers.group_shares(shares).sum(1), (a * b).sum(1), rtol=1e-12)
    for g, entries in enumerate(layers.group_slices()):
        np.testing.assert_allclose(layers.group_shares(shares)[:, g], (a[:, entries] * b[:, entries]).sum(1))


def test_generic_rule_and_bad_specs():
    assert layer_groups(["embed.1.weight", "blocks.0.a.weight", "blocks.1.a.weight", "head.weight"]) == \
        ["embed", "blocks.0", "blocks.1", "head"]
    assert layer_groups(["down.0.w", "across.w", "other.w"], "unet") == ["down", "across", "other"]
    params = [{"name": "a.weight", "offset": 0, "k": 2}, {"name": "b.weight", "offset": 3, "k": 1}]
    with pytest.raises(InputError, match="do not tile"):
        Layers.from_spec({"parameters": params}, {}, 4)
