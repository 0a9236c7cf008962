"""Public INT8 ops and their dispatch.

Backends, chosen per call from the tensors' device (or forced with backend=...):
  "cutlass_sm90": the extension's fused CUTLASS GEMM (sm_90a: H100/H200) and its quantize kernel;
  "cutlass_sm80": the extension's fused CUTLASS 2.x GEMM (mma.sync: A100, RTX 30/40, L4/L40; built when the arch
                  list names 8.0 / 8.6 / 8.9) and its quantize kernel;
  "int_mm":       torch._int_mm (cuBLASLt INT8) followed by the extension's fused dequantize kernel, or by the
                  reference epilogue in PyTorch ops when the extension has no code for the device (any CUDA GPU);
  "reference":    the exact pure-PyTorch path of kernels/reference.py (CPU, or forced on a GPU).
The int8 convention is described in kernels/README.md.
"""
import torch

from kernels import _extension, reference

BACKENDS = ("cutlass_sm90", "cutlass_sm80", "int_mm", "reference")
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
OUTPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_FUSED_K = 8192  # the fused quantize kernel keeps a row in one thread block


def active_backend(device: torch.device | str | None = None) -> str:
    """The backend the ops use for tensors on `device` (default: the current CUDA device, else the CPU)."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type != "cuda":
        return "reference"
    if _extension.runs_sm90_gemm(device):
        return "cutlass_sm90"
    return "cutlass_sm80" if _extension.runs_sm80_gemm(device) else "int_mm"


def extension_status() -> str:
    """One line on the compiled extension: loaded with which architectures, or why not."""
    error = _extension.load_error()
    return error or f"loaded, compiled for {', '.join(f'sm_{a // 10}' for a in _extension.compiled_archs())}"


def _resolve_backend(backend: str | None, device: torch.device) -> str:
    if backend is None:
        return active_backend(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cutlass_sm90" and not _extension.runs_sm90_gemm(device):
        raise RuntimeError(f"the cutlass_sm90 backend needs an sm_90 GPU and the built extension "
                           f"({extension_status()}); tensors are on {device}")
    if backend == "cutlass_sm80" and not _extension.runs_sm80_gemm(device):
        raise RuntimeError(f"the cutlass_sm80 backend needs an sm_80 or newer GPU and an extension built for it "
                           f"({extension_status()}); tensors are on {device}")
    if backend == "int_mm" and device.type != "cuda":
        raise RuntimeError("the int_mm backend needs CUDA tensors")
    return backend


def sm90_tile_config(m: int) -> str:
    """The sm_90a tile configuration (a name from kernels/csrc/gemm_sm90_table.cpp) used for a GEMM with M rows.

    From the configuration sweep of benchmarks/gemm.md (H200, 60 ARVG layer shapes): 64x128 ping-pong was the
    fastest or within 10% of it at M = 200, and 128x128 ping-pong with 2x1 clusters the fastest at M >= 3200
    on nearly every shape (the other configurations stay available to the benchmark).
    """
    return "64x128_pingpong" if m <= 256 else "128x128_pingpong_c2x1"


def sm90_config_index(m: int) -> int:
    """Index of sm90_tile_config(m) in the extension's configuration table (what the int8_linear op takes)."""
    return _extension.sm90_configs().index(sm90_tile_config(m))


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [2, 8] (grids wider than 8 bits do not fit int8), got {bits!r}")


def _check_k(k: int) -> None:
    if k % 16 != 0:
        raise ValueError(f"the input features K = {k} must be a multiple of 16 (16-byte int8 rows for TMA); "
                         f"pad the layer's input features with zeros")


def _check_n(n: int) -> None:
    if n % 8 != 0:
        raise ValueError(f"the output features N = {n} must be a multiple of 8 (16-byte output rows); "
                         f"pad the layer's output features")


