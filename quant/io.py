"""Save a quantized model's state and re-apply it onto a freshly loaded full-precision model.

The file holds only what quantization changed or added (quantized layers with their quantizers and
transforms, attention quantizers, and the parameters of the ops that absorbed transforms) as safetensors,
plus a JSON header: recipe, family, the layer map and a fingerprint of the FP model it was made for.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapter import Adapter
from .context import TokenPositions
from .modules import quantizers_of
from .pipeline import QuantizedModel, apply_transform, wrap_modules
from .recipes import Recipe

HEADER_KEY = "ptq4arvg.quant_state"
FORMAT_VERSION = 1


def model_fingerprint(model: nn.Module, adapter: Adapter) -> str:
    """Hash of the shapes of the adapter's layers, so a state made for another model is refused."""
    parts = [adapter.family]
    for spec in adapter.layers:
        weight = model.get_submodule(spec.path).weight
        parts.append(f"{spec.path}:{tuple(weight.shape)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _touched_prefixes(adapter: Adapter, recipe: Recipe) -> list[str]:
    prefixes = [spec.path for spec in adapter.layers]
    prefixes += [s for spec in adapter.layers for s in spec.siblings]
    prefixes += [spec.fold.path for spec in adapter.layers if spec.fold is not None]
    if recipe.quantize_attention:
        prefixes += [spec.path for spec in adapter.matmuls]
    return sorted(set(prefixes))


def _state(model: nn.Module, prefixes: list[str]) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {key: value for key, value in state.items()
            if any(key == p or key.startswith(p + ".") for p in prefixes)}


def save_quantized(handle: QuantizedModel, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model, adapter, recipe = handle.model, handle.adapter, handle.recipe
    tensors = {k: v.detach().contiguous().cpu() for k, v in _state(model, _touched_prefixes(adapter, recipe)).items()}
    calibrated = [name for name, q in quantizers_of(model) if q.calibrated]
    header = {"version": FORMAT_VERSION, "family": adapter.family, "recipe": recipe.to_dict(),
              "fingerprint": model_fingerprint(model, adapter), "calibrated": calibrated,
              "transforms": handle.transforms}
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        tmp_name = tmp.name
    try:
        save_file(tensors, tmp_name, metadata={HEADER_KEY: json.dumps(header)})
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
    return path


def read_header(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"quantized state {path} does not exist: create it with the family's quantize script")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if HEADER_KEY not in metadata:
        raise ValueError(f"{path} is not a quantized state written by this toolkit (no {HEADER_KEY} header)")
    return json.loads(metadata[HEADER_KEY])


def load_quantized(model: nn.Module, adapter: Adapter, path: str | Path) -> QuantizedModel:
    """Turn a fresh FP `model` into the quantized model saved at `path` (no calibration data needed)."""
    header = read_header(path)
    if header["family"] != adapter.family:
        raise ValueError(f"{path} was made for a {header['family']} model, not {adapter.family}")
    adapter.validate(model)
    expected = model_fingerprint(model, adapter)
    if header["fingerprint"] != expected:
        raise ValueError(f"{path} was made for a different {adapter.family} model (layer shapes differ: "
                         f"fingerprint {header['fingerprint']} vs {expected}); load the checkpoint it was made from")
    recipe = Recipe.from_dict({**header["recipe"], "percentiles": tuple(header["recipe"]["percentiles"])})
    positions = TokenPositions()
    handle = QuantizedModel(model, adapter, recipe, positions, transforms=header.get("transforms", {}),
                            hook=adapter.install_position_hook(model, positions))
    model.eval()
    wrap_modules(model, adapter, recipe, positions)
    # Identity transforms create the parameters that folds add (biases, norm affines), so shapes match.
    for spec in adapter.layers:
        if spec.fold is not None and recipe.transform != "none":
            apply_transform(model, spec, None, None)
    with safe_open(str(path), framework="pt", device=str(next(model.parameters()).device)) as f:
        saved = {key: f.get_tensor(key) for key in f.keys()}
    current = _state(model, _touched_prefixes(adapter, recipe))
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the quantized structure: missing {missing[:5]} "
                         f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    for key, value in saved.items():
        target = current[key]
        if target.shape != value.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}")
        target.copy_(value)
    calibrated = set(header["calibrated"])
    for name, quantizer in quantizers_of(model):
        quantizer.calibrated = name in calibrated or quantizer.calibrated
    return handle
