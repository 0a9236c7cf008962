"""The non-GEMM fusions of the INT8 deployment (residual add + LayerNorm into the quantize kernel, the attention
inputs in one kernel) on the CPU reference path, against the model's own ops."""
import copy

import pytest
import torch

import kernels
from kernels.kv_cache import Int8Codec, Int8KVCodec
from tests.conftest import quantized_var_tiny
from VAR.deploy import FusedSelfAttention, PendingResidual, fuse_attention, to_int8
from VAR.model import SelfAttention


def attention(seed=0, l2_norm=True, heads=2, width=128):
    torch.manual_seed(seed)
    attn = SelfAttention(0, embed_dim=width, num_heads=heads, attn_l2_norm=l2_norm)
    with torch.no_grad():
        attn.q_bias.normal_(0, 0.5)
        attn.v_bias.normal_(0, 0.5)
        if l2_norm:
            attn.scale_mul_1H11.copy_(torch.tensor([1.0, 6.0]).log().reshape(1, heads, 1, 1))  # 6 hits the cap at 100
    return attn


def fused_copy(attn):
    fused = copy.deepcopy(attn)
    fused.__class__ = FusedSelfAttention
    fused.prepare()
    return fused


def assert_same_cached_steps(attn, fused, capacity):
    """Two cached steps (5 then 7 tokens) through the model's SelfAttention and the fused one: the same outputs
    and the same cache."""
    for module in (attn, fused):
        module.kv_caching(True, max_len=capacity)
    with torch.no_grad():
        for tokens in (5, 7):
            x = torch.randn(3, tokens, 128)
            assert torch.equal(fused(x, None), attn(x, None))
    assert fused.cached_k.dtype == attn.cached_k.dtype
    assert torch.equal(fused.cached_k, attn.cached_k) and torch.equal(fused.cached_v, attn.cached_v)


@pytest.mark.parametrize("l2_norm", [True, False])
@pytest.mark.parametrize("capacity", [None, 12])
def test_fused_attention_inputs_equal_the_model_with_a_kv_cache(l2_norm, capacity):
    """Growing and preallocated caches, then a step without a cache."""
    attn = attention(l2_norm=l2_norm)
    fused = fused_copy(attn)
    assert_same_cached_steps(attn, fused, capacity)
    with torch.no_grad():  # and without a cache (the calibration replay)
        fused.kv_caching(False), attn.kv_caching(False)
        x = torch.randn(2, 9, 128)
        assert torch.equal(fused(x, None), attn(x, None))


@pytest.mark.parametrize("capacity", [None, 12])
def test_fused_attention_writes_the_int8_kv_codes_the_codec_would(capacity):
    attn = attention()
    codec = Int8KVCodec(Int8Codec(torch.tensor(0.02), torch.tensor(131.0), 8),
                        Int8Codec(torch.tensor(0.05), torch.tensor(120.0), 8))
    attn.kv_codec = codec
    fused = fused_copy(attn)
    assert_same_cached_steps(attn, fused, capacity)
    assert fused.cached_k.dtype == torch.int8


def test_fused_attention_runs_the_model_code_with_explicit_matmuls():
    """Fake-quant attention products need the model's own attention code: the fused module defers to it."""
    attn = attention()
    attn.explicit_matmuls = True
    fused = fused_copy(attn)
    x = torch.randn(2, 6, 128)
    with torch.no_grad():
        assert torch.equal(fused(x, None), attn(x, None))


def test_split_qkv_rejects_bad_outputs():
    qkv = torch.randn(2, 3, 3 * 64)
    good = torch.empty(2, 2, 3, 32)
    with pytest.raises(ValueError, match=r"k_out must be \(2, 2, 3, 32\)"):
        kernels.split_qkv(qkv, 2, torch.empty(2, 3, 2, 32), good)
    with pytest.raises(TypeError, match="both be int8"):
        kernels.split_qkv(qkv, 2, good.to(torch.int8), good)
    with pytest.raises(ValueError, match="kv_grid"):
        kernels.split_qkv(qkv, 2, good.to(torch.int8), good.to(torch.int8))
    with pytest.raises(ValueError, match="3 \\* heads"):
        kernels.split_qkv(torch.randn(2, 3, 100), 2, good, good)


