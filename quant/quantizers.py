"""Fake quantizers: uniform (asymmetric / symmetric, several granularities) and log-sqrt2.

Conventions (shared with `kernels`): a b-bit uniform quantizer with step Δ and zero point z maps
    q = clamp(round(x / Δ) + z, qmin, qmax),   x̂ = (q − z)·Δ
with [qmin, qmax] = [0, 2^b − 1] (asymmetric) or [−(2^(b−1) − 1), 2^(b−1) − 1] and z = 0 (symmetric).

Ranges are chosen by a percentile/MSE search: for each candidate percentile pct the range is
[quantile(1 − pct), quantile(pct)] (pct = 1 means the exact min/max) and the candidate with the lowest mean
squared fake-quantization error wins, independently for every channel or token group.

Activation statistics are aggregated over the whole calibration set: exact running min/max plus a bounded,
uniformly drawn reservoir of values on which the percentiles and the MSE are evaluated (exact whenever the
data fits in `max_samples`). `statistics="ema"` reproduces the official VAR/PAR behaviour instead: parameters
fitted on each mini-batch and blended 0.1·new + 0.9·old.
"""
from __future__ import annotations

import math
from enum import Enum
from typing import Sequence

import torch
from torch import nn

from .context import TokenGroups, TokenPositions

DEFAULT_PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999, 1.0)
OFFICIAL_PERCENTILES: tuple[float, ...] = (0.999, 0.9999, 0.99999)
EMA_MOMENTUM = 0.9  # official: Δ ← 0.1·Δ_new + 0.9·Δ
MIN_STEP = 1e-8


class Granularity(str, Enum):
    TENSOR = "tensor"
    OUT_CHANNEL = "out_channel"    # weights: one (Δ, z) per output row
    IN_CHANNEL = "in_channel"      # activations, analysis tool for shift/GPS: one per input channel
    TOKEN_GROUPS = "token_groups"  # STWQ: one per group of sequence positions
    DYNAMIC_TOKEN = "dynamic_token"  # baselines: min/max of every token at run time


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"unsupported bit width {bits!r}: uniform quantizers support 2..8 bits")
    return bits


