"""VAR sampling: filtering conventions, guidance ramp, RNG protocol, output conversion, the sample CLI."""
import math
import sys

import numpy as np
import pytest
import torch

from VAR import presets
from VAR.sample import main as sample_main
from VAR.sampling import (autoregressive_infer_cfg, decode_f_hat, make_rng, make_sample_fn, to_uint8,
                          top_k_top_p_filter)

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def tiny():
    return presets.create('var_tiny', seed=0)


def test_top_k_keeps_ties():
    logits = torch.tensor([[[3.0, 2.0, 2.0, 2.0, 1.0]]])
    kept = top_k_top_p_filter(logits, top_k=2) > -math.inf
    assert kept.tolist() == [[[True, True, True, True, False]]]    # the 2nd largest value has 3 copies
    assert (top_k_top_p_filter(logits, top_k=5) > -math.inf).all()  # k >= V keeps everything


def test_top_p_uses_var_ascending_convention():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    logits = probs.log().view(1, 1, -1)
    # ascending cumulative probabilities: 0.0625, 0.125, 0.25, 0.5, 1.0; drop those <= 1 - top_p
    assert (top_k_top_p_filter(logits, top_p=0.8) > -math.inf).tolist() == [[[True, True, True, False, False]]]
    assert (top_k_top_p_filter(logits, top_p=0.96) > -math.inf).all()
    # the largest token survives even when its cumulative probability is below the threshold
    assert (top_k_top_p_filter(logits, top_p=1e-9) > -math.inf).tolist() == [[[True, False, False, False, False]]]


def test_guidance_ramps_linearly_over_the_scales(tiny):
    var, vae = tiny
    idx = torch.randint(0, var.V, (2, var.L), generator=torch.Generator().manual_seed(0))
    steps = []
    autoregressive_infer_cfg(var, vae, torch.tensor([3, 4]), cfg=1.5, forced_idx_BL=idx, on_scale=steps.append, decode=False)
    SN = len(var.patch_nums)
    for s in steps:
        t = 1.5 * s.si / (SN - 1)
        cond, uncond = s.logits_BlV[:2], s.logits_BlV[2:]
        torch.testing.assert_close(s.guided_BlV, (1 + t) * cond - t * uncond, atol=0, rtol=0)
    assert torch.equal(steps[0].guided_BlV, steps[0].logits_BlV[:2])   # no guidance at the first scale
    assert torch.equal(torch.cat([s.idx_Bl for s in steps], 1), idx)


def test_rng_protocol_is_one_multinomial_per_scale_on_the_flattened_matrix(tiny):
    var, vae = tiny
    labels = torch.tensor([7, 8, 9])
    gen = autoregressive_infer_cfg(var, vae, labels, rng=make_rng('cpu', 123), top_k=50, top_p=0.9, decode=False)
    steps = []
    autoregressive_infer_cfg(var, vae, labels, forced_idx_BL=gen.idx_BL, on_scale=steps.append, decode=False)
    replay = torch.Generator().manual_seed(123)
    drawn = []
    for s in steps:
        probs = top_k_top_p_filter(s.guided_BlV, 50, 0.9).softmax(-1)
        drawn.append(torch.multinomial(probs.view(-1, var.V), 1, replacement=True, generator=replay).view(3, -1))
    assert torch.equal(torch.cat(drawn, 1), gen.idx_BL)


def test_same_seed_same_images_other_seed_other_images(tiny):
    var, vae = tiny
    labels = torch.tensor([1, 2])
    a = autoregressive_infer_cfg(var, vae, labels, rng=make_rng('cpu', 5))
    b = autoregressive_infer_cfg(var, vae, labels, rng=make_rng('cpu', 5), reuse_ada_lin=False, decode_chunk=1)
    c = autoregressive_infer_cfg(var, vae, labels, rng=make_rng('cpu', 6))
    assert torch.equal(a.idx_BL, b.idx_BL)
    torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=0)   # decoding one by one: other kernels
    assert not torch.equal(a.idx_BL, c.idx_BL)
    assert a.images.shape == (2, 3, 32, 32) and 0 <= a.images.min() and a.images.max() <= 1


