"""GPU tests of the kernels package: the compiled extension against the exact reference path.

Skipped without CUDA. With CUDA but without the built extension (kernels/setup.py) the extension tests skip,
unless PTQ4ARVG_REQUIRE_EXTENSION=1 (set where the extension was just built), which turns the skip into a failure.
"""
import os

import pytest
import torch

import kernels
from kernels import _extension, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16_HALF_ULP = 2.0**-8  # relative rounding error of one bf16 rounding
FP16_HALF_ULP = 2.0**-11


@pytest.fixture(scope="module")
def extension():
    if not _extension.loaded():
        message = f"extension not available: {_extension.load_error()}"
        if os.environ.get("PTQ4ARVG_REQUIRE_EXTENSION") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return _extension.ops()


@pytest.fixture(scope="module")
def sm90(extension):
    if not _extension.runs_sm90_gemm(torch.device("cuda")):
        pytest.skip("the CUTLASS GEMMs need an sm_90 GPU")
    return extension


def make_layer(M, K, N, bits=8, per_row=False, bias=True, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(M, K, device="cuda", generator=g) * 2 + 0.5).to(dtype)
    w = torch.randn(N, K, device="cuda", generator=g)
    weight = kernels.quantize_weight_symmetric(w)
    lo = x.float().amin(-1) if per_row else x.float().min().reshape(1)
    hi = x.float().amax(-1) if per_row else x.float().max().reshape(1)
    step = (hi - lo) / (2**bits - 1)
    zero = torch.round(-lo / step).to(torch.int32)
    b = torch.randn(N, device="cuda", generator=g) if bias else None
    return x, step, zero, weight, b


def assert_within_rounding(out, exact, half_ulp):
    """Every element within one rounding of the exact float32 result (plus fp32 slack near zero)."""
    assert out.shape == exact.shape
    assert torch.isfinite(out).all()
    err = (out.float() - exact).abs()
    bound = half_ulp * exact.abs() + 1e-5 * exact.abs().max()
    worst = (err - bound).max().item()
    assert worst <= 0, f"max excess over the rounding bound: {worst:.3g} (max err {err.max().item():.3g})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("per_row", [False, True])
def test_quantize_kernel_is_bit_exact(extension, dtype, bits, per_row):
    x, step, zero, _, _ = make_layer(333, 1536, 8, bits, per_row, dtype=dtype)
    xq, act_zero = kernels.quantize_rows(x, step, zero, bits)
    xq_ref, act_zero_ref = kernels.quantize_rows(x, step, zero, bits, backend="reference")
    assert torch.equal(xq, xq_ref)
    assert torch.equal(act_zero, act_zero_ref)


