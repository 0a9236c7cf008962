"""Exact pure-PyTorch reference of every kernel (the CPU path, and the ground truth of the GPU tests).

Integer accumulation is exact: float64 matmul on the CPU (int8 products summed below 2**53 for any
K < 5e11) and torch._int_mm on CUDA, never float32 (K * 127**2 exceeds 2**24 from K = 1041 on).
The epilogue follows the fused CUDA epilogue operation by operation:
    out = out_dtype( act_scale[m] * (w_scale[n] * float(acc - act_zero[m] * wsum[n])) + bias[n] )
in float32 (float64 when out_dtype is float64, the exact mode used by the tests).

Inputs arrive normalised by kernels.ops: x / xq as [M, K], per-row parameters as [1] or [M],
per-column parameters as [N].
"""
import torch


def activation_offset(zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer c subtracted from the b-bit code before it is stored as int8 (see kernels/README.md).

    c = clamp(z, 2**bits - 128, 128) keeps q - c inside [-128, 127] for every code q in [0, 2**bits - 1]:
    c = z (nothing left to correct) whenever z lies in that window, which is always the case for a
    <= 7-bit grid with 0 <= z <= 2**bits - 1; c = 128 for 8-bit grids.
    """
    return zero_point.clamp(2**bits - 128, 128)


def quantize_rows(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, bits: int):
    """x [M, K] -> (int8 q - c [M, K], int32 residual z - c shaped like zero_point).

    q = clamp(round(x / step) + z, 0, 2**bits - 1), computed in float32 like the CUDA kernel (IEEE division,
    round half to even), so both give identical integers.
    """
    offset = activation_offset(zero_point, bits)
    q = torch.round(x.float() / step.float()[:, None]) + zero_point.float()[:, None]
    q = q.clamp(0, 2**bits - 1) - offset.float()[:, None]
    return q.to(torch.int8), zero_point - offset


def int_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """Exact xq [M, K] @ wq[N, K].T of int8 matrices, as int64 (CPU) or int32 (CUDA)."""
    if xq.is_cuda:
        rows = xq.shape[0]
        if rows <= 16:  # cuBLASLt's int8 GEMM needs M > 16: pad with zero rows
            xq = torch.cat([xq, xq.new_zeros(17 - rows, xq.shape[1])])
        return torch._int_mm(xq, wq.t())[:rows]
    return (xq.double() @ wq.double().t()).to(torch.int64)


def dequantize(acc, act_scale, act_zero, w_scale, wsum, bias, out_dtype: torch.dtype) -> torch.Tensor:
    """The fused epilogue applied to an integer accumulator acc [M, N]."""
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    corrected = acc.to(torch.int64)
    if act_zero is not None:
        corrected = corrected - act_zero.to(torch.int64)[:, None] * wsum.to(torch.int64)[None, :]
    col_scaled = w_scale.to(compute)[None, :] * corrected.to(compute)
    out = act_scale.to(compute)[:, None] * col_scaled
    if bias is not None:
        out = out + bias.to(compute)[None, :]
    return out.to(out_dtype)


def int8_linear(xq, wq, act_scale, act_zero, w_scale, wsum, bias, out_dtype: torch.dtype) -> torch.Tensor:
    return dequantize(int_matmul(xq, wq), act_scale, act_zero, w_scale, wsum, bias, out_dtype)


PROLOGUES = ("none", "gelu_tanh", "layernorm")


def fused_prologue(x: torch.Tensor, prologue: str, eps: float, mod_mul, mod_add, channel_scale, channel_shift):
    """What the fused quantize kernel computes before quantizing x [M, K]: float32 (float64 stays float64)."""
    y = x.double() if x.dtype == torch.float64 else x.float()
    if prologue == "gelu_tanh":
        y = torch.nn.functional.gelu(y, approximate="tanh")
    elif prologue == "layernorm":
        samples = mod_mul.shape[0]
        y = torch.nn.functional.layer_norm(y, y.shape[-1:], eps=eps)
        y = y.reshape(samples, -1, y.shape[-1])
        y = (y * mod_mul.to(y.dtype)[:, None, :] + mod_add.to(y.dtype)[:, None, :]).reshape(-1, y.shape[-1])
    if channel_scale is not None:
        y = y / channel_scale.to(y.dtype)
    if channel_shift is not None:
        y = y - channel_shift.to(y.dtype)
    return y


def fused_quantize(x, step, zero_point, token_group, bits: int, prologue: str, eps: float, mod_mul, mod_add,
                   channel_scale, channel_shift):
    """x [M, K] -> (int8 q - c [M, K], row step, row residual): the prologue, then quantize_rows with the grid
    of each row's token group (row m is token m % T of its sequence). The row parameters are [M] with token
    groups, else [1]."""
    y = fused_prologue(x, prologue, eps, mod_mul, mod_add, channel_scale, channel_shift)
    if token_group is None:
        row_step, row_zero = step.reshape(1), zero_point.reshape(1)
    else:
        group = token_group.long().repeat(x.shape[0] // token_group.numel())
        row_step, row_zero = step[group], zero_point[group]
    xq, residual = quantize_rows(y, row_step, row_zero, bits)
    return xq, row_step.float(), residual
