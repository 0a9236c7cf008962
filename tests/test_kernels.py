"""CPU tests of the kernels package: the exact reference path, the int8 convention, weights, errors."""
from pathlib import Path

import pytest
import torch

import kernels
from kernels import _extension, reference
from kernels.ops import sm90_tile_config

torch.manual_seed(0)


def asymmetric_params(x: torch.Tensor, bits: int, per_row: bool):
    """Min/max asymmetric b-bit parameters of x [M, K]: float32 step, integer zero point."""
    lo = x.amin(dim=-1) if per_row else x.min().reshape(1)
    hi = x.amax(dim=-1) if per_row else x.max().reshape(1)
    step = ((hi - lo) / (2**bits - 1)).float()
    zero = torch.round(-lo.double() / step.double()).to(torch.int32)
    return step, zero


def fake_quant_linear(x, step, zero, bits, weight, bias):
    """float64 F.linear on dequantized operands: x_hat = step * (q - z), w_hat = w_scale * wq."""
    q = torch.round(x.float() / step[:, None]) + zero.float()[:, None]  # the quantizer, in float32 like the kernels
    q = q.clamp(0, 2**bits - 1).double()
    x_hat = step.double()[:, None] * (q - zero.double()[:, None])
    w_hat = weight.w_scale.double()[:, None] * weight.wq.double()
    out = x_hat @ w_hat.t()
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_matches_float64_fake_quant(bits, per_row, with_bias):
    M, K, N = 37, 256, 48
    x = torch.randn(M, K) * 3 + 0.7  # off-centre, so the zero points are far from the grid middle
    step, zero = asymmetric_params(x, bits, per_row)
    weight = kernels.quantize_weight_symmetric(torch.randn(N, K), bits=8)
    bias = torch.randn(N) if with_bias else None
    expected = fake_quant_linear(x, step, zero, bits, weight, bias)

    exact = kernels.quantized_linear(x, step, zero, bits, weight.wq, weight.w_scale, weight.wsum, bias,
                                     out_dtype=torch.float64)
    assert exact.dtype == torch.float64
    assert torch.linalg.norm(exact - expected) / torch.linalg.norm(expected) <= 1e-12

    fp32 = kernels.quantized_linear(x, step, zero, bits, weight.wq, weight.w_scale, weight.wsum, bias,
                                    out_dtype=torch.float32)
    assert ((fp32.double() - expected).abs() / expected.abs().max()).max() <= 1e-6
    assert torch.linalg.norm(fp32.double() - expected) / torch.linalg.norm(expected) <= 1e-5


def test_integer_accumulation_is_exact_at_k_7680():
    K = 7680
    # 7679 products of 128 * 128 plus one product of 1: 125,812,737 is odd and above 2**24, so no float32
    # accumulation can produce it.
    xq = torch.full((2, K), -128, dtype=torch.int8)
    wq = torch.full((8, K), -128, dtype=torch.int8)
    xq[:, -1] = 1
    wq[:, -1] = 1
    acc = reference.int_matmul(xq, wq)
    assert acc.dtype == torch.int64
    assert torch.all(acc == 7679 * 128 * 128 + 1)
    assert float(torch.tensor(7679 * 128 * 128 + 1, dtype=torch.float32)) != 7679 * 128 * 128 + 1

    xr = torch.randint(-128, 128, (5, K), dtype=torch.int8)
    wr = torch.randint(-128, 128, (16, K), dtype=torch.int8)
    exact = (xr.long()[:, None, :] * wr.long()[None, :, :]).sum(-1)
    assert torch.equal(reference.int_matmul(xr, wr), exact)


def test_int8_linear_at_k_7680_is_exact_in_float64():
    M, K, N = 4, 7680, 16
    xq = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    wq = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    act_zero = torch.randint(-100, 100, (M,), dtype=torch.int32)
    act_scale, w_scale = torch.rand(M) + 0.5, torch.rand(N) + 0.5
    out = kernels.int8_linear(xq, wq, act_scale, act_zero, w_scale, kernels.weight_sum(wq), None, torch.float64)
    exact = ((xq.long() - act_zero.long()[:, None]) @ wq.long().t()).double()  # int64 matmul, exact
    expected = act_scale.double()[:, None] * w_scale.double()[None, :] * exact
    assert torch.allclose(out, expected, rtol=1e-15, atol=0)


