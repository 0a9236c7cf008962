"""Turn a calibrated fake-quant model (from `quant.quantize`) into a real INT8 model.

Every `QuantLinear` whose weight and input quantizers are calibrated, asymmetric-activation, per tensor or
per token group (STWQ), becomes an `Int8Linear`: int8 weights [N, K] with per-channel scales, the static
activation (step, zero point) table, and the INT8 kernels (`kernels.quantized_linear`). The full-precision
weight is dropped. Numerics equal the fake-quant layer up to the exact integer accumulation (see
kernels/README.md); two cases are approximations and are reported: 8-bit asymmetric weight channels whose
centred codes do not fit int8 (re-quantized symmetrically: quantize with `w_symmetric=True` to avoid it), and
non-integer activation zero points (the official EMA statistics), rounded.

Attention products stay as they are (fake-quant `QuantMatMul`) unless `attention="sdpa"`, which switches the
attention back to `F.scaled_dot_product_attention` in the activation dtype: the fast deployment path, where
the post-softmax quantization of the paper cannot run inside a fused attention kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from quant.modules import InputTransform, QuantLinear, QuantMatMul
from quant.pipeline import set_module
from quant.quantizers import Granularity

from .kv_cache import Int8Codec, Int8KVCodec
from .ops import quantized_linear
from .weights import pack_weight

CONVERTIBLE = (Granularity.TENSOR, Granularity.TOKEN_GROUPS)


class Int8Linear(nn.Module):
    """A linear layer running on int8 weights and statically quantized int8 activations."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        wq_, iq = layer.weight_quantizer, layer.input_quantizer
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bits = iq.bits
        self.weight_bits = wq_.bits
        self.input_transform = layer.input_transform if not layer.input_transform.is_identity else InputTransform()
        weight = layer.weight.detach().float()
        step = wq_.step.float()[:, None]
        if wq_.symmetric:  # a symmetric grid is the asymmetric one with z = 2^(b-1)
            zero = torch.full_like(step, 2 ** (wq_.bits - 1))
            codes = torch.clamp(torch.round(weight / step), -(2 ** (wq_.bits - 1) - 1), 2 ** (wq_.bits - 1) - 1) + zero
        else:
            zero = wq_.zero_point.float()[:, None]
            codes = torch.clamp(torch.round(weight / step) + zero, 0, 2 ** wq_.bits - 1)
        packed = pack_weight(codes, zero[:, 0], step[:, 0], wq_.bits)
        self.register_buffer("wq", packed.wq)
        self.register_buffer("w_scale", packed.w_scale)
        self.register_buffer("wsum", packed.wsum)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        self.register_buffer("act_step", iq.step.detach().float().clone())
        self.register_buffer("act_zero", torch.round(iq.zero_point.detach()).to(torch.int32))
        self.requantized_channels = int(packed.requantized.sum())
        self.rounded_zero_points = bool((iq.zero_point != torch.round(iq.zero_point)).any())
        self.token_groups = iq.token_groups if iq.granularity == Granularity.TOKEN_GROUPS else None
        self.positions = iq.positions

    def extra_repr(self) -> str:
        groups = f", token groups={self.token_groups.num_groups}" if self.token_groups else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"W{self.weight_bits}A{self.bits}{groups}")

    def _row_params(self, x: torch.Tensor):
        if self.token_groups is None:
            return self.act_step, self.act_zero
        group = self.token_groups.group_of(self.positions.require(x.shape[-2]).to(x.device))
        rows = x.shape[:-1]
        return self.act_step[group].expand(rows), self.act_zero[group].expand(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # the kernels replace an autocast F.linear
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x = self.input_transform(x)
        step, zero = self._row_params(x)
        # float64 (exactness tests on the CPU) quantizes like the kernels, in float32, and keeps a float64 output
        source = x.float() if x.dtype == torch.float64 else x
        return quantized_linear(source, step, zero, self.bits, self.wq, self.w_scale, self.wsum, self.bias,
                                out_dtype=x.dtype)


@dataclass
class ConversionReport:
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    requantized_channels: dict[str, int] = field(default_factory=dict)
    rounded_zero_points: list[str] = field(default_factory=list)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    int8_kv_modules: int = 0

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} linear layers to INT8; weights "
                 f"{self.weight_bytes_before / 2**20:.1f} MiB → {self.weight_bytes_after / 2**20:.1f} MiB"]
        lines += [f"  kept fake-quant: {name} ({why})" for name, why in self.skipped.items()]
        if self.requantized_channels:
            total = sum(self.requantized_channels.values())
            lines.append(f"  {total} 8-bit asymmetric weight channels re-quantized symmetrically in "
                         f"{len(self.requantized_channels)} layers (quantize with w_symmetric=True to avoid)")
        if self.rounded_zero_points:
            lines.append(f"  non-integer activation zero points rounded in {len(self.rounded_zero_points)} layers")
        return "\n".join(lines)


