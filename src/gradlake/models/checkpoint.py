"""Checkpoints: weights as safetensors, everything else as JSON, at any fsspec URL.

    <train_dir>/checkpoints/epoch-0002/
        model.safetensors      the model's state_dict (plain `safetensors` reads it)
        optimizer.safetensors  optimizer state tensors ("state.<param index>.<name>") and RNG
                               states ("rng.torch", "rng.cuda")
        optimizer.json         the optimizer's param_groups
        config.json            written LAST (its presence marks the checkpoint complete):
                               {"format", "model": <models.config>, "epoch", "metrics",
                                "history", "dataset": {"url", "fingerprint"}, "channels",
                                "train": <TrainConfig>, "versions"}

Nothing is ever unpickled: weights load through safetensors, or torch.load(weights_only=True)
for external ``.pt`` weights, and are checked against the config before use.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from gradlake import __version__, fsio
from gradlake.errors import GradlakeError, InputError
from gradlake.models import from_config

FORMAT = "gradlake-checkpoint"
CHECKPOINTS = "checkpoints"
WEIGHTS, OPTIMIZER, OPTIMIZER_GROUPS, CONFIG = "model.safetensors", "optimizer.safetensors", "optimizer.json", "config.json"


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def _read(url: str, storage_options: dict | None) -> bytes:
    folder, name = posixpath.split(url)
    files = fsio.Folder(folder, storage_options)
    if not files.exists(name):
        raise InputError(f"{url}: no such file")
    return files.read_bytes(name)


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True, default=list).encode()


def save_checkpoint(path: str, model: nn.Module, model_config: dict[str, Any], meta: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None,
                    storage_options: dict | None = None) -> str:
    """Write one checkpoint directory; config.json last. Returns ``path``."""
    files = fsio.Folder(path, storage_options)
    files.remove(CONFIG)  # rewriting: the directory stops counting as complete first
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    files.write_bytes(WEIGHTS, save_safetensors(weights, metadata={"format": FORMAT}))
    if optimizer is not None:
        state = optimizer.state_dict()
        tensors = {f"state.{i}.{name}": torch.as_tensor(value).detach().to("cpu").contiguous()
                   for i, entries in state["state"].items() for name, value in entries.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        files.write_bytes(OPTIMIZER, save_safetensors(tensors))
        files.write_bytes(OPTIMIZER_GROUPS, _json(state["param_groups"]))
    config = {**meta, "format": FORMAT, "model": model_config,
              "versions": {"gradlake": __version__, "torch": torch.__version__}}
    files.write_bytes(CONFIG, _json(config))
    return path


def read_weights(url: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` (or ``.pt``/``.pth`` via weights_only); nothing else."""
    if url.endswith(".safetensors"):
        return load_safetensors(_read(url, storage_options))
    if url.endswith((".pt", ".pth")):
        try:
            weights = torch.load(io.BytesIO(_read(url, storage_options)), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 -- any unpickling refusal is the user's file
            raise InputError(f"{url}: not a weights-only torch file ({err})") from None
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise InputError(f"{url}: expected a state_dict (names -> tensors)")
        return weights
    raise InputError(f"{url}: refusing to load weights that are not .safetensors (or weights-only .pt/.pth)")


def check_weights(weights: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """InputError naming the first tensor that is missing, unexpected, of another shape/dtype,
    or holding NaN or inf."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in weights:
            raise InputError(f"{source}: tensor {name!r} is missing (the config expects {list(tensor.shape)})")
        got = weights[name]
        if got.shape != tensor.shape or got.dtype != tensor.dtype:
            raise InputError(
                f"{source}: tensor {name!r} is {got.dtype} {list(got.shape)}, "
                f"the config expects {tensor.dtype} {list(tensor.shape)}"
            )
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise InputError(f"{source}: tensor {extra[0]!r} is not part of the model the config describes")
    bad = next((name for name in expected if weights[name].is_floating_point()
                and not bool(torch.isfinite(weights[name]).all())), None)
    if bad:
        raise InputError(f"{source}: tensor {bad!r} holds NaN or inf values; these weights cannot be used")


def read_meta(path: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The checkpoint's config.json (``path``: the checkpoint folder or a file in it)."""
    url = fsio.join(checkpoint_dir(path), CONFIG)
    try:
        meta = json.loads(_read(url, storage_options))
    except ValueError as err:
        raise InputError(f"{url}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
        raise InputError(f"{url}: not a gradlake checkpoint config (expected format {FORMAT!r})")
    return meta


def checkpoint_dir(path: str) -> str:
    """The checkpoint folder of a path to it or to a file in it."""
    return path.rsplit("/", 1)[0] if path.endswith((".safetensors", ".json")) else path.rstrip("/")


def load_checkpoint(path: str, storage_options: dict | None = None,
                    device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model with the checkpoint's weights, meta from config.json); checks weights against the config."""
    path = checkpoint_dir(path)
    meta = read_meta(path, storage_options)
    model = from_config(meta["model"])
    weights = read_weights(fsio.join(path, WEIGHTS), storage_options)
    check_weights(weights, model, fsio.join(path, WEIGHTS))
    model.load_state_dict(weights)
    return model.to(device), meta


def load_optimizer_state(path: str, optimizer: torch.optim.Optimizer, storage_options: dict | None = None) -> None:
    """Restore the optimizer state and the RNG states saved with a checkpoint."""
    path = checkpoint_dir(path)
    tensors = load_safetensors(_read(fsio.join(path, OPTIMIZER), storage_options))
    groups = json.loads(_read(fsio.join(path, OPTIMIZER_GROUPS), storage_options))
    # JSON turned tuples (e.g. Adam's betas) into lists; "params" is the only list.
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()} for g in groups]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict({"state": dict(sorted(state.items())), "param_groups": groups})
    except (ValueError, KeyError) as err:
        raise GradlakeError(f"{path}: optimizer state does not fit the model ({err})") from None
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def list_checkpoints(train_dir: str, storage_options: dict | None = None) -> list[str]:
    """Complete checkpoints (those with a config.json) of a training run, oldest first."""
    files = fsio.Folder(fsio.join(train_dir, CHECKPOINTS), storage_options)
    return [files.join_url(n) for n in sorted(files.ls())
            if n.startswith("epoch-") and files.exists(f"{n}/{CONFIG}")]


def file_sha256(url: str, storage_options: dict | None = None) -> str:
    """sha256 (hex) of a file's bytes."""
    return hashlib.sha256(_read(url, storage_options)).hexdigest()


def checkpoint_sha256(path: str, storage_options: dict | None = None) -> str:
    """sha256 (hex) of the checkpoint's model.safetensors."""
    return file_sha256(fsio.join(checkpoint_dir(path), WEIGHTS), storage_options)