def test_zero_point_algebra_8bit():
    bits, M, K, N = 8, 24, 64, 16
    zero = torch.tensor([0, 1, 77, 128, 200, 255, -5, 300] * 3, dtype=torch.int32)  # in and out of [0, 255]
    step = torch.full((M,), 0.05)
    x = torch.randn(M, K) * 4
    xq, act_zero = kernels.quantize_rows(x, step, zero, bits)
    q = (torch.round(x / step[:, None]) + zero[:, None]).clamp(0, 255).long()
    assert torch.equal(xq.long(), q - 128)  # 8-bit grids are stored shifted by 128 ...
    assert torch.equal(act_zero, zero - 128)  # ... and the rest of the zero point goes to the epilogue
    wq = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    out = kernels.int8_linear(xq, wq, 1.0, act_zero, torch.ones(N), kernels.weight_sum(wq), None, torch.float64)
    assert torch.equal(out, ((q - zero.long()[:, None]) @ wq.long().t()).double())


def test_zero_point_algebra_6bit():
    bits, M, K, N = 6, 16, 64, 24
    zero = torch.randint(0, 64, (M,), dtype=torch.int32)
    step = torch.rand(M) * 0.1 + 0.01
    x = torch.randn(M, K)
    xq, act_zero = kernels.quantize_rows(x, step, zero, bits)
    q = (torch.round(x / step[:, None]) + zero[:, None]).clamp(0, 63).long()
    assert torch.equal(xq.long(), q - zero.long()[:, None])  # stored as q - z: symmetric int8, exact
    assert torch.equal(act_zero, torch.zeros_like(zero))  # nothing left to correct
    wq = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    wsum = kernels.weight_sum(wq)
    with_zero = kernels.int8_linear(xq, wq, 1.0, act_zero, torch.ones(N), wsum, None, torch.float64)
    without = kernels.int8_linear(xq, wq, 1.0, None, torch.ones(N), wsum, None, torch.float64)
    assert torch.equal(with_zero, without)
    assert torch.equal(without, ((q - zero.long()[:, None]) @ wq.long().t()).double())

    # a zero point outside the int8-safe window [-64, 128] is shifted to the window edge, still exact
    far = torch.full((M,), 150, dtype=torch.int32)
    xq_far, act_zero_far = kernels.quantize_rows(x, step, far, bits)
    assert torch.equal(act_zero_far, torch.full_like(far, 22))
    q_far = (torch.round(x / step[:, None]) + 150).clamp(0, 63).long()
    assert torch.equal(xq_far.long(), q_far - 128)


def test_activation_offset_keeps_codes_in_int8():
    for bits in range(2, 9):
        zero = torch.arange(-300, 400, dtype=torch.int32)
        offset = kernels.activation_offset(zero, bits)
        assert (0 - offset).min() >= -128 and ((2**bits - 1) - offset).max() <= 127
        in_window = (zero >= 2**bits - 128) & (zero <= 128)
        assert torch.equal(offset[in_window], zero[in_window])