def test_decoding_equals_the_official_expression(tiny):
    var, vae = tiny
    f_hat = torch.randn(3, var.Cvae, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = vae.fhat_to_img(f_hat.clone()).add(1).mul(0.5)
    # chunks only change the kernels' reduction order
    torch.testing.assert_close(decode_f_hat(vae, f_hat, chunk=2), expected, atol=1e-5, rtol=0)
    assert torch.equal(decode_f_hat(vae, f_hat, chunk=None), expected)


def test_uint8_conversion_truncates():
    images = torch.tensor([0.0, 0.5, 0.999, 1.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert to_uint8(images)[0, 0, :, 0].tolist() == [0, 127, 254, 255]
    assert to_uint8(images).shape == (1, 1, 4, 3)


def test_sample_fn_returns_uint8_images_and_token_ids(tiny):
    var, vae = tiny
    out = make_sample_fn(var, vae, dtype='fp32')(np.array([0, 999]), seed=3)
    assert out['images'].shape == (2, 32, 32, 3) and out['images'].dtype == np.uint8
    assert out['idx_BL'].shape == (2, var.L) and out['idx_BL'].dtype == np.int16
    gen = autoregressive_infer_cfg(var, vae, torch.tensor([0, 999]), rng=make_rng('cpu', 3))
    assert np.array_equal(out['idx_BL'], gen.idx_BL.numpy())
    with pytest.raises(ValueError, match='fp16'):
        make_sample_fn(var, vae, dtype='int8')


def test_sample_cli_end_to_end_and_resume(tmp_path):
    common = ['--preset', 'var_tiny', '--per-class', '1', '--classes', '0-9', '--batch-size', '4', '--no-progress']
    assert sample_main(common + ['--out', str(tmp_path / 'full')]) == 0
    reference = (tmp_path / 'full' / 'samples.npz').read_bytes()
    with np.load(tmp_path / 'full' / 'samples.npz') as z:
        assert z['arr_0'].shape == (10, 32, 32, 3) and z['labels'].tolist() == list(range(10))
        assert z['idx_BL'].shape == (10, 130)
    assert (tmp_path / 'full' / 'grid.png').exists()

    assert sample_main(common + ['--out', str(tmp_path / 'cut'), '--max-batches', '1']) == 0
    assert not (tmp_path / 'cut' / 'samples.npz').exists()
    assert sample_main(common + ['--out', str(tmp_path / 'cut')]) == 0
    assert (tmp_path / 'cut' / 'samples.npz').read_bytes() == reference


def test_sample_cli_rejects_bad_classes(tmp_path):
    with pytest.raises(SystemExit, match=r'outside \[0, 1000\)'):
        sample_main(['--preset', 'var_tiny', '--classes', '5-1000', '--out', str(tmp_path)])


def test_quant_state_needs_the_quant_io_module(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'quant.io', None)      # as if the module were not installed
    with pytest.raises(SystemExit, match='--quant-state needs quant.io.load_quantized'):
        sample_main(['--preset', 'var_tiny', '--quant-state', str(tmp_path / 'q.safetensors'), '--out', str(tmp_path)])


def test_sample_cli_applies_a_quant_state(tmp_path):
    from quant import quantize, recipe, save_quantized
    from VAR.adapter import var_adapter
    from VAR.calibrate import generate_raw_set

    var, vae = presets.create('var_tiny', seed=0)
    raw = generate_raw_set(var, vae, torch.arange(4), batch_size=4, seed=0, top_p=0.96, official_reseed=False,
                           progress=False)
    state = save_quantized(quantize(var, var_adapter(var), recipe('rtn', w_bits=4, a_bits=4), raw, progress=False),
                           tmp_path / 'w4a4.safetensors')
    common = ['--preset', 'var_tiny', '--per-class', '1', '--classes', '0-3', '--batch-size', '4', '--no-progress']
    assert sample_main(common + ['--out', str(tmp_path / 'fp')]) == 0
    assert sample_main(common + ['--out', str(tmp_path / 'q'), '--quant-state', str(state)]) == 0
    with np.load(tmp_path / 'fp' / 'samples.npz') as fp, np.load(tmp_path / 'q' / 'samples.npz') as q:
        assert q['arr_0'].shape == fp['arr_0'].shape
        assert not np.array_equal(q['idx_BL'], fp['idx_BL'])     # the quantized model samples other tokens
    with pytest.raises(SystemExit, match='not found'):
        sample_main(common + ['--out', str(tmp_path / 'q2'), '--quant-state', str(tmp_path / 'missing.safetensors')])


def test_sample_cli_runs_the_int8_deployment(tmp_path):
    """--int8 / --int8-kv-cache / --fused-decoder on the CPU reference kernels: a complete run, recorded in the
    run's description; the options refuse to run without what they need."""
    import json

    from quant import quantize, recipe, save_quantized
    from VAR.adapter import var_adapter
    from VAR.calibrate import generate_raw_set

    var, vae = presets.create('var_tiny', seed=0)
    raw = generate_raw_set(var, vae, torch.arange(4), batch_size=4, seed=0, top_p=0.96, official_reseed=False,
                           progress=False)
    state = save_quantized(quantize(var, var_adapter(var), recipe('ptq4arvg', w_bits=8, a_bits=8, w_symmetric=True),
                                    raw, progress=False), tmp_path / 'w8a8.safetensors')
    common = ['--preset', 'var_tiny', '--per-class', '1', '--classes', '0-3', '--batch-size', '4', '--no-progress',
              '--quant-state', str(state)]
    assert sample_main(common + ['--out', str(tmp_path / 'fake')]) == 0
    assert sample_main(common + ['--out', str(tmp_path / 'int8'), '--int8', '--int8-kv-cache', '--fused-decoder']) == 0
    with np.load(tmp_path / 'fake' / 'samples.npz') as fake, np.load(tmp_path / 'int8' / 'samples.npz') as int8:
        assert int8['arr_0'].shape == fake['arr_0'].shape and int8['arr_0'].dtype == np.uint8
        # the INT8 model differs from fake quant by rounding only: most tokens agree
        assert (int8['idx_BL'] == fake['idx_BL']).mean() > 0.5
    if torch.cuda.is_available():  # the graphed INT8 run samples the eager INT8 run's tokens
        for name, extra in (('eager', []), ('graphs', ['--cuda-graphs'])):
            assert sample_main(common + ['--out', str(tmp_path / name), '--int8', '--int8-kv-cache', '--dtype',
                                         'bf16'] + extra) == 0
        with np.load(tmp_path / 'eager' / 'samples.npz') as eager, np.load(tmp_path / 'graphs' / 'samples.npz') as g:
            assert np.array_equal(eager['idx_BL'], g['idx_BL'])
    manifest = next((tmp_path / 'int8').glob('*.json'))
    description = json.loads(manifest.read_text())['description']
    assert description['deployment'] == 'int8 + int8 kv cache' and description['fused_decoder'] is True
    with pytest.raises(SystemExit, match='give its --quant-state'):
        sample_main(common[:-2] + ['--out', str(tmp_path / 'x'), '--int8'])
    with pytest.raises(SystemExit, match='add --int8'):
        sample_main(common + ['--out', str(tmp_path / 'y'), '--int8-kv-cache'])
    with pytest.raises(SystemExit, match='--cuda-graphs needs a CUDA device'):
        sample_main(common + ['--out', str(tmp_path / 'z'), '--cuda-graphs', '--device', 'cpu'])