def quant_limits(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def fake_quantize(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    q = torch.clamp(torch.round(x / step) + zero_point, qmin, qmax)
    return (q - zero_point) * step


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, *,
                      zero_in_range: bool = False, integer_zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ, z) covering [lo, hi]; `zero_in_range` widens the range to contain 0 (official RAR/MAR)."""
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        step = (amax / (2 ** (bits - 1) - 1)).clamp_min(MIN_STEP)
        return step, torch.zeros_like(step)
    if zero_in_range:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    step = ((hi - lo) / (2 ** bits - 1)).clamp_min(MIN_STEP)
    zero = -lo / step
    return step, (torch.round(zero) if integer_zero else zero)


def sorted_quantile(sorted_values: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated quantile along the last dim of already sorted values (torch.quantile semantics)."""
    n = sorted_values.shape[-1]
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_values[..., lo] * (1 - frac) + sorted_values[..., hi] * frac


def search_uniform_params(samples: torch.Tensor, exact_min: torch.Tensor, exact_max: torch.Tensor, bits: int,
                          symmetric: bool, percentiles: Sequence[float], *, zero_in_range: bool = False,
                          integer_zero: bool = True, error_weights: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile/MSE range search, vectorized over rows: samples [G, n] → Δ [G], z [G].

    `error_weights` (broadcastable to samples) weights each squared error, e.g. by the squared norm of the
    weight column an activation channel multiplies, so the search minimises a layer-output error proxy.
    """
    qmin, qmax = quant_limits(bits, symmetric)
    samples = samples.float()
    ordered = samples.sort(dim=-1).values if any(p < 1.0 for p in percentiles) else None
    best_err = best_step = best_zero = None
    for pct in percentiles:
        if pct >= 1.0:
            lo, hi = exact_min.float(), exact_max.float()
        else:
            lo, hi = sorted_quantile(ordered, 1.0 - pct), sorted_quantile(ordered, pct)
        step, zero = params_from_range(lo, hi, bits, symmetric, zero_in_range=zero_in_range,
                                       integer_zero=integer_zero)
        err = (samples - fake_quantize(samples, step[:, None], zero[:, None], qmin, qmax)).pow(2)
        err = (err if error_weights is None else err * error_weights).mean(-1)
        if best_err is None:
            best_err, best_step, best_zero = err, step, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_step = torch.where(better, step, best_step)
            best_zero = torch.where(better, zero, best_zero)
    return best_step, best_zero


class Reservoir:
    """Uniform sample without replacement of a stream of rows, bounded to `capacity` rows.

    Every row gets a random key; the rows with the smallest keys are kept, which is a uniform sample of all
    rows seen so far. Rows are values (width 1) or token vectors (width C, for per-channel statistics).
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = max(int(capacity), 1)
        self.seed = seed
        self.rows: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self._generator: torch.Generator | None = None

    def add(self, rows: torch.Tensor) -> None:
        if rows.numel() == 0:
            return
        if self._generator is None:
            self._generator = torch.Generator(device=rows.device).manual_seed(self.seed)
        keys = torch.rand(rows.shape[0], generator=self._generator, device=rows.device)
        rows = rows.detach().float()
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        if rows.shape[0] > self.capacity:
            keep = torch.topk(keys, self.capacity, largest=False).indices
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys


class RunningRange:
    """Exact running min/max (elementwise over a fixed shape)."""

    def __init__(self) -> None:
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def add(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        lo, hi = lo.detach().float(), hi.detach().float()
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)


class UniformQuantizer(nn.Module):
    """Uniform fake quantizer with calibrated (static) or per-token (dynamic) parameters.

    Token-wise quantizers read the positions of the current tokens from a shared `TokenPositions` object;
    inputs are laid out [..., T, C] (tokens on the second-to-last dim). Tokens at positions below
    `skip_tokens_below` are neither observed nor quantized (sink tokens during the GPS phase).
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, granularity: Granularity | str = Granularity.TENSOR, *,
                 size: int | None = None, token_groups: TokenGroups | None = None,
                 positions: TokenPositions | None = None, range_method: str = "mse",
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES, statistics: str = "full",
                 max_samples: int = 2 ** 22, zero_in_range: bool = False, skip_tokens_below: int = 0) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.symmetric = symmetric
        self.granularity = Granularity(granularity)
        if range_method not in ("mse", "minmax"):
            raise ValueError(f"range_method must be 'mse' or 'minmax', got {range_method!r}")
        if statistics not in ("full", "ema"):
            raise ValueError(f"statistics must be 'full' (whole calibration set) or 'ema' (official), got {statistics!r}")
        if self.granularity == Granularity.TOKEN_GROUPS and token_groups is None:
            raise ValueError("token_groups granularity needs a TokenGroups layout")
        if self.granularity in (Granularity.OUT_CHANNEL, Granularity.IN_CHANNEL) and size is None:
            raise ValueError(f"{self.granularity.value} granularity needs the channel count `size`")
        self.token_groups = token_groups
        self.positions = positions
        self.percentiles = (1.0,) if range_method == "minmax" else tuple(percentiles)
        self.statistics = statistics
        self.max_samples = max_samples
        self.zero_in_range = zero_in_range
        self.skip_tokens_below = skip_tokens_below
        n_params = {Granularity.TENSOR: 1, Granularity.OUT_CHANNEL: size, Granularity.IN_CHANNEL: size,
                    Granularity.TOKEN_GROUPS: token_groups.num_groups if token_groups else 0,
                    Granularity.DYNAMIC_TOKEN: 0}[self.granularity]
        self.register_buffer("step", torch.ones(n_params))
        self.register_buffer("zero_point", torch.zeros(n_params))
        self.calibrated = self.granularity == Granularity.DYNAMIC_TOKEN
        self.enabled = True
        self.observing = False
        # Optional per-input-channel weights of the squared error in the range search (set during
        # calibration by the owner layer: the squared norms of its weight columns).
        self.channel_weights: torch.Tensor | None = None
        self._observed_groups: set[int] = set()
        self._reservoirs: dict[int, Reservoir] = {}
        self._ranges: dict[int, RunningRange] = {}

    # ----------------------------------------------------------------------------------------- helpers
    @property
    def limits(self) -> tuple[int, int]:
        return quant_limits(self.bits, self.symmetric)

    @property
    def needs_positions(self) -> bool:
        return self.granularity == Granularity.TOKEN_GROUPS or self.skip_tokens_below > 0

    def extra_repr(self) -> str:
        extra = f", groups={self.token_groups.num_groups}" if self.token_groups else ""
        kind = "sym" if self.symmetric else "asym"
        return f"bits={self.bits}, {kind}, {self.granularity.value}{extra}, statistics={self.statistics}"

    def _token_positions(self, x: torch.Tensor) -> torch.Tensor:
        if self.positions is None:
            raise RuntimeError("this quantizer is token-wise but has no TokenPositions source attached")
        return self.positions.require(x.shape[-2]).to(x.device)

    # ------------------------------------------------------------------------------------- calibration
    def reset(self) -> None:
        """Forget the parameters and start observing again."""
        self.calibrated = self.granularity == Granularity.DYNAMIC_TOKEN
        self._reservoirs, self._ranges, self._observed_groups = {}, {}, set()
        self.step.fill_(1.0)
        self.zero_point.fill_(0.0)

    def start_observing(self) -> None:
        if self.granularity == Granularity.DYNAMIC_TOKEN:
            return
        self.reset()
        self.observing = True

    def calibrate_weight(self, weight: torch.Tensor) -> None:
        """Fit per-output-row (or per-tensor) parameters on a weight tensor in one shot."""
        rows = weight.detach().float().reshape(weight.shape[0], -1)
        if self.granularity == Granularity.TENSOR:
            rows = rows.reshape(1, -1)
        elif self.granularity != Granularity.OUT_CHANNEL:
            raise ValueError(f"weights are quantized per tensor or per output channel, not {self.granularity.value}")
        step, zero = search_uniform_params(rows, rows.amin(-1), rows.amax(-1), self.bits, self.symmetric,
                                           self.percentiles, zero_in_range=self.zero_in_range)
        self.step.copy_(step)
        self.zero_point.copy_(zero)
        self.calibrated, self.observing = True, False

    def _observe(self, x: torch.Tensor, group_of_token: torch.Tensor | None) -> None:
        x = x.detach()
        width = x.shape[-1]
        if self.granularity == Granularity.IN_CHANNEL:
            rows = x.reshape(-1, width)
            self._add(0, rows, rows.amin(0), rows.amax(0), row_width=width)
            return
        if self.granularity == Granularity.TENSOR or group_of_token is None:
            rows = x.reshape(-1, width)
            self._add(0, rows, rows.amin(), rows.amax(), row_width=width)
            return
        tokens_first = x.movedim(-2, 0)  # [T, ..., C]
        for group in torch.unique(group_of_token).tolist():
            rows = tokens_first[group_of_token == group].reshape(-1, width)
            self._add(group, rows, rows.amin(), rows.amax(), row_width=width)

    def _add(self, group: int, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, row_width: int) -> None:
        if self.statistics == "ema":
            self._fit_and_blend(group, rows, lo, hi)
            return
        self._observed_groups.add(group)
        if group not in self._reservoirs:
            self._reservoirs[group] = Reservoir(max(self.max_samples // row_width, 1), seed=group)
            self._ranges[group] = RunningRange()
        self._reservoirs[group].add(rows)
        self._ranges[group].add(lo, hi)

    def _fit(self, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = None
        if self.granularity == Granularity.IN_CHANNEL:
            samples, lo, hi = rows.t(), lo.reshape(-1), hi.reshape(-1)
        else:
            samples, lo, hi = rows.reshape(1, -1), lo.reshape(1), hi.reshape(1)
            if self.channel_weights is not None and self.channel_weights.numel() == rows.shape[-1]:
                w = self.channel_weights.to(rows.device, torch.float32)
                weights = (w / w.mean().clamp_min(1e-30)).expand_as(rows).reshape(1, -1)
        return search_uniform_params(samples, lo, hi, self.bits, self.symmetric, self.percentiles,
                                     zero_in_range=self.zero_in_range, integer_zero=self.statistics != "ema",
                                     error_weights=weights)

    def _fit_and_blend(self, group: int, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Official mini-batch rule: first batch sets the parameters, later ones blend 0.1 new / 0.9 old."""
        step, zero = self._fit(rows.float(), lo.float(), hi.float())
        index = slice(None) if self.granularity == Granularity.IN_CHANNEL else group
        if group in self._observed_groups:
            step = (1 - EMA_MOMENTUM) * step + EMA_MOMENTUM * self.step[index]
            zero = (1 - EMA_MOMENTUM) * zero + EMA_MOMENTUM * self.zero_point[index]
        self._observed_groups.add(group)
        self.step[index] = step.reshape(self.step[index].shape)
        self.zero_point[index] = zero.reshape(self.zero_point[index].shape)

    def finish_observing(self) -> None:
        """Turn the observed statistics into parameters."""
        if not self.observing:
            return
        self.observing = False
        if self.statistics == "full":
            for group, reservoir in self._reservoirs.items():
                span = self._ranges[group]
                step, zero = self._fit(reservoir.rows, span.min, span.max)
                index = slice(None) if self.granularity == Granularity.IN_CHANNEL else group
                self.step[index] = step.reshape(self.step[index].shape)
                self.zero_point[index] = zero.reshape(self.zero_point[index].shape)
        if self._observed_groups:
            self.calibrated = True
        self._reservoirs, self._ranges = {}, {}

    def observed_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (min, max) seen so far in group 0 (per channel for in-channel quantizers)."""
        span = self._ranges.get(0)
        if span is None:
            raise RuntimeError("nothing observed yet")
        return span.min, span.max

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == Granularity.OUT_CHANNEL:
            if not (self.enabled and self.calibrated):
                return x
            shape = (-1,) + (1,) * (x.dim() - 1)
            return fake_quantize(x, self.step.view(shape), self.zero_point.view(shape), *self.limits)
        if not self.enabled and not self.observing:
            return x
        positions = self._token_positions(x) if self.needs_positions else None
        keep = None
        if self.skip_tokens_below > 0:
            keep = positions >= self.skip_tokens_below
        group = (self.positions.group_index(self.token_groups, x.shape[-2], x.device)
                 if self.granularity == Granularity.TOKEN_GROUPS else None)
        if self.observing:
            if keep is None:
                self._observe(x, group)
            elif bool(keep.any()):
                self._observe(x[..., keep, :], None if group is None else group[keep])
            if self.statistics == "full":
                return x  # full-set statistics: pass through until the whole set has been seen
        if not (self.enabled and self.calibrated):
            return x
        quantized = self._quantize(x, group)
        if keep is not None:
            quantized = torch.where(keep[:, None], quantized, x)
        return quantized

    def _quantize(self, x: torch.Tensor, group: torch.Tensor | None) -> torch.Tensor:
        qmin, qmax = self.limits
        if self.granularity == Granularity.DYNAMIC_TOKEN:
            step, zero = params_from_range(x.amin(-1, keepdim=True).float(), x.amax(-1, keepdim=True).float(),
                                           self.bits, self.symmetric)
            return fake_quantize(x.float(), step, zero, qmin, qmax).to(x.dtype)
        if self.granularity == Granularity.TOKEN_GROUPS:
            step, zero = self.step[group][:, None], self.zero_point[group][:, None]
        else:
            step, zero = self.step, self.zero_point
        if x.dtype in (torch.float16, torch.bfloat16):
            # x / step in float32, like the INT8 kernels: a tiny step would underflow to 0 in half precision
            return fake_quantize(x.float(), step, zero, qmin, qmax).to(x.dtype)
        return fake_quantize(x, step.to(x.dtype), zero.to(x.dtype), qmin, qmax)


class LogSqrt2Quantizer(nn.Module):
    """Log-√2 quantizer (RepQ-ViT) for post-softmax probabilities in [0, 1]; per-tensor scale δ.

    q = clamp(round(−2·log2(x/δ)), 0, 2^b − 1); x̂ = δ·2^(−⌈q/2⌉)·(1 + (√2 − 1)·(q mod 2)); values whose
    unclamped q reaches 2^b (x = 0 included) dequantize to 0. δ is the percentile of x with the lowest MSE.
    """

    def __init__(self, bits: int = 8, percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                 max_samples: int = 2 ** 22) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.percentiles = tuple(percentiles)
        self.register_buffer("delta", torch.ones(1))
        self.calibrated = False
        self.enabled = True
        self.observing = False
        self.statistics = "full"
        self._reservoir: Reservoir | None = None
        self._range = RunningRange()
        self.max_samples = max_samples

    def extra_repr(self) -> str:
        return f"bits={self.bits}, log-sqrt2, per-tensor"

    def reset(self) -> None:
        self.calibrated = False
        self._reservoir, self._range = None, RunningRange()

    def start_observing(self) -> None:
        self.reset()
        self._reservoir = Reservoir(self.max_samples)
        self.observing = True

    def finish_observing(self) -> None:
        if not self.observing:
            return
        self.observing = False
        if self._reservoir.rows is None:
            return  # saw no data: stays uncalibrated (the caller reports it)
        samples = self._reservoir.rows.reshape(1, -1)
        ordered = samples.sort(dim=-1).values
        best = None
        for pct in self.percentiles:
            delta = self._range.max.reshape(1) if pct >= 1.0 else sorted_quantile(ordered, pct)
            delta = delta.clamp_min(MIN_STEP)
            err = (samples - self.quantize_with(samples, delta)).pow(2).mean()
            if best is None or err < best[0]:
                best = (err, delta)
        self.delta.copy_(best[1].reshape(1))
        self.calibrated = True
        self._reservoir = None

    def quantize_with(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        levels = 2 ** self.bits
        code = torch.round(-2 * torch.log2(x.float() / delta))
        code = torch.nan_to_num(code, nan=float(levels), posinf=float(levels))
        underflow = code >= levels
        code = code.clamp(0, levels - 1)
        value = delta * torch.pow(2.0, -torch.ceil(code / 2)) * (1 + (math.sqrt(2) - 1) * (code % 2))
        return torch.where(underflow, torch.zeros_like(value), value).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            flat = x.detach().reshape(-1)
            self._reservoir.add(flat[:, None])
            self._range.add(flat.amin(), flat.amax())
            return x
        if not (self.enabled and self.calibrated):
            return x
        return self.quantize_with(x, self.delta)