def test_quantize_rounds_half_to_even_and_clamps():
    step = torch.tensor(0.5)
    x = torch.tensor([[0.25, 0.75, 1.25, -0.25, -0.75, 100.0, -100.0, 0.0] * 2])
    xq, _ = kernels.quantize_rows(x, step, torch.tensor(10, dtype=torch.int32), 6)
    # x / step = 0.5, 1.5, 2.5, -0.5, -1.5 -> 0, 2, 2, -0, -2; + 10; clamp to [0, 63]; stored minus 10
    assert xq[0, :8].tolist() == [0, 2, 2, 0, -2, 53, -10, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_matches_definition_for_each_input_dtype(dtype):
    x = (torch.randn(3, 7, 32) * 2).to(dtype)
    step, zero = torch.tensor(0.03), torch.tensor(131, dtype=torch.int32)
    xq, act_zero = kernels.quantize_rows(x, step, zero, 8)
    q = (torch.round(x.float() / 0.03) + 131).clamp(0, 255) - 128
    assert xq.shape == x.shape and xq.dtype == torch.int8
    assert torch.equal(xq, q.to(torch.int8)) and act_zero.tolist() == [3]


def test_per_token_parameters_broadcast_over_the_batch():
    B, L, K, N = 3, 5, 32, 8
    x = torch.randn(B, L, K)
    step = torch.rand(L) * 0.05 + 0.01
    zero = torch.randint(100, 150, (L,), dtype=torch.int32)
    weight = kernels.quantize_weight_symmetric(torch.randn(N, K))
    out = kernels.quantized_linear(x, step, zero, 8, weight.wq, weight.w_scale, weight.wsum, None, torch.float64)
    rows = kernels.quantized_linear(x.reshape(B * L, K), step.repeat(B), zero.repeat(B), 8, weight.wq,
                                    weight.w_scale, weight.wsum, None, torch.float64)
    assert out.shape == (B, L, N)
    assert torch.equal(out.reshape(B * L, N), rows)


def test_pack_weight_is_exact_for_6bit_asymmetric_grids():
    N, K, bits = 16, 64, 6
    w = torch.randn(N, K) + 0.3
    lo, hi = w.amin(1), w.amax(1)
    step = (hi - lo) / (2**bits - 1)
    zero = torch.round(-lo / step)
    codes = (torch.round(w / step[:, None]) + zero[:, None]).clamp(0, 2**bits - 1)
    packed = kernels.pack_weight(codes, zero, step, bits)
    assert not packed.requantized.any()
    w_hat = step.double()[:, None] * (codes.double() - zero.double()[:, None])
    assert torch.equal(packed.w_scale.double()[:, None] * packed.wq.double(), w_hat)
    assert torch.equal(packed.wsum, packed.wq.sum(1, dtype=torch.int32))


def test_pack_weight_requantizes_8bit_asymmetric_channels_within_half_a_step():
    N, K, bits = 8, 256, 8
    codes = torch.randint(0, 256, (N, K))
    codes[:, 0], codes[:, 1] = 0, 255  # every channel spans the full grid
    zero = torch.tensor([128, 0, 40, 100, 128, 255, 200, 128])
    step = torch.rand(N) * 0.01 + 0.001
    packed = kernels.pack_weight(codes, zero, step, bits)
    assert packed.requantized.tolist() == [False, True, True, True, False, True, True, False]
    w_hat = step.double()[:, None] * (codes.double() - zero.double()[:, None])
    got = packed.w_scale.double()[:, None] * packed.wq.double()
    exact_rows = ~packed.requantized
    assert torch.equal(got[exact_rows], w_hat[exact_rows])
    err = (got - w_hat).abs().amax(1)
    assert torch.all(err[packed.requantized] <= packed.w_scale.double()[packed.requantized] / 2 * (1 + 1e-6))
    assert torch.all(err[packed.requantized] > 0)


def test_symmetric_weight_quantization():
    w = torch.randn(24, 64)
    packed = kernels.quantize_weight_symmetric(w, bits=8)
    assert packed.wq.dtype == torch.int8 and packed.w_scale.dtype == torch.float32
    assert torch.equal(packed.wq.abs().amax(1), torch.full((24,), 127, dtype=torch.int8))
    err = (packed.w_scale[:, None] * packed.wq.float() - w).abs()
    assert torch.all(err <= packed.w_scale[:, None] / 2 * (1 + 1e-5))
    assert kernels.quantize_weight_symmetric(w, bits=6).wq.abs().max() == 31


def test_backend_on_cpu():
    assert kernels.active_backend("cpu") == "reference"
    assert kernels.BACKENDS == ("cutlass_sm90", "cutlass_sm80", "int_mm", "reference")
    assert isinstance(kernels.extension_status(), str)


def _linear_args(M=4, K=32, N=16):
    return (torch.zeros(M, K, dtype=torch.int8), torch.zeros(N, K, dtype=torch.int8), torch.tensor(1.0),
            torch.tensor(0, dtype=torch.int32), torch.ones(N), torch.zeros(N, dtype=torch.int32))


def test_clear_errors_for_unsupported_inputs():
    xq, wq, sa, za, sw, ws = _linear_args()
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.int8_linear(torch.zeros(4, 24, dtype=torch.int8), torch.zeros(16, 24, dtype=torch.int8), sa, za,
                            sw, ws)
    with pytest.raises(ValueError, match="multiple of 8"):
        kernels.int8_linear(xq, wq[:12], sa, za, sw[:12], ws[:12])
    with pytest.raises(TypeError, match="int8"):
        kernels.int8_linear(xq.float(), wq, sa, za, sw, ws)
    with pytest.raises(TypeError, match="out_dtype"):
        kernels.int8_linear(xq, wq, sa, za, sw, ws, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"shape \(16,\)"):
        kernels.int8_linear(xq, wq, sa, za, sw[:8], ws)
    with pytest.raises(ValueError, match="broadcastable to the rows"):
        kernels.int8_linear(xq, wq, torch.ones(3), za, sw, ws)
    with pytest.raises(ValueError, match="wq must be"):
        kernels.int8_linear(xq, wq[:, :16], sa, za, sw, ws)

    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="bits"):
        kernels.quantize_rows(x, 0.1, 0, 9)
    with pytest.raises(ValueError, match="bits"):
        kernels.quantize_rows(x, 0.1, 0, 1)
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        kernels.quantize_rows(x.double(), 0.1, 0, 8)
    with pytest.raises(TypeError, match="integer tensor"):
        kernels.quantize_rows(x, 0.1, torch.tensor(3.0), 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        kernels.quantize_rows(torch.randn(4, 40), 0.1, 0, 8)
    with pytest.raises(RuntimeError, match="cutlass_sm90"):
        kernels.quantize_rows(x, 0.1, 0, 8, backend="cutlass_sm90")
    with pytest.raises(ValueError, match="backend must be"):
        kernels.quantize_rows(x, 0.1, 0, 8, backend="triton")
    with pytest.raises(ValueError, match="zero_point must hold integers"):
        kernels.pack_weight(torch.zeros(8, 16), torch.full((8,), 0.5), torch.ones(8), 8)
    with pytest.raises(ValueError, match=r"\[0, 63\]"):
        kernels.pack_weight(torch.full((8, 16), 64), torch.zeros(8), torch.ones(8), 6)


def test_sm90_tile_table_names_exist():
    table = (Path(kernels.__file__).parent / "csrc" / "gemm_sm90_table.cpp").read_text()
    for m, expected in [(1, "64x128_pingpong"), (200, "64x128_pingpong"), (256, "64x128_pingpong"),
                        (257, "128x128_pingpong_c2x1"), (51200, "128x128_pingpong_c2x1")]:
        assert sm90_tile_config(m) == expected
        assert f"sm90_config_{expected}()" in table


def test_cutlass_dispatch_passes_the_table_config(monkeypatch):
    """The cutlass_sm90 path hands the op normalised parameters and the table's configuration index."""
    configs = ("64x128_pingpong", "128x128_pingpong_c2x1")
    calls = []

    class FakeOps:
        def int8_linear(self, xq, wq, act_scale, act_zero, w_scale, wsum, bias, out_dtype, config):
            calls.append((tuple(xq.shape), tuple(act_scale.shape), act_zero.dtype, config))
            return reference.int8_linear(xq, wq, act_scale, act_zero, w_scale, wsum, bias, out_dtype)

    monkeypatch.setattr(_extension, "runs_sm90_gemm", lambda device: True)
    monkeypatch.setattr(_extension, "sm90_configs", lambda: configs)
    monkeypatch.setattr(_extension, "ops", lambda: FakeOps())
    weight = kernels.quantize_weight_symmetric(torch.randn(16, 32))
    for rows, config in [(200, 0), (300, 1)]:
        xq = torch.randint(-128, 128, (rows, 32), dtype=torch.int8)
        out = kernels.int8_linear(xq, weight.wq, 0.5, torch.tensor(3), weight.w_scale, weight.wsum,
                                  backend="cutlass_sm90")
        expected = kernels.int8_linear(xq, weight.wq, 0.5, torch.tensor(3), weight.w_scale, weight.wsum)
        assert torch.equal(out, expected)
        assert calls[-1] == ((rows, 32), (1,), torch.int32, config)


def fused_case(prologue, dtype=torch.float32, samples=3, tokens=5, k=64, groups=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(samples, tokens, k, generator=g) * 2 + 0.3).to(dtype)
    step = torch.rand(groups, generator=g) * 0.05 + 0.01
    zero = torch.randint(0, 64, (groups,), generator=g, dtype=torch.int32)
    token_group = torch.randint(0, groups, (tokens,), generator=g, dtype=torch.int32)
    modulation = (torch.randn(samples, k, generator=g) + 1, torch.randn(samples, k, generator=g)) \
        if prologue == "layernorm" else None
    scale, shift = torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g) * 0.1
    return x, step, zero, token_group, modulation, scale, shift


