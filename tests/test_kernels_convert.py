"""quant → INT8 conversion on the CPU reference path."""
import copy

import pytest
import torch
from torch import nn

from kernels.convert import Int8Linear, convert
from quant import QuantLinear
from quant.context import TokenGroups, TokenPositions
from quant.quantizers import UniformQuantizer
from tests.conftest import quantized_var_tiny


def calibrated_layer(bits, w_symmetric=False, groups=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(bits)
    linear = nn.Linear(64, 32).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 64, generator=g, dtype=dtype) * 0.1)
    positions = TokenPositions()
    iq = UniformQuantizer(bits, granularity="token_groups" if groups else "tensor", token_groups=groups,
                          positions=positions)
    layer = QuantLinear.from_linear(linear, UniformQuantizer(bits, w_symmetric, granularity="out_channel", size=32), iq)
    layer.weight_quantizer.calibrate_weight(layer.weight)
    x = torch.randn(3, 10, 64, generator=g, dtype=dtype) * torch.linspace(0.5, 3, 10, dtype=dtype)[:, None] + 0.3
    with positions.at(range(10)):
        iq.start_observing(), iq(x), iq.finish_observing()
    return layer, x, positions


@pytest.mark.parametrize("bits,w_symmetric,groups", [(6, False, None), (6, False, TokenGroups((0, 1, 4))),
                                                      (8, True, None), (8, True, TokenGroups((0, 1, 4))),
                                                      (4, False, None)])
def test_int8_layer_matches_fake_quant_in_float64(bits, w_symmetric, groups):
    layer, x, positions = calibrated_layer(bits, w_symmetric, groups)
    with positions.at(range(10)), torch.no_grad():
        fake = layer(x)
        real = Int8Linear(layer)(x)
    assert real.dtype == torch.float64
    assert ((real - fake).abs().max() / fake.abs().max()).item() <= 1e-5


def test_asymmetric_8bit_weights_are_reported():
    layer, x, positions = calibrated_layer(8, w_symmetric=False)
    model = nn.Sequential(layer)
    report = convert(model)
    assert report.converted == ["0"] and sum(report.requantized_channels.values()) > 0
    assert "re-quantized symmetrically" in str(report)


def test_var_tiny_converted_matches_fake_quant():
    var, vae, raw = quantized_var_tiny(w_bits=6, a_bits=6)
    real = copy.deepcopy(var)
    report = convert(real)
    assert not report.skipped and len(report.converted) == 5 * var.depth + 2
    assert not any(isinstance(m, QuantLinear) for m in real.modules())
    assert report.weight_bytes_after < 0.3 * report.weight_bytes_before
    batch = raw.tensors
    with torch.no_grad():
        fake = var(batch["labels"], batch["x_BLCv_wo_first_l"])
        out = real(batch["labels"], batch["x_BLCv_wo_first_l"])
    # exact integer accumulation vs float32 sums: equal up to rare one-step flips downstream
    close = ((out - fake).abs() <= 1e-3 * fake.abs().max()).float().mean().item()
    assert close > 0.99
    assert torch.equal(out.argmax(-1), fake.argmax(-1)) or (out.argmax(-1) == fake.argmax(-1)).float().mean() > 0.98


def test_convert_refuses_an_unquantized_model():
    with pytest.raises(ValueError, match="quantize it with quant.quantize first"):
        convert(nn.Sequential(nn.Linear(16, 8)))


def test_int8_kv_cache_matches_fake_quant_k_and_v():
    """The INT8 cache stores exactly the fake-quant K and V codes: sampling gives the same logits."""
    var, vae, raw = quantized_var_tiny()
    from VAR.sampling import autoregressive_infer_cfg
    idx, lab = raw.tensors["idx_BL"][:2], raw.tensors["labels"][:2]
    fake_steps, kv_steps = [], []
    autoregressive_infer_cfg(var, vae, lab, forced_idx_BL=idx, on_scale=fake_steps.append, decode=False)
    from kernels.convert import install_int8_kv_cache
    assert install_int8_kv_cache(var) == var.depth
    cache_dtypes = []

    def record(step):
        kv_steps.append(step)
        cache_dtypes.append(var.blocks[0].attn.cached_k.dtype)

    autoregressive_infer_cfg(var, vae, lab, forced_idx_BL=idx, on_scale=record, decode=False)
    assert set(cache_dtypes) == {torch.int8}
    fake = torch.cat([s.logits_BlV for s in fake_steps], 1)
    kv = torch.cat([s.logits_BlV for s in kv_steps], 1)
    assert (kv - fake).abs().max().item() <= 1e-4 * fake.abs().max().item()


def test_var_fused_int8_blocks_equal_the_unfused_int8_model():
    """LayerNorm + adaLN modulation and GELU moved into the quantize kernels: the same float32 arithmetic, so the
    same logits as the converted but unfused model (CPU reference path)."""
    from VAR.deploy import FusedAdaLNSelfAttn, to_int8
    var, vae, raw = quantized_var_tiny(w_symmetric=True)
    unfused, fused = copy.deepcopy(var), copy.deepcopy(var)
    convert(unfused, attention="sdpa")
    report = to_int8(fused, attention="sdpa")
    assert f"{var.depth} of {var.depth} blocks" in str(report)
    assert all(type(b) is FusedAdaLNSelfAttn and b.ffn.fc2.prologue == "gelu_tanh" for b in fused.blocks)
    batch = raw.tensors
    with torch.no_grad():
        expected = unfused(batch["labels"], batch["x_BLCv_wo_first_l"])
        out = fused(batch["labels"], batch["x_BLCv_wo_first_l"])
    assert (out - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert copy.deepcopy(fused).blocks[0].ffn.fc2.prologue == "gelu_tanh"
