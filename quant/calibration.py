"""Calibration sets and their replay through a model.

A `CalibrationSet` holds teacher-forced inputs (whatever the family's `replay` needs: token ids, labels,
latents ...) as tensors with the sample dimension first, plus JSON-able metadata (labels, seeds, which rows
are conditional, DGC outcome). It saves to one safetensors file, written atomically.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from torch import nn

from .adapter import Adapter

META_KEY = "ptq4arvg.calibration"


@dataclass
class CalibrationSet:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {name: t.shape[0] for name, t in self.tensors.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"calibration tensors disagree on the number of samples: {sizes}")

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0] if self.tensors else 0

    def batches(self, batch_size: int, device: torch.device | str | None = None) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            yield {name: t[start:start + batch_size].to(device) for name, t in self.tensors.items()}

    def subset(self, indices: torch.Tensor | list[int], **meta: Any) -> "CalibrationSet":
        index = torch.as_tensor(indices, dtype=torch.long)
        tensors = {name: t[index] for name, t in self.tensors.items()}
        return CalibrationSet(tensors, {**self.meta, **meta})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.contiguous().cpu() for name, t in self.tensors.items()}
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
            tmp = handle.name
        try:
            save_file(tensors, tmp, metadata={META_KEY: json.dumps(self.meta)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationSet":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"calibration file {path} does not exist: create it with the family's "
                                    f"calibrate script (e.g. `python -m VAR.calibrate --out {path}`)")
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if META_KEY not in metadata:
            raise ValueError(f"{path} is not a calibration set written by this toolkit (no {META_KEY} metadata)")
        return cls(load_file(str(path)), json.loads(metadata[META_KEY]))


class StopReplay(Exception):
    """Raised by a hook to end a forward early once the modules being calibrated have run."""


@contextmanager
def stop_after(module: nn.Module | None):
    """End every forward right after `module` runs (nothing downstream needs the data)."""
    if module is None:
        yield
        return

    def stop(*_):
        raise StopReplay

    handle = module.register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def replay(model: nn.Module, adapter: Adapter, calibration: CalibrationSet, *, batch_size: int,
           device: torch.device | str | None = None, desc: str = "calibration",
           last_module: nn.Module | None = None, progress: bool = True) -> None:
    """Run every calibration batch through the model (teacher forced) for the hooks and observers."""
    if adapter.replay is None:
        raise ValueError(f"the {adapter.family} adapter has no replay function: it cannot run a calibration set")
    device = device or next(model.parameters()).device
    with stop_after(last_module):
        for batch in tqdm(calibration.batches(batch_size, device), total=-(-len(calibration) // batch_size),
                          desc=desc, disable=not progress, leave=False):
            try:
                adapter.replay(model, batch)
            except StopReplay:
                pass


def token_mask(positions, num_tokens: int, sink_tokens: int, device) -> torch.Tensor | None:
    """Boolean mask of the tokens that count in statistics (sink tokens excluded), or None for all."""
    if sink_tokens <= 0:
        return None
    ids = positions.require(num_tokens).to(device)
    return ids >= sink_tokens


def gather_tokens(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Rows [n_tokens, C] of x [..., T, C], keeping only the tokens in `keep`."""
    if keep is not None:
        x = x[..., keep, :]
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def dgc_features(model: nn.Module, adapter: Adapter, calibration: CalibrationSet, *, batch_size: int,
                 device: torch.device | str | None = None, progress: bool = True,
                 pooling: str = "token0") -> torch.Tensor:
    """Output of the adapter's DGC feature module for every calibration sequence, [N, C]: at token 0 (the
    official feature) or averaged over all tokens (`pooling="mean"`)."""
    if pooling not in ("token0", "mean"):
        raise ValueError(f"pooling must be 'token0' or 'mean', got {pooling!r}")
    if adapter.dgc_feature_module is None:
        raise ValueError(f"the {adapter.family} adapter names no DGC feature module")
    module = model.get_submodule(adapter.dgc_feature_module)
    features: list[torch.Tensor] = []

    def grab(mod, inputs, output):
        output = output[0] if isinstance(output, tuple) else output
        pooled = output[:, 0] if pooling == "token0" else output.float().mean(1)
        features.append(pooled.detach().float().cpu())

    handle = module.register_forward_hook(grab)
    try:
        replay(model, adapter, calibration, batch_size=batch_size, device=device, desc="DGC features",
               last_module=module, progress=progress)
    finally:
        handle.remove()
    return torch.cat(features)


def select_calibration(model: nn.Module, adapter: Adapter, raw: CalibrationSet, *, mode: str = "entropy",
                       pct: float | None = None, batch_size: int = 32, device=None, pooling: str | None = None,
                       progress: bool = True) -> CalibrationSet:
    """DGC: keep N of the 2N raw CFG sequences (raw.meta["is_cond"] marks the conditional rows and
    raw.meta["dgc_chunk"] the collection chunk size, if any). The outcome is logged and kept in the meta.

    pooling: the sequence feature; default "mean" for the entropy mode and "token0" (official) otherwise.
    Under a causal mask token 0 of every unconditional sequence is the same null-class token, so token 0
    says nothing about how unconditional sequences differ; their mean over all tokens does.
    """
    from .dgc import dgc_select

    if "is_cond" not in raw.meta:
        raise ValueError("the raw calibration set has no 'is_cond' metadata: it must come from the family's "
                         "calibrate script, which records which rows are conditional")
    pooling = pooling or ("mean" if mode == "entropy" else "token0")
    features = dgc_features(model, adapter, raw, batch_size=batch_size, device=device, progress=progress,
                            pooling=pooling)
    result = dgc_select(features, torch.tensor(raw.meta["is_cond"]), mode=mode, chunk=raw.meta.get("dgc_chunk"),
                        pct=pct)
    return raw.subset(result.indices, is_cond=[raw.meta["is_cond"][i] for i in result.indices.tolist()],
                      dgc={"mode": result.mode, "pooling": pooling, "pct_cond": result.pct_cond,
                           "pct_decided": result.pct_decided,
                           "indices": result.indices.tolist()})
