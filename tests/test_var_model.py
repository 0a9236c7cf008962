"""VAR model: presets, KV cache, attention hook points, teacher forcing, module-call discipline."""
import pytest
import torch
from torch import nn

from VAR import presets
from VAR.model import SelfAttention
from VAR.sampling import autoregressive_infer_cfg, make_rng

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def tiny():
    return presets.create('var_tiny', seed=0)


def _sample(var, vae, labels, seed=0, **kw):
    steps = []
    gen = autoregressive_infer_cfg(var, vae, labels, rng=make_rng('cpu', seed), on_scale=steps.append, **kw)
    return gen, steps


def test_tiny_preset_is_deterministic_and_seeded():
    a, _ = presets.create('var_tiny', seed=0)
    b, _ = presets.create('var_tiny', seed=0)
    c, _ = presets.create('var_tiny', seed=1)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.head.weight, c.head.weight)
    # buffers keep their constructor values: the block-causal mask and the zero key bias
    assert torch.equal(a.blocks[0].attn.zero_k_bias, torch.zeros(64))
    assert a.attn_bias_for_masking[0, 0, 0, 1].item() == -float('inf') and a.attn_bias_for_masking[0, 0, 1, 0] == 0


def test_unknown_preset_names_the_choices():
    with pytest.raises(KeyError, match='var_d16'):
        presets.create('var_d17')


def test_teacher_forced_forward_equals_kv_cache_path(tiny):
    """The block-causal training pass and the scale-by-scale KV-cache path compute the same logits."""
    var, vae = tiny
    labels = torch.tensor([3, 17])
    gen, steps = _sample(var, vae, labels, cfg=0.0)
    kv_logits = torch.cat([s.logits_BlV for s in steps], dim=1)           # (2B, L, V): [cond; uncond]
    x = vae.quantize.idxBl_to_var_input(gen.idx_BL)
    both = torch.cat([labels, torch.full_like(labels, var.num_classes)])
    logits = var(both, torch.cat([x, x]))
    torch.testing.assert_close(logits, kv_logits, atol=1e-5, rtol=1e-4)