@pytest.mark.parametrize("prologue", ["none", "gelu_tanh", "layernorm"])
@pytest.mark.parametrize("bits", [8, 6])
def test_fused_quantize_equals_the_unfused_operations(prologue, bits):
    """prologue → per-channel transform → token-group grid, each written out in plain PyTorch ops."""
    x, step, zero, token_group, modulation, scale, shift = fused_case(prologue)
    xq, act_scale, act_zero = kernels.fused_quantize(x, step, zero, bits, token_group=token_group, prologue=prologue,
                                                     eps=1e-6, modulation=modulation, channel_scale=scale,
                                                     channel_shift=shift)
    y = x
    if prologue == "gelu_tanh":
        y = torch.nn.functional.gelu(y, approximate="tanh")
    if prologue == "layernorm":
        y = torch.nn.functional.layer_norm(y, (64,), eps=1e-6) * modulation[0][:, None] + modulation[1][:, None]
    y = y / scale - shift
    rows = token_group.long().repeat(3)
    expected, residual = reference.quantize_rows(y.reshape(-1, 64), step[rows], zero[rows], bits)
    assert torch.equal(xq.reshape(-1, 64), expected)
    assert torch.equal(act_scale, step[rows]) and torch.equal(act_zero, residual)


def test_fused_quantize_without_token_groups_returns_one_grid():
    x, step, zero, *_ = fused_case("none", groups=1)
    xq, act_scale, act_zero = kernels.fused_quantize(x, step, zero, 8)
    expected, residual = reference.quantize_rows(x.reshape(-1, 64), step, zero, 8)
    assert torch.equal(xq.reshape(-1, 64), expected)
    assert act_scale.shape == act_zero.shape == (1,) and act_zero.item() == residual.item()


def test_fused_quantize_errors_name_the_fix():
    x, step, zero, token_group, modulation, scale, shift = fused_case("layernorm")
    with pytest.raises(ValueError, match="pass token_group"):
        kernels.fused_quantize(x, step, zero, 8)
    with pytest.raises(ValueError, match="needs modulation"):
        kernels.fused_quantize(x, step, zero, 8, token_group=token_group, prologue="layernorm")
    with pytest.raises(ValueError, match="do not split into the 2 samples"):
        kernels.fused_quantize(x, step, zero, 8, token_group=token_group, prologue="layernorm",
                               modulation=(modulation[0][:2], modulation[1][:2]))
    with pytest.raises(ValueError, match="not whole sequences"):
        kernels.fused_quantize(x, step, zero, 8, token_group=token_group[:4])
    with pytest.raises(ValueError, match="prologue must be one of"):
        kernels.fused_quantize(x, step, zero, 8, token_group=token_group, prologue="relu")
    with pytest.raises(ValueError, match="one value per input channel"):
        kernels.fused_quantize(x, step, zero, 8, token_group=token_group, channel_scale=scale[:8])
    with pytest.raises(TypeError, match="integer tensor"):
        kernels.fused_quantize(x, step, zero.float(), 8, token_group=token_group)