def hard_rows(dtype, bits, K=1024, seed=0):
    """Rows that probe the quantizer's arithmetic: exact and near ties of x / step, values far beyond the grid,
    zeros, infinities, huge and subnormal inputs, each row with its own step and zero point, including steps and
    zero points outside the range of the kernel's fast path (which then takes the literal formula)."""
    steps = [2.0**-6, 0.0123, 1 / 255, 3.7, 2.0**-30, 2.0**30, 2.0**-29.5, 2.0**29.5, 2.0**-31, 2.0**31, 1e-20, 1e12,
             0.1, 7e-4, 2.0**-12, 0.33]
    zeros = [0, 2**bits - 1, 2 ** (bits - 1), 37 % 2**bits, -7, 300, 2**20, 2**20 + 1, -(2**20) - 1, 5000]
    M = len(steps) * 4
    g = torch.Generator().manual_seed(seed)
    step = torch.tensor(steps * 4, dtype=torch.float32)
    zero = torch.tensor([zeros[i % len(zeros)] for i in range(M)], dtype=torch.int32)
    n = torch.arange(-(K // 8), K // 8, dtype=torch.float32)  # K // 4 integers around 0
    ties = (n + 0.5)[None, :] * step[:, None]
    near = ties * (1 + torch.randn(M, K // 4, generator=g) * 2.0**-9)
    spread = torch.randn(M, K // 4, generator=g) * 200 * step[:, None]
    finfo = torch.finfo(dtype)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), finfo.max, -finfo.max, finfo.tiny,
                             -finfo.tiny, finfo.tiny * finfo.eps, 2.0**64, -(2.0**65), 1e-30, -1e-38])
    wild = torch.sign(torch.randn(M, K // 4, generator=g)) * 2.0 ** (torch.rand(M, K // 4, generator=g) * 260 - 140)
    wild[:, : len(specials)] = specials
    x = torch.cat([ties, near, spread, wild], dim=1).to(dtype)  # casting may move ties: then they are near ties
    return x, step, zero


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [8, 6, 4, 2])
def test_quantize_kernel_is_bit_exact_on_hard_values(extension, dtype, bits):
    x, step, zero = hard_rows(dtype, bits, seed=bits)
    assert not torch.isnan(x).any()  # a NaN has no defined int8 code in the reference
    xq, act_zero = kernels.quantize_rows(x.cuda(), step.cuda(), zero.cuda(), bits)
    xq_ref, act_zero_ref = reference.quantize_rows(x, step, zero, bits)  # on the CPU: IEEE division there too
    mismatches = (xq.cpu() != xq_ref).nonzero()
    assert len(mismatches) == 0, f"{len(mismatches)} codes differ, first at (row, col) {mismatches[0].tolist()}"
    assert torch.equal(act_zero.cpu(), act_zero_ref)


@pytest.mark.parametrize("dtype,K", [(torch.bfloat16, 1024), (torch.bfloat16, 1040), (torch.bfloat16, 1032),
                                     (torch.float16, 1040), (torch.float32, 1040), (torch.float32, 1032)])
@pytest.mark.parametrize("per_row", [False, True])
def test_quantize_kernel_chunk_widths_and_grid_stride(extension, dtype, K, per_row):
    # K % 32, % 16 and % 8 select 32-, 16- and 8-element chunks; 20000 rows make every thread of the one resident
    # wave loop several times, with a grid stride that is no multiple of the row length
    M = 20000
    g = torch.Generator(device="cuda").manual_seed(K)
    x = (torch.randn(M, K, device="cuda", generator=g) * 3 + 0.5).to(dtype)
    step = torch.rand(M if per_row else 1, device="cuda", generator=g) * 0.05 + 0.01
    zero = torch.randint(0, 256, (M if per_row else 1,), device="cuda", generator=g, dtype=torch.int32)
    xq, act_zero = extension.quantize_rows(x, step, zero, 8)  # the raw op: K % 16 is not required there
    xq_ref, act_zero_ref = reference.quantize_rows(x, step.expand(M), zero.expand(M), 8)
    assert torch.equal(xq, xq_ref)
    assert torch.equal(act_zero, act_zero_ref[: act_zero.numel()])


def test_chained_layers_wait_for_their_input(sm90):
    """Each quantize kernel reads the output of the GEMM before it. Both are launched with programmatic dependent
    launch, so the quantize kernel may start while that GEMM still runs and must wait for it: a chain of layers,
    eager and captured in a CUDA graph, equals the same chain with the device synchronised between layers."""
    M, C = 4096, 1024
    g = torch.Generator(device="cuda").manual_seed(5)
    x = (torch.randn(M, C, device="cuda", generator=g) * 2 + 0.5).to(torch.bfloat16)
    step = (x.float().max() - x.float().min()).reshape(1) / 255
    zero = torch.tensor([128], dtype=torch.int32, device="cuda")
    layers = [(kernels.quantize_weight_symmetric(torch.randn(C, C, device="cuda", generator=g) / C**0.5),
               torch.randn(C, device="cuda", generator=g)) for _ in range(4)]

    def chain(y, synchronize=False):
        for weight, bias in layers:
            y = kernels.quantized_linear(y, step, zero, 8, weight.wq, weight.w_scale, weight.wsum, bias)
            if synchronize:
                torch.cuda.synchronize()
        return y

    x2 = x.flip(0).contiguous()
    expected, expected2 = chain(x, synchronize=True), chain(x2, synchronize=True)
    assert expected.float().std() > 0.1  # the chain carries information to its end
    assert torch.equal(chain(x), expected)
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = chain(static_x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, expected)
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, expected2)


SHAPES = [(1, 768, 2304), (17, 1024, 4096), (200, 768, 2304), (200, 4096, 1024), (333, 1920, 200),
          (3200, 1280, 3840), (5000, 6144, 1536), (12800, 1024, 1024)]


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_cutlass_gemm_matches_reference(sm90, M, K, N):
    x, step, zero, weight, bias = make_layer(M, K, N, bits=8, seed=M + N)
    xq, act_zero = kernels.quantize_rows(x, step, zero, 8)
    exact = kernels.int8_linear(xq, weight.wq, step, act_zero, weight.w_scale, weight.wsum, bias, torch.float32,
                                backend="int_mm")
    for out_dtype, half_ulp in ((torch.bfloat16, BF16_HALF_ULP), (torch.float16, FP16_HALF_ULP)):
        out = kernels.int8_linear(xq, weight.wq, step, act_zero, weight.w_scale, weight.wsum, bias, out_dtype)
        assert out.dtype == out_dtype
        assert_within_rounding(out, exact, half_ulp)


@pytest.mark.parametrize("config", range(7))
def test_every_tile_config_matches_reference(sm90, config):
    names = sm90.sm90_configs()
    assert len(names) == 7
    for M, K, N in [(77, 1024, 3072), (1000, 3072, 768), (4099, 1536, 1544)]:
        x, step, zero, weight, bias = make_layer(M, K, N, bits=8, per_row=True, seed=config)
        xq, act_zero = kernels.quantize_rows(x, step, zero, 8)
        exact = reference.int8_linear(xq, weight.wq, step, act_zero, weight.w_scale, weight.wsum, bias,
                                      torch.float32)
        out = sm90.int8_linear(xq, weight.wq, step, act_zero, weight.w_scale, weight.wsum, bias, torch.bfloat16,
                               config)
        assert_within_rounding(out, exact, BF16_HALF_ULP)


@pytest.mark.parametrize("bits,per_row,bias", [(8, False, True), (8, True, False), (6, True, True), (4, False, False)])
def test_quantized_linear_matches_fake_quant(sm90, bits, per_row, bias):
    M, K, N = 1200, 1280, 3840
    x, step, zero, weight, b = make_layer(M, K, N, bits, per_row, bias)
    out = kernels.quantized_linear(x, step, zero, bits, weight.wq, weight.w_scale, weight.wsum, b)
    assert out.dtype == torch.bfloat16
    exact = kernels.quantized_linear(x, step, zero, bits, weight.wq, weight.w_scale, weight.wsum, b,
                                     out_dtype=torch.float32, backend="reference")
    assert_within_rounding(out, exact, BF16_HALF_ULP)
    q = (torch.round(x.float() / step[:, None]) + zero[:, None]).clamp(0, 2**bits - 1)
    fake = (step[:, None] * (q - zero[:, None])).double() @ (weight.w_scale[:, None] * weight.wq).double().t()
    fake = fake + (b.double() if b is not None else 0)
    assert (torch.linalg.norm(out.double() - fake) / torch.linalg.norm(fake)).item() < 4e-3


def test_int_mm_backend_matches_reference(extension):
    x, step, zero, weight, bias = make_layer(300, 2048, 1024, per_row=True)
    xq, act_zero = kernels.quantize_rows(x, step, zero, 8)
    exact = reference.int8_linear(xq, weight.wq, step, act_zero, weight.w_scale, weight.wsum, bias, torch.float32)
    for out_dtype, half_ulp in ((torch.bfloat16, BF16_HALF_ULP), (torch.float16, FP16_HALF_ULP),
                                (torch.float32, 1e-6)):
        out = kernels.int8_linear(xq, weight.wq, step, act_zero, weight.w_scale, weight.wsum, bias, out_dtype,
                                  backend="int_mm")
        assert_within_rounding(out, exact, half_ulp)


def test_leading_dims_views_and_small_m(sm90):
    x, step, zero, weight, bias = make_layer(2 * 3 * 8, 512, 256)
    x3 = x.reshape(2, 3, 8, 512)
    out = kernels.quantized_linear(x3, step, zero, 8, weight.wq, weight.w_scale, weight.wsum, bias)
    assert out.shape == (2, 3, 8, 256)
    flat = kernels.quantized_linear(x, step, zero, 8, weight.wq, weight.w_scale, weight.wsum, bias)
    assert torch.equal(out.reshape(-1, 256), flat)
    # an offset view (not 16-byte aligned) is copied, not misread
    wide = torch.zeros(48, 520, dtype=x.dtype, device="cuda")
    wide[:, 8:] = x
    view_out = kernels.quantized_linear(wide[:, 8:], step, zero, 8, weight.wq, weight.w_scale, weight.wsum, bias)
    assert torch.equal(view_out, flat)


def test_cuda_graph_capture(sm90):
    x, step, zero, weight, bias = make_layer(640, 1024, 3072)
    args = (step, zero, 8, weight.wq, weight.w_scale, weight.wsum, bias)
    expected = kernels.quantized_linear(x, *args)
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.quantized_linear(static_x, *args)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = kernels.quantized_linear(static_x, *args)
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, expected)
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, kernels.quantized_linear(x2, *args))


