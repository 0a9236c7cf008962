"""Full-size VAR presets built on the meta device match the released checkpoints' manifests exactly."""
import json

import pytest
import torch

from tests.conftest import require_shared
from VAR import presets


def _manifest(name):
    return json.loads(require_shared('manifests', f'{name}.json').read_text())


def _assert_matches(module, manifest):
    state = module.state_dict()
    assert all(t.is_meta for t in state.values())                      # nothing was allocated
    assert list(state) == list(manifest)                                # same keys, same order
    for key, t in state.items():
        shape, dtype = manifest[key]
        assert (list(t.shape), str(t.dtype)) == (shape, dtype), key


@pytest.mark.parametrize('depth', [16, 20, 24, 30])
def test_generator_matches_manifest(depth):
    var, _ = presets.build(f'var_d{depth}', device='meta')
    _assert_matches(var, _manifest(f'var_d{depth}'))
    assert (var.C, var.num_heads, var.L) == (64 * depth, depth, 680)
    for buf in ('lvl_1L', 'attn_bias_for_masking', 'blocks.0.attn.zero_k_bias'):
        assert buf in dict(var.named_buffers())


def test_tokenizer_matches_manifest():
    _, vae = presets.build('var_d16', device='meta')
    _assert_matches(vae, _manifest('vae_ch160v4096z32'))
    assert 'quantize.ema_vocab_hit_SV' in dict(vae.named_buffers())
    assert vae.image_size == 256


def test_parameter_counts_match_the_reference():
    """Parameter counts (buffers excluded) from the reference table of the released models."""
    expected = {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360, 30: 2_010_020_356}
    for depth, count in expected.items():
        var, _ = presets.build(f'var_d{depth}', device='meta')
        assert sum(p.numel() for p in var.parameters()) == count
    _, vae = presets.build('var_d16', device='meta')
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 2) == 108.95


def test_create_on_meta_allocates_nothing():
    var, vae = presets.create('var_d30', device='meta')
    assert all(p.is_meta for p in list(var.parameters()) + list(vae.parameters()))
    assert var.blocks[0].attn.mat_qkv.weight.device == torch.device('meta')