def _row_param(value, rows_shape: torch.Size, dtype: torch.dtype, name: str, device: torch.device) -> torch.Tensor:
    """A per-row parameter as a dense [1] (one value for all rows) or [M] tensor of `dtype`.

    Accepts a Python number, a one-element tensor, a [M] tensor (M = x.shape[:-1].numel()), or a tensor
    broadcastable to the rows x.shape[:-1] (per-token STWQ parameters, for instance). Pass tensors when
    capturing CUDA graphs.
    """
    if not isinstance(value, torch.Tensor):
        value = torch.tensor([value], dtype=dtype, device=device)
    if dtype == torch.int32 and value.is_floating_point():
        raise TypeError(f"{name} must be an integer tensor; round it once when converting: "
                        f"{name}.round().to(torch.int32)")
    if dtype == torch.float32 and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the input is on {device}")
    value = value.to(dtype)
    if value.numel() == 1:
        return value.reshape(1)
    if value.dim() == 1 and value.numel() == rows_shape.numel():  # already one value per flattened row
        return value.contiguous()
    try:
        value = torch.broadcast_to(value, rows_shape)
    except RuntimeError:
        raise ValueError(f"{name} must be a scalar or broadcastable to the rows {tuple(rows_shape)} "
                         f"(the input's shape without its last dimension), got {tuple(value.shape)}") from None
    return value.reshape(-1).contiguous()