def test_ops_pass_opcheck(sm90):
    x, step, zero, weight, bias = make_layer(96, 512, 256, per_row=True)
    torch.library.opcheck(sm90.quantize_rows, (x, step, zero, 8))
    xq, act_zero = sm90.quantize_rows(x, step, zero, 8)
    torch.library.opcheck(sm90.int8_linear, (xq, weight.wq, step, act_zero, weight.w_scale, weight.wsum, bias,
                                             torch.bfloat16, 0))
    acc = torch._int_mm(xq, weight.wq.t())
    torch.library.opcheck(sm90.dequantize_int32, (acc, step, act_zero, weight.w_scale, weight.wsum, None,
                                                  torch.float16))


def test_torch_compile(sm90):
    x, step, zero, weight, bias = make_layer(256, 1024, 1024)
    args = (step, zero, 8, weight.wq, weight.w_scale, weight.wsum, bias)
    expected = kernels.quantized_linear(x, *args)

    def raw_layer(x, step, zero, wq, w_scale, wsum, bias):  # the ops alone trace into one graph
        xq, act_zero = sm90.quantize_rows(x, step, zero, 8)
        return sm90.int8_linear(xq, wq, step, act_zero, w_scale, wsum, bias, torch.bfloat16, 2)

    raw = torch.compile(raw_layer, fullgraph=True)(x, step, zero, weight.wq, weight.w_scale, weight.wsum, bias)
    assert_within_rounding(raw, expected.float(), BF16_HALF_ULP)
    assert torch.equal(torch.compile(kernels.quantized_linear)(x, *args), expected)


