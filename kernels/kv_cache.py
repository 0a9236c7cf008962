"""INT8 KV cache: keys and values stored as int8 codes of the method's own per-tensor K and V quantizers.

PTQ4ARVG already quantizes K (operand of q·kᵀ) and V (operand of p·v) per tensor with static (step, zero
point); storing the cache as those codes halves its memory against bf16 and changes no numerics of the
fake-quant model's K and V. At batch 100 with CFG the KV cache, not the weights, dominates VAR's memory.
"""
from __future__ import annotations

import torch

from quant.quantizers import UniformQuantizer

from . import _extension
from .reference import activation_offset, encode_codes


class Int8Codec:
    """One tensor's b-bit asymmetric grid stored in int8 as q − c (the activation convention of the kernels)."""

    def __init__(self, step: torch.Tensor, zero_point: torch.Tensor, bits: int) -> None:
        self.bits = bits
        self.step = step.detach().float().reshape(())
        self.zero = torch.round(zero_point.detach().float()).reshape(())
        self.offset = activation_offset(self.zero, bits)
        self._device_params: dict = {}

    @classmethod
    def from_quantizer(cls, quantizer: UniformQuantizer) -> "Int8Codec":
        if quantizer is None or not quantizer.calibrated or quantizer.step.numel() != 1 or quantizer.symmetric:
            raise ValueError("an INT8 KV cache needs calibrated per-tensor asymmetric K and V quantizers")
        return cls(quantizer.step, quantizer.zero_point, quantizer.bits)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return encode_codes(x, self.step, self.zero, self.bits)

    def decode(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # In the compute dtype, as the fake-quant K/V quantizers run under autocast: (q - z) * step with step
        # rounded to dtype; q - z is a small integer, so the product has one rounding, as in dtype arithmetic.
        rows = stored.reshape(-1, stored.shape[-2] * stored.shape[-1]) if stored.dim() >= 2 else None
        if (rows is not None and stored.is_cuda and _extension.runs_elementwise(stored.device)
                and dtype in (torch.bfloat16, torch.float16, torch.float32) and rows.stride(-1) == 1
                and rows.shape[-1] % 16 == 0 and (rows.shape[0] <= 1 or rows.stride(0) % 16 == 0)
                and rows.data_ptr() % 16 == 0):
            # one pass over the cache (read int8, write dtype) instead of three elementwise ops
            return _extension.ops().dequantize_codes(rows, self._params(dtype, stored.device), dtype).view(stored.shape)
        return (stored.to(dtype) + (self.offset - self.zero).to(dtype)) * self.step.to(dtype)

    def _params(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[q - z shift, step rounded to dtype] as float32 on the device, made once per (dtype, device)."""
        key = (dtype, str(device))
        if key not in self._device_params:
            shift = (self.offset - self.zero).float().reshape(())
            self._device_params[key] = torch.stack([shift, self.step.to(dtype).float()]).to(device)
        return self._device_params[key]


class Int8KVCodec:
    """The pair of codecs a VAR `SelfAttention.kv_codec` expects."""

    def __init__(self, key: Int8Codec, value: Int8Codec) -> None:
        self.key, self.value = key, value
        self._grids: dict = {}

    def encode(self, k: torch.Tensor, v: torch.Tensor):
        return self.key.encode(k), self.value.encode(v)

    def grid(self, device: torch.device) -> tuple[torch.Tensor, int]:
        """([k_step, k_zero, v_step, v_zero] as float32 on `device`, bits): what kernels.split_qkv takes to write
        the codes itself. Both grids must have the same width."""
        if self.key.bits != self.value.bits:
            raise ValueError(f"keys and values are quantized to {self.key.bits} and {self.value.bits} bits; the "
                             f"fused cache write needs one width")
        key = str(device)
        if key not in self._grids:
            values = [self.key.step, self.key.zero, self.value.step, self.value.zero]
            self._grids[key] = torch.stack([v.float().reshape(()) for v in values]).to(device)
        return self._grids[key], self.key.bits

    def decode(self, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype):
        return self.key.decode(k, dtype), self.value.decode(v, dtype)
