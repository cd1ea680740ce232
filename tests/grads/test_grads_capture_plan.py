"""The plan (which path covers each parameter) is kept per model only while the model stays as it was."""

from __future__ import annotations

import torch
from torch import nn

from gradlake.grads.capture_plan import plan


def _paths(model_plan):
    return ([(layer.name, layer.weight) for layer in model_plan.layers],
            [(entry.name, entry.params) for entry in model_plan.ruled], model_plan.parameters)


def test_the_plan_is_kept_and_rebuilt_when_a_module_or_parameter_changes():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    first = plan(model)
    assert plan(model) is first
    model[1] = nn.GroupNorm(1, 4)  # another module
    assert _paths(plan(model))[1] == [("1", (("1.weight", "weight"), ("1.bias", "bias")))]
    assert plan(model) is not first
    model[2].weight = nn.Parameter(torch.zeros(2, 4, dtype=torch.cfloat))  # a complex weight: no longer a layer
    assert [name for name, _ in _paths(plan(model))[0]] == ["0"]
    assert dict(plan(model).parameters)["2.weight"] == (2, 4, 2)
    model[0].bias = None
    assert "0.bias" not in dict(plan(model).parameters)