def test_backend_reporting(extension):
    archs = extension.compiled_archs()
    assert len(archs) >= 1 and all(a >= 500 for a in archs)
    capability = torch.cuda.get_device_capability()
    expected = ("cutlass_sm90" if capability == (9, 0) and 900 in archs
                else "cutlass_sm80" if _extension.runs_sm80_gemm(torch.device("cuda")) else "int_mm")
    assert kernels.active_backend() == expected
    assert kernels.active_backend("cpu") == "reference"


def fused_inputs(prologue, dtype, k, samples=4, tokens=13, groups=3, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(samples, tokens, k, device="cuda", generator=g) * 2 + 0.3).to(dtype)
    step = torch.rand(groups, device="cuda", generator=g) * 0.02 + 0.01
    zero = torch.randint(0, 100, (groups,), device="cuda", generator=g, dtype=torch.int32)
    token_group = torch.randint(0, groups, (tokens,), device="cuda", generator=g, dtype=torch.int32)
    # the modulation as VAR passes it: strided views of one adaLN output
    ada = torch.randn(samples, 6 * k, device="cuda", generator=g)
    modulation = (ada[:, 2 * k:3 * k] + 1, ada[:, 4 * k:5 * k]) if prologue == "layernorm" else None
    scale = torch.rand(k, device="cuda", generator=g) + 0.5
    shift = torch.randn(k, device="cuda", generator=g) * 0.1
    return x, step, zero, dict(token_group=token_group, prologue=prologue, eps=1e-6, modulation=modulation,
                               channel_scale=scale, channel_shift=shift)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("prologue", ["none", "gelu_tanh", "layernorm"])
