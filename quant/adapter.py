"""Adapters: what the quantization library needs to know about a model family, as data.

An adapter names the layers to quantize and their roles, where each transformable layer's input comes
from (the op its smoothing/shift folds into), the token layout (sink tokens, STWQ groups, how the positions
of the current tokens are known), how to replay a calibration batch, and where DGC reads its feature.
The algorithms in `quant` use only this description; they never look at module names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import torch
from torch import nn

from .context import TokenGroups, TokenPositions

FoldKind = Literal["modulation", "layernorm", "rmsnorm", "linear"]


@dataclass(frozen=True)
class FoldTarget:
    """The op producing a layer's input, into which that layer's input transform is folded.

    kind "modulation": an AdaLN linear whose output rows are `layout` chunks; the input is
    LN(x)·(1 + scale_chunk) + shift_chunk. "layernorm" / "rmsnorm": the norm right before the layer.
    "linear": a linear whose output is the layer's input.
    """

    kind: FoldKind
    path: str
    layout: tuple[str, ...] = ()
    scale_chunk: str = ""
    shift_chunk: str = ""


@dataclass(frozen=True)
class LayerSpec:
    """One linear layer to quantize.

    role: what the layer is (qkv, proj, fc1, fc2, w3, modulation, head, ...), used in summaries and by
    recipes that treat roles differently. token_groups: the STWQ layout of its input quantizer (None = one
    per-tensor group). fold: where its input transform folds (None = no smoothing/shift/GPS for this layer).
    siblings: linears reading the same input, which take this layer's transform (PAR w3 shares w1's input).
    block: index of the transformer block the layer belongs to (calibration order); None = after the blocks.
    """

    path: str
    role: str
    token_groups: TokenGroups | None = None
    fold: FoldTarget | None = None
    siblings: tuple[str, ...] = ()
    block: int | None = None


@dataclass(frozen=True)
class MatMulSpec:
    """An attention product hook point (a `quant.nn_hooks.MatMul`). a_kind "log2" = log-√2 for softmax."""

    path: str
    role: Literal["qk", "av"]
    a_kind: Literal["uniform", "log2"] = "uniform"
    block: int | None = None


PositionsFn = Callable[[nn.Module, tuple, Mapping[str, Any]], torch.Tensor]


@dataclass
class Adapter:
    """Per-family description of a model instance (built by the family, e.g. `VAR.adapter.var_adapter`)."""

    family: str
    layers: list[LayerSpec]
    matmuls: list[MatMulSpec] = field(default_factory=list)
    sink_tokens: int = 0
    # A forward pre-hook (with kwargs) is registered on `positions_module`; `positions_fn` returns the
    # positions of the tokens that forward is about to process.
    positions_module: str | None = None
    positions_fn: PositionsFn | None = None
    # Modules whose `explicit_matmuls` flag must be switched on so the MatMul hook points are used.
    attention_modules: tuple[str, ...] = ()
    # Runs the model on one batch of a CalibrationSet (teacher-forced full sequences).
    replay: Callable[[nn.Module, Mapping[str, torch.Tensor]], Any] | None = None
    # Module whose output at token 0 is the DGC feature of a sequence.
    dgc_feature_module: str | None = None
    # Modules kept in floating point on purpose (documentation and dry-run output).
    kept_in_fp: tuple[str, ...] = ()
    # Transformer blocks in execution order (layer/matmul `block` indices point into this list).
    block_paths: tuple[str, ...] = ()

    def validate(self, model: nn.Module) -> None:
        """Fail loudly when the description does not match the model."""
        names = dict(model.named_modules())
        problems = []
        paths = [spec.path for spec in self.layers]
        problems += [f"layer {path!r} is listed twice" for path in sorted({p for p in paths if paths.count(p) > 1})]
        for spec in self.layers:
            module = names.get(spec.path)
            if not isinstance(module, nn.Linear):
                problems.append(f"layer {spec.path!r} ({spec.role}) is {type(module).__name__ if module is not None else 'missing'}, expected nn.Linear")
            if spec.fold is not None and spec.fold.path not in names:
                problems.append(f"fold target {spec.fold.path!r} of {spec.path!r} is missing")
            for sibling in spec.siblings:
                if not isinstance(names.get(sibling), nn.Linear):
                    problems.append(f"sibling {sibling!r} of {spec.path!r} is not an nn.Linear")
        for spec in self.matmuls:
            if spec.path not in names:
                problems.append(f"matmul hook point {spec.path!r} is missing")
        for path in self.attention_modules:
            if not hasattr(names.get(path), "explicit_matmuls"):
                problems.append(f"attention module {path!r} has no `explicit_matmuls` flag")
        for path in (self.positions_module, self.dgc_feature_module, *self.block_paths):
            if path is not None and path not in names:
                problems.append(f"module {path!r} named by the adapter is missing")
        if problems:
            raise ValueError(f"{self.family} adapter does not match the model:\n  " + "\n  ".join(problems))

    def install_position_hook(self, model: nn.Module, positions: TokenPositions):
        """Keep `positions` up to date on every forward of `positions_module`; returns the hook handle.

        The positions object and the function live on the hooked module (not in a closure), so a deep copy of
        the model updates its own copy, the one its quantizers read.
        """
        if self.positions_module is None or self.positions_fn is None:
            return None
        module = model.get_submodule(self.positions_module)
        module.token_positions = positions
        module.token_positions_fn = self.positions_fn
        return module.register_forward_pre_hook(_update_token_positions, with_kwargs=True)


def _update_token_positions(module: nn.Module, args, kwargs) -> None:
    module.token_positions.set(module.token_positions_fn(module, args, kwargs))


def sequence_positions(length_dim: int = 1) -> PositionsFn:
    """Positions 0..T−1 of the first positional argument's dim `length_dim` (models run without a cache)."""

    def positions(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        return torch.arange(x.shape[length_dim], device=x.device)

    return positions

