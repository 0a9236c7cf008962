"""Synthetic ARVG-like layers and activations, for tests and `benchmarks/synthetic_layers.py`.

The activations carry the three challenges the method targets:
1. channel-wise outliers: a few channels amplified 10-100x (and shifted) by the AdaLN modulation;
2. token-wise variance: every scale (position group) of the multi-scale sequence has its own magnitude,
   and token 0 is a massive "sink" token;
3. the CFG split: conditional rows are modulated by their class, unconditional rows all by the null class.
A block is modulation → fc1 (C→4C) → GELU → fc2 (4C→C), mirroring an AdaLN transformer MLP.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import Adapter, FoldTarget, LayerSpec, sequence_positions
from .calibration import CalibrationSet
from .context import TokenGroups

MODULATION_LAYOUT = ("scale", "shift")


@dataclass(frozen=True)
class SyntheticSpec:
    channels: int = 256
    cond_dim: int = 64
    num_classes: int = 16
    scales: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8)  # token maps of pn×pn tokens, VAR-like
    depth: int = 2
    outlier_channels: int = 4
    outlier_gain: tuple[float, float] = (10.0, 100.0)
    sink_gain: float = 30.0
    token_scale_growth: float = 1.6  # magnitude ratio between consecutive scales

    @property
    def group_sizes(self) -> tuple[int, ...]:
        return tuple(pn * pn for pn in self.scales)

    @property
    def tokens(self) -> int:
        return sum(self.group_sizes)


class SyntheticBlock(nn.Module):
    def __init__(self, spec: SyntheticSpec) -> None:
        super().__init__()
        c = spec.channels
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(spec.cond_dim, 2 * c))
        self.fc1 = nn.Linear(c, 4 * c)
        self.fc2 = nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond)[:, None, :].chunk(2, dim=-1)
        return self.fc2(F.gelu(self.fc1(x * (1 + scale) + shift), approximate="tanh"))


class SyntheticARVG(nn.Module):
    """A stack of independent modulation-MLP blocks fed by the same token sequence (outputs summed)."""

    def __init__(self, spec: SyntheticSpec, seed: int = 0) -> None:
        super().__init__()
        self.spec = spec
        g = torch.Generator().manual_seed(seed)
        self.class_emb = nn.Embedding(spec.num_classes + 1, spec.cond_dim)  # last row: null class
        self.blocks = nn.ModuleList(SyntheticBlock(spec) for _ in range(spec.depth))
        with torch.no_grad():
            self.class_emb.weight.copy_(torch.randn(spec.num_classes + 1, spec.cond_dim, generator=g))
            c = spec.channels
            lo, hi = spec.outlier_gain
            for block in self.blocks:
                lin = block.ada_lin[1]
                lin.weight.copy_(0.3 * torch.randn(2 * c, spec.cond_dim, generator=g) / spec.cond_dim ** 0.5)
                bias = torch.zeros(2 * c)
                bias[c:] = 0.5 * torch.randn(c, generator=g)  # asymmetric channels
                outliers = torch.randperm(c, generator=g)[:spec.outlier_channels]
                gains = lo * (hi / lo) ** torch.rand(spec.outlier_channels, generator=g)
                bias[outliers] = gains - 1
                bias[c + outliers] = gains * (0.5 + torch.rand(spec.outlier_channels, generator=g))
                lin.bias.copy_(bias)
                for fc in (block.fc1, block.fc2):
                    fc.weight.copy_(torch.randn(fc.weight.shape, generator=g) / fc.in_features ** 0.5)
                    fc.bias.copy_(0.02 * torch.randn(fc.out_features, generator=g))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cond = self.class_emb(labels)
        return sum(block(x, cond) for block in self.blocks)


def synthetic_batch(spec: SyntheticSpec, num_classes_drawn: int, seed: int) -> dict[str, torch.Tensor]:
    """CFG batch: `num_classes_drawn` conditional rows followed by as many unconditional rows (same tokens)."""
    g = torch.Generator().manual_seed(seed)
    n = num_classes_drawn
    group_scale = torch.cat([torch.full((size,), spec.token_scale_growth ** i) for i, size in enumerate(spec.group_sizes)])
    u = torch.rand(n, spec.tokens, spec.channels, generator=g).clamp(1e-6, 1 - 1e-6)
    x = -torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs())  # Laplace(0, 1): heavy-ish tails
    x = x * group_scale[None, :, None]
    sink_channels = torch.randperm(spec.channels, generator=g)[:2]
    x[:, 0, sink_channels] *= spec.sink_gain
    labels = torch.randint(0, spec.num_classes, (n,), generator=g)
    null = torch.full((n,), spec.num_classes)
    return {"x": torch.cat([x, x]), "labels": torch.cat([labels, null])}


def synthetic_calibration(spec: SyntheticSpec, num_classes_drawn: int = 32, seed: int = 1) -> CalibrationSet:
    batch = synthetic_batch(spec, num_classes_drawn, seed)
    is_cond = [True] * num_classes_drawn + [False] * num_classes_drawn
    return CalibrationSet(batch, {"family": "synthetic", "is_cond": is_cond, "seed": seed})


def synthetic_adapter(model: SyntheticARVG) -> Adapter:
    spec = model.spec
    scale_groups = TokenGroups.from_sizes(spec.group_sizes)  # scale 0 is the single sink token
    layers = []
    for i in range(spec.depth):
        prefix = f"blocks.{i}"
        layers += [
            LayerSpec(f"{prefix}.ada_lin.1", "modulation", block=i),
            LayerSpec(f"{prefix}.fc1", "fc1", token_groups=scale_groups, block=i,
                      fold=FoldTarget("modulation", f"{prefix}.ada_lin.1", MODULATION_LAYOUT, "scale", "shift")),
            LayerSpec(f"{prefix}.fc2", "fc2", token_groups=TokenGroups.sink_and_rest(1), block=i),
        ]
    return Adapter(
        family="synthetic", layers=layers, sink_tokens=1, positions_module="",
        positions_fn=sequence_positions(1), replay=lambda m, batch: m(batch["x"], batch["labels"]),
        dgc_feature_module=f"blocks.{spec.depth - 1}", kept_in_fp=("class_emb",),
        block_paths=tuple(f"blocks.{i}" for i in range(spec.depth)))