@pytest.mark.parametrize("k", [64, 1024, 1920, 7680])
def test_fused_quantize_kernel_matches_reference(extension, dtype, prologue, k):
    x, step, zero, options = fused_inputs(prologue, dtype, k)
    xq, act_scale, act_zero = kernels.fused_quantize(x, step, zero, 8, **options)
    ref, ref_scale, ref_zero = kernels.fused_quantize(x, step, zero, 8, backend="reference", **options)
    assert torch.equal(act_scale, ref_scale) and torch.equal(act_zero, ref_zero)
    diff = (xq.int() - ref.int()).abs()
    if prologue == "none":  # the same IEEE operations: bit-exact
        assert torch.equal(xq, ref)
    else:  # tanh and the LayerNorm's reduction order may differ in the last bit: a code one step off, rarely
        assert diff.max().item() <= 1 and diff.float().mean().item() <= 1e-3


def test_fused_quantize_in_a_cuda_graph(extension):
    x, step, zero, options = fused_inputs("layernorm", torch.float32, 1024)
    expected = kernels.fused_quantize(x, step, zero, 8, **options)[0]
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.fused_quantize(static_x, step, zero, 8, **options)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = kernels.fused_quantize(static_x, step, zero, 8, **options)[0]
    static_x.copy_(x.flip(1))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, kernels.fused_quantize(x.flip(1).contiguous(), step, zero, 8, **options)[0])
    assert not torch.equal(static_out, expected)


