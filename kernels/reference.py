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


def encode_codes(x: torch.Tensor, step, zero_point, bits: int) -> torch.Tensor:
    """x on one per-tensor b-bit grid (float step, integer-valued zero point), stored as int8 q - c."""
    zero = zero_point if isinstance(zero_point, torch.Tensor) else torch.tensor(float(zero_point))
    q = torch.clamp(torch.round(x.float() / step) + zero, 0, 2**bits - 1)
    return (q - activation_offset(zero, bits)).to(torch.int8)


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


def residual_sum(x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """x + branch * gamma[s] on [M, K] rows grouped into the S samples of gamma [S, K], in the model's dtypes."""
    samples, k = gamma.shape
    return (x.reshape(samples, -1, k) + branch.reshape(samples, -1, k) * gamma[:, None, :]).reshape(-1, k)


def split_qkv(qkv, heads: int, bias, q_scale, l2_norm: bool, eps: float, k_out, v_out, kv_grid, kv_bits: int):
    """kernels.ops.split_qkv in PyTorch ops: writes k_out / v_out, returns q as a dense [S, L, heads, c]."""
    samples, tokens, width3 = qkv.shape
    dtype = qkv.dtype
    if bias is not None:
        qkv = qkv + bias.to(dtype)
    q, k, v = qkv.view(samples, tokens, 3, heads, width3 // 3 // heads).unbind(2)
    if l2_norm:
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        q = torch.nn.functional.normalize(q.to(compute), dim=-1, eps=eps)
        if q_scale is not None:
            q = q * q_scale.to(compute).reshape(heads, 1)
        k = torch.nn.functional.normalize(k.to(compute), dim=-1, eps=eps)
        q, k = q.to(dtype), k.to(dtype)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    if k_out.dtype == torch.int8:
        grid = kv_grid.reshape(-1).float().to(qkv.device)
        k, v = encode_codes(k, grid[0], grid[1], kv_bits), encode_codes(v, grid[2], grid[3], kv_bits)
    k_out.copy_(k)
    v_out.copy_(v)
    return q.contiguous()


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


def group_norm_silu(x: torch.Tensor, weight, bias, groups: int, eps: float, silu: bool, out_dtype: torch.dtype):
    """GroupNorm (affine) then SiLU in float32 (float64 stays float64), rounded once to out_dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.nn.functional.group_norm(x.to(compute), groups, weight.to(compute), bias.to(compute), eps)
    return (torch.nn.functional.silu(y) if silu else y).to(out_dtype)
