"""INT8 kernels for quantized linear layers (W8A8 and W6A6 on the same INT8 tensor cores).

    xq, act_zero = quantize_rows(x, step, zero_point, bits)          # float [..., K] -> int8 [..., K]
    y = int8_linear(xq, wq, step, act_zero, w_scale, wsum, bias)      # fused INT8 GEMM + dequantization
    y = quantized_linear(x, step, zero_point, bits, wq, w_scale, wsum, bias)   # both
    xq, step_rows, act_zero = fused_quantize(x, step, zero_point, bits, prologue="layernorm", modulation=...)
                                                                      # quantization fused with its producer
    x_sum, xq, step_rows, act_zero = fused_residual_quantize(x, branch, gamma, step, zero_point, modulation=...)
    q = split_qkv(qkv, heads, k_slots, v_slots, bias=..., l2_norm=True, q_scale=...)   # attention inputs
    y = group_norm_silu(x, weight, bias, groups=32, out_dtype=torch.bfloat16)           # a decoder's GroupNorm + SiLU

Weights come from kernels.weights (pack_weight, quantize_weight_symmetric). The int8 convention, the build and
the backends are described in kernels/README.md; active_backend() tells which path runs.
"""
from kernels.ops import (BACKENDS, active_backend, extension_status, fused_quantize, fused_residual_quantize,
                         group_norm_silu, int8_linear, quantize_rows, quantized_linear, split_qkv)
from kernels.reference import activation_offset
from kernels.weights import Int8Weight, pack_weight, quantize_weight_symmetric, weight_sum

__all__ = [
    "BACKENDS", "active_backend", "extension_status", "fused_quantize", "fused_residual_quantize", "int8_linear",
    "quantize_rows", "quantized_linear", "split_qkv", "group_norm_silu",
    "activation_offset", "Int8Weight", "pack_weight", "quantize_weight_symmetric", "weight_sum",
]