def _col_param(value: torch.Tensor, n: int, dtype: torch.dtype, name: str, device: torch.device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.shape != (n,):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a tensor of shape ({n},) (one value per output channel), got {shape}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the input is on {device}")
    if dtype == torch.int32 and value.is_floating_point():
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    return value.to(dtype).contiguous()


def quantize_rows(x: torch.Tensor, step, zero_point, bits: int = 8, *, backend: str | None = None):
    """Quantize x [..., K] (bf16/fp16/fp32) row-wise onto an asymmetric b-bit grid, stored as int8.

    q = clamp(round(x / step[m]) + zero_point[m], 0, 2**bits - 1) (round half to even), stored as q - c with
    c = clamp(zero_point, 2**bits - 128, 128). `step` (float) and `zero_point` (integer) are scalars or
    broadcastable to the rows x.shape[:-1].
    Returns (xq int8 [..., K], act_zero int32 [M] or [1]): act_zero = zero_point - c is what int8_linear must
    still subtract (zero for grids of up to 7 bits with an in-range zero point).
    """
    _check_bits(bits)
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    _check_k(x.shape[-1])
    rows_shape = x.shape[:-1]
    step = _row_param(step, rows_shape, torch.float32, "step", x.device)
    zero_point = _row_param(zero_point, rows_shape, torch.int32, "zero_point", x.device)
    backend = _resolve_backend(backend, x.device)
    if backend != "reference" and _extension.runs_elementwise(x.device):
        return _extension.ops().quantize_rows(x.contiguous(), step, zero_point, bits)
    xq, act_zero = reference.quantize_rows(x.reshape(-1, x.shape[-1]), step, zero_point, bits)
    return xq.reshape(x.shape), act_zero


def aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """t [rows, K] as the vectorised kernels read per-sample tables: unit column stride, 16-byte aligned rows
    (a view such as one of the adaLN vectors passes unchanged, anything else is copied)."""
    if t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0:
        return t
    return t.contiguous()


def _float_vector(value, k: int, name: str, device: torch.device):
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.shape != (k,):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a tensor of shape ({k},) (one value per input channel), got {shape}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the input is on {device}")
    return value.float().contiguous()


def _fused_quantize_inputs(x, step, zero_point, bits, token_group, prologue, modulation, channel_scale,
                           channel_shift, backend):
    """Validated, normalised arguments of the fused quantize kernels, and whether the extension runs them."""
    _check_bits(bits)
    exact_cpu = x.dtype == torch.float64 and (backend == "reference" or not x.is_cuda)  # the exactness tests
    if x.dtype not in ACTIVATION_DTYPES and not exact_cpu:
        raise TypeError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if prologue not in reference.PROLOGUES:
        raise ValueError(f"prologue must be one of {reference.PROLOGUES}, got {prologue!r}")
    k = x.shape[-1]
    _check_k(k)
    device = x.device
    step = step.reshape(-1).float().contiguous()
    if zero_point.is_floating_point():
        raise TypeError("zero_point must be an integer tensor; round it once when converting")
    zero_point = zero_point.reshape(-1).to(torch.int32).contiguous()
    if step.shape != zero_point.shape or step.device != device or zero_point.device != device:
        raise ValueError(f"step and zero_point must be tables of one shape on {device}, got {tuple(step.shape)} on "
                         f"{step.device} and {tuple(zero_point.shape)} on {zero_point.device}")
    rows = x.numel() // k if k else 0
    if token_group is not None:
        token_group = token_group.reshape(-1).to(device=device, dtype=torch.int32).contiguous()
        if token_group.numel() == 0 or rows % token_group.numel():
            raise ValueError(f"x holds {rows} rows, not whole sequences of the {token_group.numel()} tokens of "
                             f"token_group")
    elif step.numel() != 1:
        raise ValueError(f"step holds {step.numel()} groups: pass token_group to choose among them")
    mod_mul = mod_add = None
    if prologue == "layernorm":
        if modulation is None:
            raise ValueError("the layernorm prologue needs modulation=(mul, add), float [samples, K]")
        mod_mul, mod_add = (m.float() if m.stride(-1) == 1 else m.float().contiguous() for m in modulation)
        if mod_mul.dim() != 2 or mod_mul.shape != mod_add.shape or mod_mul.shape[1] != k:
            raise ValueError(f"modulation tensors must both be [samples, {k}], got {tuple(mod_mul.shape)} and "
                             f"{tuple(mod_add.shape)}")
        if mod_mul.shape[0] == 0 or rows % mod_mul.shape[0]:
            raise ValueError(f"x holds {rows} rows, which do not split into the {mod_mul.shape[0]} samples of the "
                             f"modulation")
    elif modulation is not None:
        raise ValueError("modulation is only used by the layernorm prologue")
    channel_scale = _float_vector(channel_scale, k, "channel_scale", device)
    channel_shift = _float_vector(channel_shift, k, "channel_shift", device)
    backend = _resolve_backend(backend, device)
    on_extension = backend != "reference" and _extension.runs_elementwise(device) and k <= MAX_FUSED_K
    if on_extension and mod_mul is not None:
        mod_mul, mod_add = aligned_rows(mod_mul), aligned_rows(mod_add)
        if mod_mul.stride() != mod_add.stride():  # the kernel takes one row stride for both
            mod_mul, mod_add = mod_mul.contiguous(), mod_add.contiguous()
    return on_extension, (step, zero_point, token_group, bits, prologue, mod_mul, mod_add, channel_scale, channel_shift)


def fused_quantize(x: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor, bits: int = 8, *,
                   token_group: torch.Tensor | None = None, prologue: str = "none", eps: float = 1e-6,
                   modulation: tuple[torch.Tensor, torch.Tensor] | None = None,
                   channel_scale: torch.Tensor | None = None, channel_shift: torch.Tensor | None = None,
                   backend: str | None = None):
    """Quantize x [..., K] together with the operation that produces it, in one pass over x.

        y = prologue(x);  y = y / channel_scale - channel_shift;  xq = quantize_rows(y, step[g], zero_point[g])

    prologue: "none"; "gelu_tanh" (the activation between two linear layers); "layernorm" (LayerNorm without
    affine over K, eps, then the per-sample adaLN modulation y * mul[s] + add[s] with modulation = (mul, add),
    float [S, K]; x holds S samples of M / S consecutive rows). channel_scale / channel_shift: an online
    per-channel transform [K] (GPS or SmoothQuant factors not folded elsewhere).
    step (float) / zero_point (integer): grid tables [G]. token_group: int [T], the group of each token of a
    sequence (rows cycle through the T tokens); without it G must be 1.
    Returns (xq int8 [..., K], act_scale float32, act_zero int32) ready for int8_linear: per row [M] with token
    groups, else [1].
    """
    on_extension, args = _fused_quantize_inputs(x, step, zero_point, bits, token_group, prologue, modulation,
                                                channel_scale, channel_shift, backend)
    step, zero_point, token_group, bits, prologue, mod_mul, mod_add, channel_scale, channel_shift = args
    if on_extension:
        return _extension.ops().fused_quantize(
            x.contiguous(), step, zero_point, token_group, bits, reference.PROLOGUES.index(prologue), eps, mod_mul,
            mod_add, channel_scale, channel_shift)
    k = x.shape[-1]
    xq, act_scale, act_zero = reference.fused_quantize(
        x.reshape(-1, k), step, zero_point, token_group, bits, prologue, eps, mod_mul, mod_add, channel_scale,
        channel_shift)
    return xq.reshape(x.shape), act_scale, act_zero


def fused_residual_quantize(x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor, step: torch.Tensor,
                            zero_point: torch.Tensor, bits: int = 8, *, modulation: tuple[torch.Tensor, torch.Tensor],
                            eps: float = 1e-6, token_group: torch.Tensor | None = None,
                            channel_scale: torch.Tensor | None = None, channel_shift: torch.Tensor | None = None,
                            backend: str | None = None):
    """A residual update followed by fused_quantize's layernorm prologue, in one pass:

        x_sum = x + branch * gamma[s]      (the product rounded to branch's dtype, the sum to x's: `x + b.mul(g)`)
        xq, act_scale, act_zero = fused_quantize(x_sum, ..., prologue="layernorm", modulation=modulation)

    x [S, L, K] or [M, K] (rows in samples as for the modulation); branch: x's shape, in x's dtype (or any 16-bit
    dtype when x is float32); gamma [S, K] (or [S, 1, K]) in branch's dtype. Returns (x_sum, xq, act_scale,
    act_zero): x_sum is the residual stream after the update, which a transformer block carries on with.
    """
    if branch.shape != x.shape:
        raise ValueError(f"branch must have x's shape {tuple(x.shape)}, got {tuple(branch.shape)}")
    if branch.dtype != x.dtype and x.dtype != torch.float32:
        raise TypeError(f"branch must have x's dtype {x.dtype}, or x must be float32; got {branch.dtype}")
    k = x.shape[-1]
    gamma = gamma.reshape(-1, k)
    if gamma.dtype != branch.dtype or gamma.device != x.device or branch.device != x.device:
        raise ValueError(f"gamma must be of branch's dtype {branch.dtype} and on {x.device}, got {gamma.dtype} on "
                         f"{gamma.device} (branch on {branch.device})")
    on_extension, args = _fused_quantize_inputs(x, step, zero_point, bits, token_group, "layernorm", modulation,
                                                channel_scale, channel_shift, backend)
    step, zero_point, token_group, bits, _, mod_mul, mod_add, channel_scale, channel_shift = args
    if gamma.shape[0] != mod_mul.shape[0]:
        raise ValueError(f"gamma holds {gamma.shape[0]} samples, the modulation {mod_mul.shape[0]}")
    if on_extension:
        return _extension.ops().fused_residual_quantize(
            x.contiguous(), branch.contiguous(), aligned_rows(gamma), step, zero_point, token_group, bits, eps,
            mod_mul, mod_add, channel_scale, channel_shift)
    x_sum = reference.residual_sum(x.reshape(-1, k), branch.reshape(-1, k), gamma)
    xq, act_scale, act_zero = reference.fused_quantize(
        x_sum, step, zero_point, token_group, bits, "layernorm", eps, mod_mul, mod_add, channel_scale, channel_shift)
    return x_sum.reshape(x.shape), xq.reshape(x.shape), act_scale, act_zero


def split_qkv(qkv: torch.Tensor, heads: int, k_out: torch.Tensor, v_out: torch.Tensor, *,
              bias: torch.Tensor | None = None, l2_norm: bool = False, q_scale: torch.Tensor | None = None,
              eps: float = 1e-12, kv_grid: torch.Tensor | None = None, kv_bits: int = 8,
              backend: str | None = None) -> torch.Tensor:
    """The attention inputs of a fused qkv projection, in one pass over qkv [S, L, 3 C] (C = heads * c):

        q, k, v = (qkv + bias).view(S, L, 3, heads, c) split into heads
        with l2_norm: q = F.normalize(q, dim=-1) * q_scale[h];  k = F.normalize(k, dim=-1)   (float32, eps)

    each value rounded once to qkv's dtype, as PyTorch computes them under autocast. k and v are written into
    k_out / v_out [S, heads, L, c] (views with unit stride over c, e.g. the next slots of a KV cache): in qkv's
    dtype, or, when they are int8, as the codes of the per-tensor grids kv_grid = [k_step, k_zero, v_step,
    v_zero] (float32, integer zero points) of kv_bits bits stored as q - c (kernels.kv_cache.Int8Codec).
    Returns q as an [S, heads, L, c] view of a dense [S, L, heads, c] tensor: the layout in which
    F.scaled_dot_product_attention's output needs no copy to become [S, L, C] again.
    """
    if qkv.dim() != 3 or heads <= 0 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f"qkv must be [samples, tokens, 3 * heads * head_dim], got {tuple(qkv.shape)} for {heads} "
                         f"heads")
    if qkv.dtype not in ACTIVATION_DTYPES and not (qkv.dtype == torch.float64 and not qkv.is_cuda):
        raise TypeError(f"qkv must be bfloat16, float16 or float32, got {qkv.dtype}")
    S, L, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    c = width // heads
    expected = (S, heads, L, c)
    codes = k_out.dtype == torch.int8
    for name, out in (("k_out", k_out), ("v_out", v_out)):
        if tuple(out.shape) != expected or out.device != qkv.device:
            raise ValueError(f"{name} must be {expected} on {qkv.device}, got {tuple(out.shape)} on {out.device}")
        if out.dtype != (torch.int8 if codes else qkv.dtype):
            raise TypeError(f"k_out and v_out must both be int8 (codes) or {qkv.dtype}, got {k_out.dtype} and "
                            f"{v_out.dtype}")
    if codes:
        _check_bits(kv_bits)
        if kv_grid is None or kv_grid.numel() != 4:
            raise ValueError("int8 k_out / v_out need kv_grid = [k_step, k_zero, v_step, v_zero]")
    bias = None if bias is None else _float_vector(bias, 3 * width, "bias", qkv.device)
    q_scale = None if q_scale is None or not l2_norm else _float_vector(q_scale.reshape(-1), heads, "q_scale",
                                                                        qkv.device)
    backend = _resolve_backend(backend, qkv.device)
    if (backend != "reference" and _extension.runs_elementwise(qkv.device) and c in (8, 16, 32, 64, 128, 256)
            and k_out.stride() == v_out.stride() and k_out.stride(-1) == 1
            and all(s % 8 == 0 for s in k_out.stride()[:3])
            and k_out.data_ptr() % 16 == 0 and v_out.data_ptr() % 16 == 0):
        grid = None if kv_grid is None else kv_grid.reshape(-1).float().contiguous()
        q = _extension.ops().split_qkv(qkv, heads, bias, q_scale, l2_norm, eps, k_out, v_out, grid, kv_bits)
    else:
        q = reference.split_qkv(qkv, heads, bias, q_scale, l2_norm, eps, k_out, v_out, kv_grid, kv_bits)
    return q.transpose(1, 2)


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float = 1e-6, *,
                    silu: bool = True, out_dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """F.silu(F.group_norm(x, groups, weight, bias, eps)) of x [N, C, ...] computed in float32 and rounded once to
    out_dtype (default x.dtype): one kernel reading x twice instead of PyTorch's float32 passes under autocast.
    silu=False leaves the GroupNorm alone. On the GPU the statistics are summed in another order than PyTorch's:
    results agree to float32 rounding before the final cast."""
    out_dtype = out_dtype or x.dtype
    if x.dim() < 2 or groups <= 0 or x.shape[1] % groups:
        raise ValueError(f"x must be [N, C, ...] with C divisible by groups={groups}, got {tuple(x.shape)}")
    channels = x.shape[1]
    weight = _float_vector(weight, channels, "weight", x.device)
    bias = _float_vector(bias, channels, "bias", x.device)
    pixels = x[0, 0].numel() if x.numel() else 0
    backend = _resolve_backend(backend, x.device)
    if (backend != "reference" and _extension.runs_elementwise(x.device) and x.dtype in ACTIVATION_DTYPES
            and out_dtype in OUTPUT_DTYPES and pixels % 8 == 0):
        return _extension.ops().group_norm_silu(x.contiguous(), weight, bias, groups, eps, silu, out_dtype)
    return reference.group_norm_silu(x, weight, bias, groups, eps, silu, out_dtype)


