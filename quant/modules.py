"""Quantized modules that replace `nn.Linear` and the attention `MatMul` hook points from outside."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import LogSqrt2Quantizer, UniformQuantizer


class InputTransform(nn.Module):
    """Online per-channel transform x' = x / scale − shift, applied before a layer's input quantizer.

    It exists so a smoothing scale or a shift can be used before (or instead of) being folded into the
    producer of the input. Identity when empty. Hooks on this module see the transformed input.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", None)
        self.register_buffer("shift", None)

    def compose(self, scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
        """Apply (scale, shift) after the current transform: x/s0 − p0 → (x/s0 − p0)/s − p."""
        if scale is not None:
            self.scale = scale.clone() if self.scale is None else self.scale * scale
            if self.shift is not None:
                self.shift = self.shift / scale
        if shift is not None:
            self.shift = shift.clone() if self.shift is None else self.shift + shift

    def clear(self) -> None:
        self.scale, self.shift = None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            x = x / self.scale.to(x.dtype)
        if self.shift is not None:
            x = x - self.shift.to(x.dtype)
        return x


class QuantLinear(nn.Module):
    """A linear layer with simulated (fake) quantization of its weight and input.

    The weight quantizer is per output channel; the input quantizer is per tensor, token-wise (STWQ) or
    dynamic per token, or absent. `weight`/`bias` keep the names and layout of `nn.Linear`, so transforms
    and folds written for `nn.Linear` apply unchanged.
    """

    def __init__(self, linear: nn.Linear, weight_quantizer: UniformQuantizer | None,
                 input_quantizer: UniformQuantizer | None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.input_transform = InputTransform()
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self._cached_weight: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_quantizer, input_quantizer) -> "QuantLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear wraps nn.Linear, got {type(linear).__name__}")
        return cls(linear, weight_quantizer, input_quantizer)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def ensure_bias(self) -> nn.Parameter:
        if self.bias is None:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=self.weight.dtype,
                                                 device=self.weight.device), requires_grad=False)
        return self.bias

    def _apply(self, fn, recurse=True):
        self._cached_weight = None  # derived from the weight: recomputed on its new device / dtype, never left behind
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cached_weight"] = None  # copies and pickles recompute it instead of carrying a second weight
        return state

    def quantized_weight(self) -> torch.Tensor:
        quantizer = self.weight_quantizer
        if quantizer is None or not (quantizer.enabled and quantizer.calibrated):
            return self.weight
        # Recompute only when the weight or its quantizer parameters changed.
        key = (self.weight._version, self.weight.data_ptr(), quantizer.step._version, quantizer.zero_point._version)
        if self._cached_weight is None or self._cached_weight[0] != key:
            self._cached_weight = (key, quantizer(self.weight))
        return self._cached_weight[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_transform(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = self.quantized_weight()
        bias = self.bias
        if x.dtype != weight.dtype:  # autocast-free mixed precision: compute in the activation dtype
            weight = weight.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        return F.linear(x, weight, bias)


class QuantMatMul(nn.Module):
    """`a @ b` with fake-quantized operands (attention q·kᵀ and p·v)."""

    def __init__(self, a_quantizer: UniformQuantizer | LogSqrt2Quantizer | None,
                 b_quantizer: UniformQuantizer | None) -> None:
        super().__init__()
        self.a_quantizer = a_quantizer
        self.b_quantizer = b_quantizer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.a_quantizer is not None:
            a = self.a_quantizer(a)
        if self.b_quantizer is not None:
            b = self.b_quantizer(b)
        return a @ b


def quantizers_of(module: nn.Module):
    """Every quantizer below `module`, with its qualified name."""
    for name, child in module.named_modules():
        if isinstance(child, (UniformQuantizer, LogSqrt2Quantizer)):
            yield name, child
