"""Weight preparation for the INT8 kernels: per-output-channel symmetric int8, w_hat[n, k] = w_scale[n] * wq[n, k].

Asymmetric b-bit weight grids (codes w_q in [0, 2**b - 1], zero point z_w[n], step d_w[n]) are handled like this:
  - the kernel gets wq = w_q - z_w[n] with w_scale = d_w[n]. This is exact whenever the channel's centred codes fit
    in int8, which is always the case for grids of up to 7 bits with an in-range zero point (W6A6 is exact);
  - a channel whose centred codes do not fit (8-bit asymmetric grids, unless z_w = 128) is re-quantized
    symmetrically: w_scale = d_w * max|w_q - z_w| / 127, wq = round((w_q - z_w) * 127 / max|w_q - z_w|). The error
    is at most half the new step, about d_w / 2 to d_w; `requantized` marks those channels so a conversion can report them.
The alternative, an exact rank-1 weight zero-point term, would need a row sum of every quantized activation.
"""
from typing import NamedTuple

import torch


class Int8Weight(NamedTuple):
    wq: torch.Tensor  # int8 [N, K]
    w_scale: torch.Tensor  # float32 [N]
    wsum: torch.Tensor  # int32 [N], sum_k wq[n, k]: the activation zero-point correction
    requantized: torch.Tensor  # bool [N], channels whose asymmetric grid did not fit int8 exactly


def weight_sum(wq: torch.Tensor) -> torch.Tensor:
    return wq.sum(dim=1, dtype=torch.int32)


def _per_channel(value, channels: int, name: str) -> torch.Tensor:
    value = torch.as_tensor(value)
    if value.numel() == 1:
        return value.reshape(1).expand(channels)
    if value.numel() != channels:
        raise ValueError(f"{name} must hold one value or one per output channel ({channels}), got {tuple(value.shape)}")
    return value.reshape(channels)


def pack_weight(codes: torch.Tensor, zero_point, step, bits: int) -> Int8Weight:
    """Integer codes of a b-bit weight quantizer ([N, K], in [0, 2**bits - 1]) -> kernel weights.

    `zero_point` and `step` are scalars or [N] (one per output channel); the zero point must hold integers.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be [N, K], got {tuple(codes.shape)}")
    channels = codes.shape[0]
    zero_point = _per_channel(zero_point, channels, "zero_point").to(codes.device)
    step = _per_channel(step, channels, "step").to(codes.device, torch.float64)
    if not torch.equal(zero_point, torch.round(zero_point)):
        raise ValueError("zero_point must hold integers: round it when converting (zero_point.round())")
    if codes.is_floating_point() and not torch.equal(codes, torch.round(codes)):
        raise ValueError("codes must hold integers (the quantizer's round(w / step) + zero_point, clamped)")
    if codes.min() < 0 or codes.max() > 2**bits - 1:
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for a {bits}-bit grid")

    centred = codes.to(torch.int64) - zero_point.to(torch.int64)[:, None]
    fits = (centred.amin(dim=1) >= -128) & (centred.amax(dim=1) <= 127)
    peak = centred.abs().amax(dim=1).clamp_min(1).to(torch.float64)
    requantized_codes = torch.round(centred.to(torch.float64) * (127.0 / peak[:, None])).clamp(-128, 127)
    wq = torch.where(fits[:, None], centred.to(torch.float64), requantized_codes).to(torch.int8)
    w_scale = torch.where(fits, step, step * peak / 127.0).to(torch.float32)  # exact for the fitting channels
    return Int8Weight(wq.contiguous(), w_scale, weight_sum(wq), ~fits)


def quantize_weight_symmetric(weight: torch.Tensor, bits: int = 8) -> Int8Weight:
    """Float weight [N, K] -> symmetric per-output-channel b-bit codes in int8 (round to nearest, amax scaling)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().to(torch.float64)
    # The scale is rounded to float32 first so that w_scale * wq is exactly what the kernel computes with.
    scale = (w.abs().amax(dim=1) / qmax).clamp_min(torch.finfo(torch.float32).tiny).to(torch.float32)
    wq = torch.round(w / scale.double()[:, None]).clamp(-qmax - 1, qmax).to(torch.int8)
    return Int8Weight(wq.contiguous(), scale, weight_sum(wq),
                      torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device))