@pytest.mark.parametrize("x_dtype,branch_dtype", [(torch.float32, torch.bfloat16), (torch.float64, torch.float64)])
def test_fused_residual_quantize_is_the_residual_add_then_the_layernorm_prologue(x_dtype, branch_dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 64, generator=g, dtype=torch.float64).to(x_dtype)
    branch = torch.randn(4, 6, 64, generator=g).to(branch_dtype)
    ada = torch.randn(4, 1, 6 * 64, generator=g).to(branch_dtype)
    gamma = ada[..., :64]  # a strided view, as VAR passes it
    modulation = (torch.rand(4, 64, generator=g) + 0.5, torch.randn(4, 64, generator=g))
    step, zero = torch.tensor([0.02]), torch.tensor([128], dtype=torch.int32)
    x_sum, xq, act_scale, act_zero = kernels.fused_residual_quantize(x, branch, gamma, step, zero, 8,
                                                                     modulation=modulation, eps=1e-6)
    expected_sum = x + branch * gamma
    assert x_sum.dtype == x_dtype and torch.equal(x_sum, expected_sum)
    expected = kernels.fused_quantize(expected_sum, step, zero, 8, prologue="layernorm", modulation=modulation)
    assert torch.equal(xq, expected[0]) and torch.equal(act_scale, expected[1]) and torch.equal(act_zero, expected[2])
    with pytest.raises(TypeError, match="branch must have x's dtype"):
        kernels.fused_residual_quantize(x.to(torch.bfloat16), branch.half(), gamma.half(), step, zero, 8,
                                        modulation=modulation)


def test_fused_int8_var_with_int8_kv_cache_equals_the_unfused_int8_model():
    """All fusions at once (pending residuals across blocks, attention inputs writing int8 codes): the same
    sampling logits as the converted, unfused model with its INT8 KV cache."""
    from kernels.convert import convert
    from VAR.sampling import autoregressive_infer_cfg

    var, vae, raw = quantized_var_tiny(w_symmetric=True, quantize_attention=True)
    unfused, fused = copy.deepcopy(var), copy.deepcopy(var)
    convert(unfused, attention="sdpa", kv_cache="int8")
    to_int8(fused, attention="sdpa", kv_cache="int8")
    assert [b.defer_residual for b in fused.blocks] == [True] * (var.depth - 1) + [False]
    assert all(type(b.attn) is FusedSelfAttention for b in fused.blocks)
    idx, labels = raw.tensors["idx_BL"][:2], raw.tensors["labels"][:2]
    logits, cache_dtypes = [], set()

    def record(step, model):
        steps.append(step)
        cache_dtypes.add(model.blocks[0].attn.cached_k.dtype)

    for model in (unfused, fused):
        steps = []
        autoregressive_infer_cfg(model, vae, labels, forced_idx_BL=idx, on_scale=lambda s: record(s, model),
                                 decode=False)
        logits.append(torch.cat([s.logits_BlV for s in steps], 1))
    assert cache_dtypes == {torch.int8}
    assert (logits[1] - logits[0]).abs().max().item() <= 1e-5 * logits[0].abs().max().item()
    # the first block hands its FFN branch on instead of adding it
    block = fused.blocks[0]
    with torch.no_grad():
        x = torch.randn(2, 4, var.C)
        cond = var.class_emb(torch.tensor([1, 2]))
        fused.kv_caching(False)
        assert isinstance(block(x, cond, None), PendingResidual)


def test_fuse_attention_keeps_a_float_var_exact():
    from VAR.presets import create
    from VAR.sampling import autoregressive_infer_cfg

    var, vae = create("var_tiny", seed=0)
    fused = copy.deepcopy(var)
    assert fuse_attention(fused) == var.depth
    labels = torch.tensor([3, 7])
    outputs = []
    for model in (var, fused):
        steps = []
        autoregressive_infer_cfg(model, vae, labels, rng=torch.Generator().manual_seed(0), on_scale=steps.append,
                                 decode=False)
        outputs.append(torch.cat([s.logits_BlV for s in steps], 1))
    assert (outputs[1] - outputs[0]).abs().max().item() <= 1e-5 * outputs[0].abs().max().item()


def test_fused_decoder_equals_the_model_decoder():
    from VAR.deploy import FusedResnetBlock, fuse_decoder
    from VAR.presets import create
    from VAR.sampling import decode_f_hat

    _, vae = create("var_tiny", seed=0)
    with torch.no_grad():  # non-trivial affine parameters
        for module in vae.decoder.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1, 0.3), module.bias.normal_(0, 0.3)
    fused = copy.deepcopy(vae)
    assert fuse_decoder(fused) > 0 and any(type(m) is FusedResnetBlock for m in fused.decoder.modules())
    f_hat = torch.randn(2, vae.Cvae, 4, 4, generator=torch.Generator().manual_seed(0)) * 3 + 1
    with torch.no_grad():
        expected, got = decode_f_hat(vae, f_hat), decode_f_hat(fused, f_hat)
    assert (got - expected).abs().max().item() <= 1e-5


def test_group_norm_silu_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible by groups=32"):
        kernels.group_norm_silu(torch.randn(2, 48, 4, 4), torch.ones(48), torch.zeros(48), 32)
    with pytest.raises(ValueError, match=r"one value per input channel"):
        kernels.group_norm_silu(torch.randn(2, 64, 4, 4), torch.ones(32), torch.zeros(64), 32)