def test_fused_var_is_as_close_to_fake_quant_as_the_unfused_int8_model(sm90):
    """On the GPU the fused path skips the bf16 roundings of the normalised and GELU activations: it must be at
    least as close to the fake-quant model as the unfused INT8 model is."""
    import copy

    from kernels.convert import convert
    from tests.conftest import quantized_var_tiny
    from VAR.deploy import to_int8

    var, vae, raw = quantized_var_tiny("cuda", samples=8, w_symmetric=True)
    unfused, fused = copy.deepcopy(var), copy.deepcopy(var)
    convert(unfused, attention="sdpa")
    to_int8(fused, attention="sdpa")
    var.blocks.apply(lambda m: setattr(m, "explicit_matmuls", False) if hasattr(m, "explicit_matmuls") else None)
    batch = {k: v.cuda() for k, v in raw.tensors.items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fake = var(batch["labels"], batch["x_BLCv_wo_first_l"]).float()
        errors = [((m(batch["labels"], batch["x_BLCv_wo_first_l"]).float() - fake).norm() / fake.norm()).item()
                  for m in (unfused, fused)]
    assert errors[1] <= 1.2 * errors[0] + 1e-3, errors


def test_fused_int8_var_graphed_sampling_equals_eager(sm90):
    """The fused INT8 model (and its INT8 KV cache) under CUDA graphs samples the eager model's tokens."""
    import copy

    import numpy as np

    from tests.conftest import quantized_var_tiny
    from VAR.deploy import to_int8
    from VAR.sampling import make_sample_fn

    var, vae, _ = quantized_var_tiny("cuda", w_symmetric=True)
    for kv_cache in ("model", "int8"):
        model = copy.deepcopy(var)
        to_int8(model, attention="sdpa", kv_cache=kv_cache)
        eager = make_sample_fn(model, vae, dtype="bf16")
        graphed = make_sample_fn(model, vae, dtype="bf16", cuda_graphs=True)
        for seed in (1, 2):
            expected, got = eager(np.arange(4), seed), graphed(np.arange(4), seed)
            assert np.array_equal(expected["idx_BL"], got["idx_BL"]), kv_cache


@pytest.mark.parametrize("groups", [None, (0, 1, 4)])
def test_int8_linear_direct_path_equals_the_public_ops(sm90, groups):
    """Int8Linear calls the extension ops directly on sm_90; the result equals the checked public functions."""
    from torch import nn

    from kernels.convert import Int8Linear, LayerNormModulated
    from quant import QuantLinear
    from quant.context import TokenGroups, TokenPositions
    from quant.quantizers import UniformQuantizer

    g = torch.Generator().manual_seed(0)
    positions = TokenPositions()
    token_groups = TokenGroups(groups) if groups else None
    iq = UniformQuantizer(8, granularity="token_groups" if groups else "tensor", token_groups=token_groups,
                          positions=positions)
    layer = QuantLinear.from_linear(nn.Linear(256, 512), UniformQuantizer(8, True, granularity="out_channel", size=512),
                                    iq)
    layer.weight_quantizer.calibrate_weight(layer.weight)
    x = torch.randn(6, 10, 256, generator=g) * 2
    with positions.at(range(10)), torch.no_grad():
        iq.start_observing(), iq(x), iq.finish_observing()
    layer.input_transform.compose(torch.rand(256, generator=g) + 0.5, torch.randn(256, generator=g) * 0.1)
    int8 = Int8Linear(layer).cuda()
    x = x.cuda().to(torch.bfloat16)
    mul, add = torch.randn(6, 1, 256, device="cuda") + 1, torch.randn(6, 1, 256, device="cuda")
    with positions.at(torch.arange(10, device="cuda")), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        token_group = positions.group_index(token_groups, 10, x.device, torch.int32) if groups else None
        for inputs, prologue in ((x, "none"), (LayerNormModulated(x.float(), 1e-6, mul, add), "layernorm")):
            direct = int8(inputs)
            source = x if prologue == "none" else x.float()
            xq, act_scale, act_zero = kernels.fused_quantize(
                source, int8.act_step, int8.act_zero, 8, token_group=token_group, prologue=prologue, eps=1e-6,
                modulation=(mul.reshape(6, 256), add.reshape(6, 256)) if prologue == "layernorm" else None,
                channel_scale=int8.channel_scale, channel_shift=int8.channel_shift)
            public = kernels.int8_linear(xq, int8.wq, act_scale, act_zero, int8.w_scale, int8.wsum, int8.bias)
            assert direct.dtype == torch.bfloat16 and torch.equal(direct, public), prologue


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_kv_decode_kernel_equals_the_torch_formula(extension, dtype):
    """The INT8 KV cache is read back by one kernel, from a view of the filled part of the preallocated cache."""
    from kernels.kv_cache import Int8Codec

    codec = Int8Codec(torch.tensor(0.0123), torch.tensor(131.0), 8)
    buffer = torch.randint(-128, 128, (2, 3, 4, 50, 64), dtype=torch.int8, device="cuda")
    view = buffer[0, :, :, :37]
    got = codec.decode(view, dtype)
    expected = (view.to(dtype) + (codec.offset - codec.zero).to(dtype)) * codec.step.to(dtype)
    assert got.shape == view.shape and got.dtype == dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("M,K,N", [(1, 1024, 3072), (200, 4096, 1024), (333, 1920, 7680), (3200, 1024, 4096)])
@pytest.mark.parametrize("tile", [0, 1])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_cutlass_sm80_gemm_matches_reference(extension, M, K, N, tile, out_dtype):
    """The CUTLASS 2.x kernel (Ampere/Ada; also runs on later GPUs), each tile, per-row and scalar parameters."""
    if not _extension.runs_sm80_gemm(torch.device("cuda")):
        pytest.skip("needs an sm_80 or newer GPU")
    for per_row in (False, True):
        x, step, zero, weight, bias = make_layer(M, K, N, per_row=per_row, seed=M + tile)
        xq, act_zero = kernels.quantize_rows(x, step, zero, 8)
        act_scale = step if per_row else step.reshape(1)
        out = extension.int8_linear_sm80(xq, weight.wq, act_scale, act_zero, weight.w_scale, weight.wsum, bias,
                                         out_dtype, tile)
        exact = reference.int8_linear(xq, weight.wq, act_scale, act_zero, weight.w_scale, weight.wsum, bias,
                                      torch.float32)
        assert_within_rounding(out, exact, BF16_HALF_ULP if out_dtype == torch.bfloat16 else FP16_HALF_ULP)
    auto = kernels.int8_linear(xq, weight.wq, act_scale, act_zero, weight.w_scale, weight.wsum, bias, out_dtype,
                               backend="cutlass_sm80")
    assert_within_rounding(auto, exact, BF16_HALF_ULP if out_dtype == torch.bfloat16 else FP16_HALF_ULP)


def split_qkv_inputs(dtype, heads=6, c=64, samples=4, tokens=13, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = (torch.randn(samples, tokens, 3 * heads * c, device="cuda", generator=g) * 3).to(dtype)
    bias = torch.randn(3 * heads * c, device="cuda", generator=g)
    q_scale = torch.rand(heads, device="cuda", generator=g) * 20 + 1
    return qkv, bias, q_scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("l2_norm", [True, False])
@pytest.mark.parametrize("codes", [False, True])
def test_split_qkv_kernel_matches_reference(extension, dtype, l2_norm, codes):
    """Written into slots 7..19 of a preallocated cache: the rest of the cache is untouched; v is exact, q and k
    at most one rounding apart (the norm's reduction order), int8 codes at most one step apart, rarely."""
    heads, c, start, tokens = 6, 64, 7, 13
    qkv, bias, q_scale = split_qkv_inputs(dtype, heads, c, tokens=tokens)
    grid = torch.tensor([0.02, 131.0, 0.05, 120.0], device="cuda")
    outputs = []
    for backend in (None, "reference"):
        cache = torch.full((2, 4, heads, 40, c), 7, device="cuda", dtype=torch.int8 if codes else dtype)
        k_slot, v_slot = cache[0, :, :, start:start + tokens], cache[1, :, :, start:start + tokens]
        q = kernels.split_qkv(qkv, heads, k_slot, v_slot, bias=bias, l2_norm=l2_norm, q_scale=q_scale,
                              kv_grid=grid if codes else None, backend=backend)
        outputs.append((q, cache))
    (q, cache), (q_ref, cache_ref) = outputs
    assert q.shape == (4, heads, tokens, c) and q.transpose(1, 2).is_contiguous()
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[start:start + tokens] = False
    assert (cache[:, :, :, untouched] == 7).all()
    if codes:
        assert torch.equal(cache[1], cache_ref[1])
        diff = (cache[0].int() - cache_ref[0].int()).abs()
        assert diff.max().item() <= (1 if l2_norm else 0) and diff.float().mean().item() <= 1e-3
    else:
        assert torch.equal(cache[1], cache_ref[1])
    half_ulp = {torch.bfloat16: BF16_HALF_ULP, torch.float16: FP16_HALF_ULP, torch.float32: 2.0**-23}[dtype]
    pairs = [(q, q_ref)] + ([] if codes else [(cache[0], cache_ref[0])])
    for got, expected in pairs:
        if not l2_norm:
            assert torch.equal(got, expected)
            continue
        err = (got.float() - expected.float()).abs()
        assert (err <= 4 * half_ulp * expected.float().abs() + 1e-30).all()
        if dtype != torch.float32:  # a 16-bit rounding mostly absorbs the last bit of the norm
            assert (err > 0).float().mean().item() <= 0.02


@pytest.mark.parametrize("x_dtype,branch_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                                  (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("k", [64, 1920])
def test_fused_residual_quantize_kernel_matches_reference(extension, x_dtype, branch_dtype, k):
    x, step, zero, options = fused_inputs("layernorm", x_dtype, k)
    g = torch.Generator(device="cuda").manual_seed(1)
    branch = torch.randn(x.shape, device="cuda", generator=g).to(branch_dtype)
    ada = torch.randn(x.shape[0], 1, 6 * k, device="cuda", generator=g).to(branch_dtype)
    gamma = ada[..., k:2 * k]  # a strided view, as VAR passes it
    options.pop("prologue")
    got = kernels.fused_residual_quantize(x, branch, gamma, step, zero, 8, **options)
    ref = kernels.fused_residual_quantize(x, branch, gamma, step, zero, 8, backend="reference", **options)
    assert got[0].dtype == x_dtype and torch.equal(got[0], ref[0])  # the residual add rounds as the model's
    assert torch.equal(got[2], ref[2]) and torch.equal(got[3], ref[3])
    diff = (got[1].int() - ref[1].int()).abs()
    assert diff.max().item() <= 1 and diff.float().mean().item() <= 1e-3


def test_fusion_ops_pass_opcheck(extension):
    qkv, bias, q_scale = split_qkv_inputs(torch.bfloat16)
    cache = torch.zeros(2, 4, 6, 20, 64, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(extension.split_qkv, (qkv, 6, bias, q_scale, True, 1e-12, cache[0, :, :, 3:16],
                                                cache[1, :, :, 3:16], None, 8))
    x, step, zero, options = fused_inputs("layernorm", torch.float32, 256)
    branch = torch.randn(x.shape, device="cuda").to(torch.bfloat16)
    gamma = torch.randn(x.shape[0], 256, device="cuda").to(torch.bfloat16)
    mul, add = (m.contiguous() for m in options["modulation"])
    torch.library.opcheck(extension.fused_residual_quantize, (x, branch, gamma, step, zero, options["token_group"], 8,
                                                              1e-6, mul, add, None, None))


@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                             (torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("shape", [(3, 64, 16, 16), (2, 160, 64, 64), (2, 640, 4, 2)])
@pytest.mark.parametrize("silu", [True, False])
def test_group_norm_silu_kernel_matches_reference(extension, dtype, out_dtype, shape, silu):
    g = torch.Generator(device="cuda").manual_seed(0)
    # a large common offset: the statistics must not cancel
    x = (torch.randn(shape, device="cuda", generator=g) * 2 + 40).to(dtype)
    weight = torch.randn(shape[1], device="cuda", generator=g) + 1
    bias = torch.randn(shape[1], device="cuda", generator=g)
    got = kernels.group_norm_silu(x, weight, bias, 32, 1e-6, silu=silu, out_dtype=out_dtype)
    exact = reference.group_norm_silu(x.double(), weight, bias, 32, 1e-6, silu, torch.float64)
    assert got.dtype == out_dtype
    half_ulp = {torch.bfloat16: BF16_HALF_ULP, torch.float16: FP16_HALF_ULP, torch.float32: 2.0**-24}[out_dtype]
    # one rounding to out_dtype, plus float32 statistics over up to 82k values (input quantised to dtype: exact)
    bound = half_ulp * exact.abs() + 2e-5 * (weight.abs().max().item() + 1)
    assert ((got.double() - exact).abs() <= bound).all()


def test_fused_decoder_images_on_gpu(extension):
    import copy

    from VAR.deploy import fuse_decoder
    from VAR.presets import create
    from VAR.sampling import decode_f_hat

    _, vae = create("var_tiny", device="cuda", seed=0)
    fused = copy.deepcopy(vae)
    fuse_decoder(fused)
    f_hat = torch.randn(4, vae.Cvae, 4, 4, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected, got = decode_f_hat(vae, f_hat), decode_f_hat(fused, f_hat)
    # both in bf16 autocast: the fused path skips float32 round trips, differences stay at bf16 noise
    assert (got.float() - expected.float()).abs().max().item() <= 2e-2


def test_group_norm_silu_passes_opcheck(extension):
    x = torch.randn(2, 64, 8, 8, device="cuda").to(torch.bfloat16)
    weight, bias = torch.ones(64, device="cuda"), torch.zeros(64, device="cuda")
    torch.library.opcheck(extension.group_norm_silu, (x, weight, bias, 32, 1e-6, True, torch.bfloat16))
