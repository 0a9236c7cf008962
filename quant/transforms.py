"""Per-channel input transforms: SmoothQuant scales, the symmetric shift and GPS (Gain-Projected Scaling).

Pure, vectorized functions of statistics; `quant.pipeline` gathers the statistics and applies/folds the
results. Notation for a linear y = x Wᵀ + b with input channels i: the layer input becomes x/s − p and the
weight W·diag(s) (see `quant.fold`).
"""
from __future__ import annotations

import torch

from .quantizers import fake_quantize, quant_limits

EPS = 1e-6


def smoothquant_scale(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """s_i = max|X_i|^α / max_o|W_oi|^(1−α), each max clamped at ≥ 1e−6 (SmoothQuant migration)."""
    if act_absmax.shape[-1] != weight.shape[-1]:
        raise ValueError(f"activation statistics have {act_absmax.shape[-1]} channels, weight has {weight.shape[-1]} inputs")
    w_absmax = weight.detach().abs().amax(0).float().clamp_min(EPS)
    return act_absmax.float().clamp_min(EPS).pow(alpha) / w_absmax.pow(1 - alpha)


def symmetric_shift(step: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Shift p_i = Δ_i·(2^(b−1) − 1 − z_i) moving each channel's quantization range to be centred on 0.

    Computed from an asymmetric per-channel quantizer (step Δ_i, zero point z_i) fitted on the input: after
    x' = x − p the range minimum −z_i·Δ_i becomes −(2^(b−1) − 1)·Δ_i with the step unchanged.
    """
    return step * (2 ** (bits - 1) - 1 - zero_point)


def gps_scale(act_sq_norm: torch.Tensor, act_err_sq_norm: torch.Tensor, act_range: torch.Tensor,
              weight: torch.Tensor, weight_quantized: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Closed-form GPS factor per input channel.

    act_sq_norm[i] = ‖X_i‖², act_err_sq_norm[i] = ‖X_i − Q_k(X_i)‖² with every channel quantized with the
    dominant channel k's (Δ_k, z_k) (a stand-in for the per-tensor quantizer whose range k sets),
    act_range[i] = max X_i − min X_i, weight W [C_out, C_in] and its fake-quantized Q(W).

    The per-channel loss split L_i(s) = s²·a_i + g_i/s² with a_i = ‖ΔX_i‖²·‖Q(W)_{:,i}‖² and
    g_i = ‖X_i‖²·‖ΔW_{:,i}‖² is minimal at s⁴ = g_i/a_i; projected onto the dominant channel's
    SmoothQuant-style factor s* = r_k^α / ρ_k^(1−α): s_i = s*·(g_i/a_i)^(1/4), s_k = s*.
    Channels with a_i = 0 or g_i = 0 carry no usable gain information and keep s_i = 1 (a zero factor
    would divide the input by 0).
    """
    weight = weight.detach().float()
    weight_quantized = weight_quantized.detach().float()
    act_range = act_range.float()
    k = int(torch.argmax(act_range))
    weight_range = weight.amax(0) - weight.amin(0)
    s_star = act_range[k].clamp_min(EPS).pow(alpha) / weight_range[k].clamp_min(EPS).pow(1 - alpha)
    a = act_err_sq_norm.float() * weight_quantized.pow(2).sum(0)
    g = act_sq_norm.float() * (weight - weight_quantized).pow(2).sum(0)
    informative = (a > 0) & (g > 0)
    scale = torch.where(informative, s_star * (g / torch.where(informative, a, torch.ones_like(a))).pow(0.25),
                        torch.ones_like(a))
    scale[k] = s_star
    return scale


def dominant_channel_error(x: torch.Tensor, step_k: torch.Tensor, zero_k: torch.Tensor, bits: int) -> torch.Tensor:
    """x − Q(x) with every channel quantized by the dominant channel's asymmetric (Δ_k, z_k)."""
    qmin, qmax = quant_limits(bits, symmetric=False)
    xf = x.float()
    return xf - fake_quantize(xf, step_k.float(), zero_k.float(), qmin, qmax)