def test_explicit_matmuls_equal_sdpa_with_and_without_mask(tiny):
    var, vae = tiny
    labels = torch.tensor([5, 9])
    x = vae.quantize.idxBl_to_var_input(torch.randint(0, var.V, (2, var.L), generator=torch.Generator().manual_seed(0)))
    ref_masked, ref_unmasked = var(labels, x), var(labels, x, attn_mask=False)
    var.set_explicit_matmuls(True)
    try:
        torch.testing.assert_close(var(labels, x), ref_masked, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(var(labels, x, attn_mask=False), ref_unmasked, atol=1e-5, rtol=1e-4)
    finally:
        var.set_explicit_matmuls(False)
    # without the mask the first token sees the later scales, so its logits change
    assert (ref_masked[:, 0] - ref_unmasked[:, 0]).abs().max() > 1e-3


def test_forward_fn_replays_one_scale_without_cache(tiny):
    """PTQ4ARVG's calibration replay: blocks on one scale's token map, no cache, no mask. For the first scale
    (one token, nothing cached before it) this is exactly the sampler's computation."""
    var, vae = tiny
    labels = torch.tensor([1, 2])
    _, steps = _sample(var, vae, labels)
    cond = var.class_emb(torch.cat([labels, torch.full_like(labels, var.num_classes)]))
    torch.testing.assert_close(var.forward_fn(steps[0].token_map, cond), steps[0].logits_BlV, atol=1e-6, rtol=0)
    assert all(not b.attn.caching and b.attn.cached_k is None for b in var.blocks)


def test_explicit_path_calls_the_matmul_hook_points(tiny):
    var, vae = tiny
    calls = []

    class Spy(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, a, b):
            calls.append((self.name, tuple(a.shape), tuple(b.shape)))
            return a @ b

    attn = var.blocks[1].attn
    originals = attn.qk_matmul, attn.av_matmul
    attn.qk_matmul, attn.av_matmul = Spy('qk'), Spy('av')
    try:
        x = vae.quantize.idxBl_to_var_input(torch.zeros(1, var.L, dtype=torch.long))
        var(torch.tensor([0]), x)
        assert calls == []                                       # SDPA path: hook points unused
        attn.explicit_matmuls = True
        var(torch.tensor([0]), x)
    finally:
        attn.qk_matmul, attn.av_matmul = originals
        attn.explicit_matmuls = False
    H, c, L = attn.num_heads, attn.head_dim, var.L
    assert calls == [('qk', (1, H, L, c), (1, H, c, L)), ('av', (1, H, L, L), (1, H, L, c))]


def test_linear_layers_are_called_as_modules(tiny):
    """A wrapper that replaces an nn.Linear must actually be used (quantization wraps modules from outside)."""
    var, vae = tiny
    b = var.blocks[0]
    targets = {'word_embed': (var, 'word_embed'), 'mat_qkv': (b.attn, 'mat_qkv'), 'proj': (b.attn, 'proj'),
               'fc1': (b.ffn, 'fc1'), 'fc2': (b.ffn, 'fc2'), 'ada_lin.1': (b.ada_lin, '1'),
               'head_nm.ada_lin.1': (var.head_nm.ada_lin, '1'), 'head': (var, 'head')}
    seen = set()

    class Counting(nn.Module):
        def __init__(self, name, inner):
            super().__init__()
            self.name, self.inner = name, inner

        def forward(self, x):
            seen.add(self.name)
            return self.inner(x)

    originals = {name: getattr(parent, attr) for name, (parent, attr) in targets.items()}
    for name, (parent, attr) in targets.items():
        setattr(parent, attr, Counting(name, originals[name]))
    try:
        _sample(var, vae, torch.tensor([4]))
        assert seen == set(targets)
        seen.clear()
        var(torch.tensor([4]), vae.quantize.idxBl_to_var_input(torch.zeros(1, var.L, dtype=torch.long)))
        assert seen == set(targets)
    finally:
        for name, (parent, attr) in targets.items():
            setattr(parent, attr, originals[name])


def test_qkv_bias_is_added_after_the_module():
    attn = SelfAttention(block_idx=0, embed_dim=8, num_heads=2, attn_l2_norm=False).eval()
    with torch.no_grad():
        attn.q_bias.fill_(0.5)
        attn.v_bias.fill_(-1.0)
        captured = {}
        attn.register_forward_hook(lambda m, a, o: captured.setdefault('out', o))
        x = torch.randn(1, 3, 8)
        # zero weights: q = 0.5, k = 0 (zero_k_bias), v = -1 everywhere, so attention returns v = -1
        attn.mat_qkv.weight.zero_()
        attn.proj.weight.copy_(torch.eye(8))
        attn.proj.bias.zero_()
        out = attn(x, attn_bias=None)
    torch.testing.assert_close(out, torch.full((1, 3, 8), -1.0))


def test_kv_cache_in_place_equals_concatenation():
    torch.manual_seed(0)
    attn = SelfAttention(block_idx=0, embed_dim=16, num_heads=2, attn_l2_norm=True).eval()
    chunks = [torch.randn(2, n, 16) for n in (1, 4, 9)]
    outs = {}
    with torch.no_grad():
        for max_len in (None, 14):
            attn.kv_caching(True, max_len=max_len)
            outs[max_len] = [attn(x, attn_bias=None) for x in chunks]
            assert attn.cached_k.shape == (2, 2, 14, 8) and attn.cached_v.shape == (2, 2, 14, 8)
            attn.kv_caching(False)
        assert attn.cached_k is None and not attn.caching
    for a, b in zip(outs[None], outs[14]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_kv_cache_overflow_is_a_clear_error():
    attn = SelfAttention(block_idx=3, embed_dim=16, num_heads=2, attn_l2_norm=True).eval()
    attn.kv_caching(True, max_len=4)
    with torch.no_grad():
        attn(torch.randn(1, 3, 16), attn_bias=None)
        with pytest.raises(RuntimeError, match='block 3 holds 4 positions'):
            attn(torch.randn(1, 2, 16), attn_bias=None)


def test_teacher_forcing_input_from_list_or_tensor(tiny):
    var, vae = tiny
    idx = torch.randint(0, var.V, (3, var.L), generator=torch.Generator().manual_seed(1))
    x_tensor = vae.quantize.idxBl_to_var_input(idx)
    x_list = vae.quantize.idxBl_to_var_input(vae.quantize.split_scales(idx))
    assert x_tensor.shape == (3, var.L - var.first_l, var.Cvae)
    assert torch.equal(x_tensor, x_list)
    with pytest.raises(ValueError, match=r'\(B, 130\)'):
        vae.quantize.split_scales(idx[:, :-1])


def test_sampler_under_cpu_autocast_keeps_kv_cache_in_low_precision(tiny):
    var, vae = tiny
    dtypes = []
    hook = var.blocks[0].attn.register_forward_hook(lambda m, a, o: dtypes.append(m.cached_k.dtype))
    try:
        with torch.autocast('cpu', dtype=torch.bfloat16):
            gen = autoregressive_infer_cfg(var, vae, torch.tensor([0, 1]), rng=make_rng('cpu', 0))
    finally:
        hook.remove()
    assert set(dtypes) == {torch.bfloat16}
    assert gen.images.shape == (2, 3, 32, 32) and torch.isfinite(gen.images).all()