def int8_linear(xq: torch.Tensor, wq: torch.Tensor, act_scale, act_zero, w_scale: torch.Tensor,
                wsum: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                *, backend: str | None = None) -> torch.Tensor:
    """out[..., n] = out_dtype( act_scale[m] * w_scale[n] * (xq @ wq.T - act_zero[m] * wsum[n]) + bias[n] ).

    xq int8 [..., K]; wq int8 [N, K] (symmetric per output channel, see kernels.weights); act_scale (float) and
    act_zero (integer, or None) scalars or broadcastable to the rows xq.shape[:-1]; w_scale (float), wsum (int32)
    and bias (float, or None) of shape [N]. K % 16 == 0 and N % 8 == 0.
    """
    if xq.dtype != torch.int8 or wq.dtype != torch.int8:
        raise TypeError(f"xq and wq must be int8, got {xq.dtype} and {wq.dtype}")
    if wq.dim() != 2 or xq.shape[-1] != wq.shape[1]:
        raise ValueError(f"wq must be [N, K] with K = xq.shape[-1]; got xq {tuple(xq.shape)}, wq {tuple(wq.shape)}")
    allowed = OUTPUT_DTYPES + ((torch.float64,) if backend == "reference" or not xq.is_cuda else ())
    if out_dtype not in allowed:
        raise TypeError(f"out_dtype must be one of {allowed}, got {out_dtype}")
    n, k = wq.shape
    _check_k(k)
    _check_n(n)
    device = xq.device
    if wq.device != device:
        raise ValueError(f"wq is on {wq.device} but xq is on {device}")
    rows_shape = xq.shape[:-1]
    act_scale = _row_param(act_scale, rows_shape, torch.float32, "act_scale", device)
    act_zero = None if act_zero is None else _row_param(act_zero, rows_shape, torch.int32, "act_zero", device)
    w_scale = _col_param(w_scale, n, torch.float32, "w_scale", device)
    wsum = _col_param(wsum, n, torch.int32, "wsum", device)
    bias = None if bias is None else _col_param(bias, n, torch.float32, "bias", device)
    x2 = xq.reshape(-1, k)
    backend = _resolve_backend(backend, device)

    if backend == "cutlass_sm90" and out_dtype in (torch.bfloat16, torch.float16):
        config = sm90_config_index(x2.shape[0])
        out = _extension.ops().int8_linear(x2.contiguous(), wq.contiguous(), act_scale, act_zero, w_scale, wsum,
                                           bias, out_dtype, config)
    elif backend == "cutlass_sm80" and out_dtype in (torch.bfloat16, torch.float16):
        out = _extension.ops().int8_linear_sm80(x2.contiguous(), wq.contiguous(), act_scale, act_zero, w_scale, wsum,
                                                bias, out_dtype, -1)
    elif backend != "reference" and x2.shape[0] > 0:
        acc = reference.int_matmul(x2.contiguous(), wq)
        if _extension.runs_elementwise(device):
            out = _extension.ops().dequantize_int32(acc, act_scale, act_zero, w_scale, wsum, bias, out_dtype)
        else:
            out = reference.dequantize(acc, act_scale, act_zero, w_scale, wsum, bias, out_dtype)
    else:
        out = reference.int8_linear(x2, wq, act_scale, act_zero, w_scale, wsum, bias, out_dtype)
    return out.reshape(*rows_shape, n)


def quantized_linear(x: torch.Tensor, step, zero_point, bits: int, wq: torch.Tensor, w_scale: torch.Tensor,
                     wsum: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                     *, backend: str | None = None) -> torch.Tensor:
    """quantize_rows + int8_linear: the full W8A8 / W6A6 linear layer on a float input x [..., K].

    Equals F.linear(step * (q - zero_point), w_scale[:, None] * wq, bias) computed exactly in integers,
    rounded once to out_dtype (default: x.dtype).
    """
    step = _row_param(step, x.shape[:-1], torch.float32, "step", x.device)
    xq, act_zero = quantize_rows(x, step, zero_point, bits, backend=backend)
    return int8_linear(xq, wq, step, act_zero, w_scale, wsum, bias, out_dtype or x.dtype, backend=backend)

