"""Loads the compiled extension kernels/_C*.so (built by kernels/setup.py) if present, registers the meta
("fake") implementations of its ops for torch.compile, and answers which of its kernels run on a device.

Facts are cached in a plain dict rather than functools.lru_cache so that torch.compile traces through them.
"""
from pathlib import Path

import torch

NAMESPACE = "ptq4arvg_kernels"
_cache: dict = {}


def _load() -> str | None:
    if torch.version.cuda is None:
        return "this PyTorch build has no CUDA"
    libraries = sorted(Path(__file__).parent.glob("_C*.so"))
    if not libraries:
        return "kernels/_C*.so not built (python kernels/setup.py build_ext --inplace)"
    try:
        torch.ops.load_library(str(libraries[0]))
    except (OSError, RuntimeError) as error:
        return f"could not load {libraries[0].name}: {error}"
    _register_fakes()
    _cache["archs"] = tuple(ops().compiled_archs())
    _cache["configs"] = tuple(ops().sm90_configs())
    return None


def load_error() -> str | None:
    """None once the extension is loaded, else why it is not available."""
    if "error" not in _cache:
        _cache["error"] = _load()
    return _cache["error"]


def loaded() -> bool:
    return load_error() is None


def ops():
    return getattr(torch.ops, NAMESPACE)


def _register_fakes() -> None:
    @torch.library.register_fake(f"{NAMESPACE}::quantize_rows")
    def _(x, step, zero_point, bits):
        return x.new_empty(x.shape, dtype=torch.int8), zero_point.new_empty(zero_point.shape)

    @torch.library.register_fake(f"{NAMESPACE}::fused_quantize")
    def _(x, step, zero_point, token_group, bits, prologue, eps, mod_mul, mod_add, channel_scale, channel_shift):
        rows = x.numel() // x.shape[-1] if token_group is not None else 1
        return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((rows,), dtype=torch.float32),
                x.new_empty((rows,), dtype=torch.int32))

    @torch.library.register_fake(f"{NAMESPACE}::fused_residual_quantize")
    def _(x, branch, gamma, step, zero_point, token_group, bits, eps, mod_mul, mod_add, channel_scale, channel_shift):
        rows = x.numel() // x.shape[-1] if token_group is not None else 1
        return (torch.empty_like(x), x.new_empty(x.shape, dtype=torch.int8), x.new_empty((rows,), dtype=torch.float32),
                x.new_empty((rows,), dtype=torch.int32))

    @torch.library.register_fake(f"{NAMESPACE}::split_qkv")
    def _(qkv, heads, bias, q_mul, l2_norm, eps, k_out, v_out, kv_grid, kv_bits):
        samples, tokens, width3 = qkv.shape
        return qkv.new_empty((samples, tokens, heads, width3 // 3 // heads))

    @torch.library.register_fake(f"{NAMESPACE}::group_norm_silu")
    def _(x, weight, bias, groups, eps, silu, out_dtype):
        return x.new_empty(x.shape, dtype=out_dtype)

    @torch.library.register_fake(f"{NAMESPACE}::int8_linear")
    def _(xq, wq, act_scale, act_zero, w_scale, wsum, bias, out_dtype, config):
        return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)

    @torch.library.register_fake(f"{NAMESPACE}::dequantize_codes")
    def _(codes, params, out_dtype):
        return codes.new_empty(codes.shape, dtype=out_dtype)

    @torch.library.register_fake(f"{NAMESPACE}::int8_linear_sm80")
    def _(xq, wq, act_scale, act_zero, w_scale, wsum, bias, out_dtype, tile):
        return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)

    @torch.library.register_fake(f"{NAMESPACE}::dequantize_int32")
    def _(acc, act_scale, act_zero, w_scale, wsum, bias, out_dtype):
        return acc.new_empty(acc.shape, dtype=out_dtype)


def compiled_archs() -> tuple[int, ...]:
    """Architectures of the extension's machine code, as nvcc numbers them (e.g. (900,) for sm_90a)."""
    return _cache["archs"] if loaded() else ()


def sm90_configs() -> tuple[str, ...]:
    """Names of the sm_90a GEMM tile configurations, in the order the int8_linear op indexes them."""
    return _cache["configs"] if loaded() else ()


def _capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = ("capability", index)
    if key not in _cache:
        _cache[key] = torch.cuda.get_device_capability(index)
    return _cache[key]


def runs_elementwise(device: torch.device) -> bool:
    """Whether the quantize / dequantize kernels have machine code for this device (same major, lower minor)."""
    if device.type != "cuda" or not loaded():
        return False
    major, minor = _capability(device)
    return any(arch // 100 == major and (arch % 100) // 10 <= minor for arch in compiled_archs())


def runs_sm90_gemm(device: torch.device) -> bool:
    """Whether the CUTLASS sm_90a GEMMs run on this device (an H100/H200 and a build that includes 9.0a)."""
    if device.type != "cuda" or not loaded():
        return False
    return _capability(device) == (9, 0) and 900 in compiled_archs()


def runs_sm80_gemm(device: torch.device) -> bool:
    """Whether the CUTLASS 2.x GEMM (mma.sync) runs on this device: sm_80 or newer, with machine code for it."""
    return runs_elementwise(device) and _capability(device)[0] >= 8
