"""Model registry: a surrogate is built from a name and a JSON config, never unpickled.

    cfg = config("unet", preset="tiny", channels=4, resolution=64, width=8)
    model = from_config(cfg)          # == build("unet", "tiny", 4, 64, width=8)

A config is ``{"name", "preset", "channels", "resolution", "params": {...}}``; ``params``
is the preset's hyper-parameters with the overrides applied. A user's model (any
architecture) is ``{"name": "import", "path": "package.module:Name", "kwargs": {...}}``
(:func:`import_config`): ``Name`` is an ``nn.Module`` class or a factory returning one, called
with ``kwargs``; it maps [batch, C, *grid] to the same shape. Weights travel separately
(safetensors, see :mod:`gradlake.models.checkpoint`).

Presets: ``tiny`` (CPU tests), ``small`` (a laptop, ~0.5-2M parameters), ``paper`` (the
paper's sizes: UNet ~13M, ViT ~5M parameters for 4 channels at 128x128).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from gradlake.errors import InputError
from gradlake.plugins import import_object
from gradlake.models.unet import UNet
from gradlake.models.vit import ViT

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "unet": {
        "tiny": {"width": 4, "kernels": (3, 3), "io_kernel": 3, "heads": 2, "ffn_ratio": 2},
        "small": {"width": 8, "kernels": (9, 7, 5, 3), "io_kernel": 11, "heads": 4, "ffn_ratio": 2},
        "paper": {"width": 24, "kernels": (9, 7, 5, 3), "io_kernel": 11, "heads": 4, "ffn_ratio": 2},
    },
    "vit": {
        "tiny": {"dim": 16, "depth": 2, "heads": 2, "mlp_ratio": 2, "patch": 4, "patch_kernel": 5},
        "small": {"dim": 128, "depth": 6, "heads": 4, "mlp_ratio": 2, "patch": 4, "patch_kernel": 5},
        "paper": {"dim": 256, "depth": 8, "heads": 8, "mlp_ratio": 2, "patch": 4, "patch_kernel": 5},
    },
}
MODELS = tuple(PRESETS)
# The paper's parameter counts (4 channels at 128x128) that the `paper` presets reproduce.
PAPER_PARAMETERS = {"unet": 13_000_000, "vit": 5_000_000}
PAPER_TOLERANCE = 0.15


def downsampling(cfg: dict[str, Any]) -> int:
    """The factor the grid size must be divisible by."""
    params = cfg["params"]
    return 2 ** len(params["kernels"]) if cfg["name"] == "unet" else params["patch"]


def _check_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        if key == "kernels":
            if (not isinstance(value, (list, tuple)) or not value
                    or any(not isinstance(k, int) or k < 1 or k % 2 == 0 for k in value)):
                raise InputError(f"model {name}: kernels: expected a list of odd ints >= 1, got {value!r}")
            out[key] = tuple(value)
        else:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"model {name}: {key}: expected an int >= 1, got {value!r}")
            if key.endswith("kernel") and value % 2 == 0:
                raise InputError(f"model {name}: {key}: expected an odd kernel size, got {value}")
            out[key] = value
    attention = out["dim"] if name == "vit" else out["width"] * 2 ** (len(out["kernels"]) + 1)
    if attention % out["heads"]:
        raise InputError(f"model {name}: heads: {out['heads']} does not divide the attention width {attention}")
    return out


def config(name: str, preset: str = "tiny", channels: int = 4, resolution: int = 64,
           **overrides: Any) -> dict[str, Any]:
    """The JSON config of a model: preset hyper-parameters with overrides, checked."""
    if name not in PRESETS:
        raise InputError(f"model: unknown model {name!r}; expected one of {', '.join(MODELS)}")
    if preset not in PRESETS[name]:
        raise InputError(f"model {name}: unknown preset {preset!r}; expected one of {', '.join(PRESETS[name])}")
    unknown = sorted(set(overrides) - set(PRESETS[name][preset]))
    if unknown:
        raise InputError(f"model {name}: unknown setting {unknown[0]!r}; expected some of {', '.join(PRESETS[name][preset])}")
    for key, value in (("channels", channels), ("resolution", resolution)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"model {name}: {key}: expected an int >= 1, got {value!r}")
    params = _check_params(name, {**PRESETS[name][preset], **overrides})
    if name == "vit" and params["patch_kernel"] < params["patch"]:
        raise InputError(f"model vit: patch_kernel {params['patch_kernel']} is smaller than the patch stride {params['patch']}")
    cfg = {"name": name, "preset": preset, "channels": channels, "resolution": resolution, "params": params}
    factor = downsampling(cfg)
    if resolution % factor:
        raise InputError(f"model {name}: grid size {resolution} is not divisible by the down-sampling factor {factor}")
    return _jsonable(cfg)


def _jsonable(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    cfg["params"] = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg["params"].items()}
    return cfg


IMPORT = "import"


def import_config(path: str, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON config of a user model named by import path, checked by building it once
    (without touching torch's global RNG)."""
    import torch

    cfg = {"name": IMPORT, "path": str(path), "kwargs": copy.deepcopy(dict(kwargs or {}))}
    with torch.random.fork_rng(devices=[]):
        from_config(cfg)
    return cfg