def _why_not(layer: QuantLinear) -> str | None:
    wq_, iq = layer.weight_quantizer, layer.input_quantizer
    if wq_ is None or not wq_.calibrated:
        return "weight quantizer not calibrated"
    if iq is None or not iq.calibrated:
        return "input quantizer missing or not calibrated"
    if iq.granularity not in CONVERTIBLE:
        return f"{iq.granularity.value} activations have no INT8 kernel here"
    if iq.symmetric:
        return "symmetric activation grids are not supported by the kernels"
    if layer.in_features % 16 or layer.out_features % 8:
        return f"shape {layer.out_features}x{layer.in_features} is not K % 16 == 0 and N % 8 == 0"
    return None


def install_int8_kv_cache(model: nn.Module) -> int:
    """Give every attention module with a `kv_codec` hook point an INT8 cache built from its calibrated K and V
    quantizers (the b operands of its `qk_matmul` and `av_matmul`). Returns how many modules got one."""
    count = 0
    for name, module in model.named_modules():
        if not hasattr(module, "kv_codec"):
            continue
        qk, av = getattr(module, "qk_matmul", None), getattr(module, "av_matmul", None)
        if not (isinstance(qk, QuantMatMul) and isinstance(av, QuantMatMul)):
            raise ValueError(f"{name} has no quantized attention products to take K/V grids from: quantize with "
                             f"quantize_attention=True to use an INT8 KV cache")
        module.kv_codec = Int8KVCodec(Int8Codec.from_quantizer(qk.b_quantizer), Int8Codec.from_quantizer(av.b_quantizer))
        count += 1
    return count


def convert(model: nn.Module, *, attention: str = "fake", kv_cache: str = "model") -> ConversionReport:
    """Replace the model's calibrated QuantLinear layers by Int8Linear, in place.

    attention: "fake" keeps the quantized attention products; "sdpa" restores the fused FP attention.
    kv_cache: "model" leaves the KV cache in the compute dtype; "int8" stores it as the int8 codes of the
    calibrated K/V quantizers (models with a `kv_codec` hook point, e.g. VAR).
    """
    if attention not in ("fake", "sdpa"):
        raise ValueError(f"attention must be 'fake' or 'sdpa', got {attention!r}")
    if kv_cache not in ("model", "int8"):
        raise ValueError(f"kv_cache must be 'model' or 'int8', got {kv_cache!r}")
    report = ConversionReport()
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise ValueError("the model has no QuantLinear layers: quantize it with quant.quantize first")
    for name, layer in layers:
        reason = _why_not(layer)
        if reason is not None:
            report.skipped[name] = reason
            continue
        int8 = Int8Linear(layer).to(layer.weight.device)
        report.weight_bytes_before += layer.weight.numel() * layer.weight.element_size()
        report.weight_bytes_after += int8.wq.numel() + 4 * int8.w_scale.numel()
        if int8.requantized_channels:
            report.requantized_channels[name] = int8.requantized_channels
        if int8.rounded_zero_points:
            report.rounded_zero_points.append(name)
        set_module(model, name, int8)
        report.converted.append(name)
    if kv_cache == "int8":
        report.int8_kv_modules = install_int8_kv_cache(model)
    if attention == "sdpa":
        for name, module in list(model.named_modules()):
            if getattr(module, "explicit_matmuls", False):
                module.explicit_matmuls = False
    return report
