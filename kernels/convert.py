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

from quant.modules import QuantLinear, QuantMatMul
from quant.pipeline import set_module
from quant.quantizers import Granularity

from . import _extension
from .kv_cache import Int8Codec, Int8KVCodec
from .ops import (ACTIVATION_DTYPES, MAX_FUSED_K, active_backend, aligned_rows, fused_quantize,
                  fused_residual_quantize, int8_linear, sm90_config_index)
from .reference import PROLOGUES
from .weights import pack_weight

CONVERTIBLE = (Granularity.TENSOR, Granularity.TOKEN_GROUPS)


class LayerNormModulated:
    """LayerNorm (no affine) of x followed by the adaLN modulation y * mul + add, not computed yet.

    A block passes it to the Int8Linear it feeds, which computes it inside its quantize kernel (one read of x,
    one int8 write, instead of the normalisation, the modulation and the quantization each going through
    memory). `mul` / `add` are [S, 1, C] or [S, C] per sample; x is [S, L, C]. Only Int8Linear accepts it: a
    fusion pass hands it over only where every consumer is one (see VAR.deploy.fuse_int8_blocks).

    With `residual=(branch, gamma)` the block's residual add comes first, x + branch * gamma (gamma per sample,
    like mul): the consuming kernel writes that sum too, and `summed()` returns it once the layer has run.
    """

    def __init__(self, x: torch.Tensor, eps: float, mul: torch.Tensor, add: torch.Tensor,
                 residual: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.x, self.eps, self.mul, self.add, self.residual = x, eps, mul, add, residual
        self._sum = x if residual is None else None

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    def modulation(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.x.shape[-1]
        return self.mul.reshape(-1, c), self.add.reshape(-1, c)

    def summed(self) -> torch.Tensor:
        """x after the residual add (x itself without one)."""
        if self._sum is None:
            raise RuntimeError("the residual sum is written by the layer that consumes this input: run it first")
        return self._sum


class Int8Linear(nn.Module):
    """A linear layer running on int8 weights and statically quantized int8 activations.

    The input may be a float tensor or a `LayerNormModulated`; `prologue = "gelu_tanh"` makes the layer apply
    the GELU that precedes it itself (set by a family's fusion pass, which then drops the model's own GELU).
    Both run inside the quantize kernel, together with the online input transform.
    """

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        wq_, iq = layer.weight_quantizer, layer.input_quantizer
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.bits = iq.bits
        self.weight_bits = wq_.bits
        self.prologue = "none"
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
        transform = layer.input_transform
        self.register_buffer("channel_scale", None if transform.scale is None else transform.scale.detach().float().clone())
        self.register_buffer("channel_shift", None if transform.shift is None else transform.shift.detach().float().clone())
        self.register_buffer("act_step", iq.step.detach().float().reshape(-1).clone())
        self.register_buffer("act_zero", torch.round(iq.zero_point.detach()).to(torch.int32).reshape(-1))
        self.requantized_channels = int(packed.requantized.sum())
        self.rounded_zero_points = bool((iq.zero_point != torch.round(iq.zero_point)).any())
        self.token_groups = iq.token_groups if iq.granularity == Granularity.TOKEN_GROUPS else None
        self.positions = iq.positions

    def extra_repr(self) -> str:
        groups = f", token groups={self.token_groups.num_groups}" if self.token_groups else ""
        prologue = f", prologue={self.prologue}" if self.prologue != "none" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"W{self.weight_bits}A{self.bits}{groups}{prologue}")

    def forward(self, x) -> torch.Tensor:
        prologue, modulation, eps, pending = self.prologue, None, 0.0, None
        autocast = torch.is_autocast_enabled(x.x.device.type if isinstance(x, LayerNormModulated) else x.device.type)
        if isinstance(x, LayerNormModulated):
            if prologue != "none":
                raise RuntimeError(f"this layer already applies {prologue!r} to its input; it cannot also take a "
                                   f"LayerNorm-modulated one")
            prologue, modulation, eps, pending = "layernorm", x.modulation(), x.eps, x
            x = x.x  # the normalisation reads x in its own precision (float32 under autocast, as the model's)
            out_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        else:
            if autocast:  # the kernels replace an autocast F.linear
                x = x.to(torch.get_autocast_dtype(x.device.type))
            out_dtype = x.dtype
        token_group = None
        if self.token_groups is not None:
            token_group = self.positions.group_index(self.token_groups, x.shape[-2], x.device, torch.int32)
        residual = None if pending is None else pending.residual
        if self._runs_sm90(x, out_dtype):
            xq, act_scale, act_zero = self._quantize_sm90(x, prologue, eps, modulation, token_group, pending)
            rows = xq.numel() // self.in_features
            out = _extension.ops().int8_linear(xq.view(rows, self.in_features), self.wq, act_scale, act_zero,
                                               self.w_scale, self.wsum, self.bias, out_dtype, sm90_config_index(rows))
            return out.view(*x.shape[:-1], self.out_features)
        options = dict(token_group=token_group, modulation=modulation, eps=eps, channel_scale=self.channel_scale,
                       channel_shift=self.channel_shift)
        if residual is not None:
            pending._sum, xq, act_scale, act_zero = fused_residual_quantize(
                x, *residual, self.act_step, self.act_zero, self.bits, **options)
        else:
            xq, act_scale, act_zero = fused_quantize(x, self.act_step, self.act_zero, self.bits, prologue=prologue,
                                                     **options)
        # float64 (exactness tests on the CPU) keeps a float64 output
        return int8_linear(xq, self.wq, act_scale, act_zero, self.w_scale, self.wsum, self.bias, out_dtype=out_dtype)

    def _runs_sm90(self, x: torch.Tensor, out_dtype: torch.dtype) -> bool:
        return (x.is_cuda and x.dtype in ACTIVATION_DTYPES and out_dtype in (torch.bfloat16, torch.float16)
                and self.in_features <= MAX_FUSED_K and active_backend(x.device) == "cutlass_sm90")

    def _quantize_sm90(self, x, prologue, eps, modulation, token_group, pending):
        """The extension's quantize op called directly: this layer's tensors were validated when it was built, and
        the per-call checks of the public functions cost more host time than the kernels take at small M."""
        ops = _extension.ops()
        mul = add = None
        if modulation is not None:
            mul, add = (m.float().contiguous() for m in modulation)
        if pending is not None and pending.residual is not None:
            branch, gamma = pending.residual
            pending._sum, xq, act_scale, act_zero = ops.fused_residual_quantize(
                x.contiguous(), branch.contiguous(), aligned_rows(gamma.reshape(-1, self.in_features)), self.act_step,
                self.act_zero, token_group, self.bits, eps, mul, add, self.channel_scale, self.channel_shift)
            return xq, act_scale, act_zero
        return ops.fused_quantize(x.contiguous(), self.act_step, self.act_zero, token_group, self.bits,
                                  PROLOGUES.index(prologue), eps, mul, add, self.channel_scale, self.channel_shift)


@dataclass
class ConversionReport:
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    requantized_channels: dict[str, int] = field(default_factory=dict)
    rounded_zero_points: list[str] = field(default_factory=list)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    int8_kv_modules: int = 0
    notes: list[str] = field(default_factory=list)

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
        lines += [f"  {note}" for note in self.notes]
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