def check_output(model: nn.Module, sample, source: str) -> None:
    """InputError unless ``model`` maps one sample [1, C, *grid] to a float tensor of its shape."""
    import torch

    x = torch.as_tensor(sample, dtype=torch.float32)
    first = next(model.parameters(), None)
    if first is None:
        raise InputError(f"{source}: the model has no parameters")
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(x.to(first.device))
    except Exception as err:  # noqa: BLE001 -- the user's model failed on real data
        raise InputError(f"{source}: the model fails on a sample of shape {list(x.shape)}: "
                         f"{type(err).__name__}: {err}") from None
    finally:
        model.train(training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape) or not out.is_floating_point():
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"{source}: the model must map [batch, C, *grid] to the same shape "
                         f"(the next state); {list(x.shape)} gave {got}")


def _from_import(cfg: dict[str, Any]) -> nn.Module:
    if set(cfg) != {"name", "path", "kwargs"} or not isinstance(cfg["kwargs"], dict):
        raise InputError(f"model config: expected keys name, path, kwargs (a table); got {cfg!r}")
    factory = import_object(cfg["path"], "model.path")
    try:
        model = factory(**cfg["kwargs"])
    except TypeError as err:
        raise InputError(f"model.kwargs: {cfg['path']} does not accept {cfg['kwargs']}: {err}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"model.path: {cfg['path']}(**kwargs) returned {type(model).__name__}, not a torch.nn.Module")
    return model


def from_config(cfg: dict[str, Any]) -> nn.Module:
    """Build a model (freshly initialised from torch's RNG) from a config made by :func:`config`
    or :func:`import_config`."""
    if isinstance(cfg, dict) and cfg.get("name") == IMPORT:
        return _from_import(cfg)
    if not isinstance(cfg, dict) or not {"name", "preset", "channels", "resolution", "params"} <= set(cfg):
        raise InputError(f"model config: expected keys name, preset, channels, resolution, params; got {cfg!r}")
    checked = config(cfg["name"], cfg["preset"], cfg["channels"], cfg["resolution"], **cfg["params"])
    params = dict(checked["params"])
    if cfg["name"] == "unet":
        return UNet(checked["channels"], params.pop("width"), tuple(params.pop("kernels")), **params)
    return ViT(checked["channels"], checked["resolution"], **params)


def build(name: str, preset: str = "tiny", channels: int = 4, resolution: int = 64, **overrides: Any) -> nn.Module:
    """A plain ``torch.nn.Module`` mapping [batch, channels, R, R] to the same shape."""
    return from_config(config(name, preset, channels, resolution, **overrides))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def preset_table(channels: int = 4, resolution: int = 128) -> list[dict[str, Any]]:
    """Every preset's parameter count; the paper presets carry their check against the paper."""
    rows = []
    for name, presets in PRESETS.items():
        for preset in presets:
            count = parameter_count(build(name, preset, channels, resolution))
            row = {"model": name, "preset": preset, "parameters": count}
            if preset == "paper":
                target = PAPER_PARAMETERS[name]
                row["paper"] = target
                row["within_tolerance"] = abs(count - target) <= PAPER_TOLERANCE * target
            rows.append(row)
    return rows
