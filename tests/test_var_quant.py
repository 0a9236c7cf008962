"""VAR + quant: the tiny pipeline end to end, and STWQ positions during KV-cache sampling."""
import numpy as np
import pytest
import torch

from quant import QuantLinear, load_quantized, quantize, recipe, save_quantized
from quant.calibration import CalibrationSet, select_calibration
from quant.modules import quantizers_of
from VAR.adapter import var_adapter
from VAR.calibrate import draw_labels, generate_raw_set
from VAR.calibrate import main as calibrate_main
from VAR.presets import create
from VAR.quantize import main as quantize_main
from VAR.sampling import autoregressive_infer_cfg, make_sample_fn


@pytest.fixture(scope="module")
def tiny_calibration():
    var, vae = create("var_tiny", seed=0)
    labels = draw_labels(8, var.num_classes, seed=0, official=False)
    raw = generate_raw_set(var, vae, labels, batch_size=4, seed=0, top_p=0.96, official_reseed=False, progress=False)
    return raw


def test_raw_set_layout(tiny_calibration):
    raw = tiny_calibration
    var, vae = create("var_tiny", seed=0)
    assert len(raw) == 16 and raw.meta["dgc_chunk"] == 4
    assert raw.meta["is_cond"] == ([True] * 4 + [False] * 4) * 2
    assert (raw.tensors["labels"][4:8] == var.num_classes).all()  # null class for the uncond half
    assert torch.equal(raw.tensors["x_BLCv_wo_first_l"][:4], raw.tensors["x_BLCv_wo_first_l"][4:8])
    # the teacher-forced replay reproduces the sampled tokens' logits: the inputs are the sampler's
    assert raw.tensors["x_BLCv_wo_first_l"].shape == (16, var.L - 1, var.Cvae)


def test_dgc_with_causal_mask_keeps_only_conditional_rows(tiny_calibration):
    """With the block-causal mask every uncond row has the same token-0 feature, so the official ratio rule
    moves to pct 1.0 (method.md §5.3); the mask-less official replay gives the degenerate 0.5."""
    var, _ = create("var_tiny", seed=0)
    masked = select_calibration(var, var_adapter(var), tiny_calibration, mode="official", batch_size=8, progress=False)
    assert masked.meta["dgc"]["pct_cond"] == 1.0
    maskless = select_calibration(var, var_adapter(var, official_maskless_replay=True), tiny_calibration,
                                  mode="official", batch_size=8, progress=False)
    assert maskless.meta["dgc"]["pct_cond"] == 0.5


@pytest.mark.parametrize("method", ["ptq4arvg", "sq+stwq"])
def test_kv_cache_sampling_uses_the_calibrated_token_groups(tiny_calibration, method):
    """Quantized teacher-forced logits (680-style full sequence, causal mask) equal the quantized KV-cache
    path fed the same tokens scale by scale: STWQ picks the same group parameters in both."""
    var, vae = create("var_tiny", seed=0)
    quantize(var, var_adapter(var), recipe(method, w_bits=6, a_bits=6, batch_size=8), tiny_calibration, progress=False)
    idx = tiny_calibration.tensors["idx_BL"][:2]
    labels = tiny_calibration.tensors["labels"][:2]
    teacher = var(torch.cat([labels, torch.full_like(labels, var.num_classes)]),
                  vae.quantize.idxBl_to_var_input(idx).repeat(2, 1, 1))
    steps = []
    autoregressive_infer_cfg(var, vae, labels, forced_idx_BL=idx, on_scale=steps.append, decode=False)
    kv = torch.cat([s.logits_BlV for s in steps], dim=1)
    assert (kv - teacher).abs().max().item() <= 1e-3 * teacher.abs().max().item()
    # and quantization really happened: FP logits differ
    fp_var, _ = create("var_tiny", seed=0)
    fp = fp_var(torch.cat([labels, torch.full_like(labels, var.num_classes)]), vae.quantize.idxBl_to_var_input(idx).repeat(2, 1, 1))
    assert (fp - teacher).abs().max().item() > 1e-3


def test_quantized_model_structure(tiny_calibration):
    var, _ = create("var_tiny", seed=0)
    quantize(var, var_adapter(var), recipe("ptq4arvg", w_bits=8, a_bits=8, batch_size=8), tiny_calibration, progress=False)
    assert isinstance(var.blocks[0].attn.mat_qkv, QuantLinear) and isinstance(var.head, QuantLinear)
    assert not isinstance(var.word_embed, QuantLinear)  # kept in FP
    assert var.blocks[0].attn.explicit_matmuls
    assert var.blocks[0].attn.mat_qkv.input_quantizer.step.numel() == len(var.patch_nums)
    assert all(q.calibrated for _, q in quantizers_of(var))


def test_tiny_pipeline_end_to_end_with_scripts(tmp_path):
    """calibrate → DGC → quantize → save → load onto a fresh model → sample → npz."""
    calib = tmp_path / "calibration.safetensors"
    state = tmp_path / "w8a8.safetensors"
    # on the CPU: random preset weights depend on the device's generator, and the test compares with a CPU model
    assert calibrate_main(["--preset", "var_tiny", "--num-labels", "8", "--batch-size", "4", "--out", str(calib),
                           "--no-progress", "--device", "cpu"]) == 0
    assert len(CalibrationSet.load(calib)) == 8
    assert (tmp_path / "calibration_raw.safetensors").exists()
    assert quantize_main(["--preset", "var_tiny", "--calibration", str(calib), "--bits", "w8a8", "--w-symmetric",
                          "--out", str(state), "--no-progress", "--device", "cpu"]) == 0
    var, vae = create("var_tiny", seed=0)
    load_quantized(var, var_adapter(var), state)
    assert var.blocks[0].attn.mat_qkv.weight_quantizer.symmetric  # --w-symmetric: exact on the INT8 kernels
    sample = make_sample_fn(var, vae, dtype="fp32")
    out = sample(np.array([1, 2, 3]), seed=5)
    assert out["images"].shape == (3, 32, 32, 3) and out["images"].dtype == np.uint8
    fp_var, _ = create("var_tiny", seed=0)
    fp = make_sample_fn(fp_var, vae, dtype="fp32")(np.array([1, 2, 3]), seed=5)
    # W8A8 stays close to FP on the FP sample's tokens, teacher-forced (sampled tokens are no measure: one early
    # change of the nearly flat random-weight distribution reshuffles everything after it)
    x_BLCv = vae.quantize.idxBl_to_var_input(torch.as_tensor(fp["idx_BL"]).long())
    with torch.no_grad():
        quantized, full = var(torch.tensor([1, 2, 3]), x_BLCv), fp_var(torch.tensor([1, 2, 3]), x_BLCv)
    error = ((quantized - full).norm() / full.norm()).item()
    assert 0 < error < 0.1, error


def test_state_for_another_depth_is_refused(tmp_path, tiny_calibration):
    var, _ = create("var_tiny", seed=0)
    handle = quantize(var, var_adapter(var), recipe("rtn"), tiny_calibration, progress=False)
    path = save_quantized(handle, tmp_path / "state.safetensors")
    other, _ = create("var_d16", device="meta")
    with pytest.raises(ValueError, match="different VAR model"):
        load_quantized(other, var_adapter(other), path)


def test_recorded_ids_rebuild_the_sampler_block_inputs(tiny_calibration):
    """The calibration set stores sampled ids; the teacher-forced input rebuilt from them is exactly the
    concatenation of the per-scale token maps the sampler fed to block 0 (both CFG halves)."""
    var, vae = create("var_tiny", seed=0)
    idx = tiny_calibration.tensors["idx_BL"][:4]
    labels = tiny_calibration.tensors["labels"][:4]
    steps = []
    autoregressive_infer_cfg(var, vae, labels, forced_idx_BL=idx, on_scale=steps.append, decode=False)
    sampler_inputs = torch.cat([s.token_map for s in steps], dim=1)  # (2B, L, C), rows [cond; uncond]
    rows = torch.cat([labels, torch.full_like(labels, var.num_classes)])
    x_BLC, _ = var.teacher_forcing_input(rows, vae.quantize.idxBl_to_var_input(idx).repeat(2, 1, 1))
    assert torch.allclose(sampler_inputs, x_BLC, atol=1e-6)


def test_deep_copied_quantized_model_tracks_its_own_positions(tiny_calibration):
    """A deep copy (e.g. before kernels.convert) must update the positions its own quantizers read."""
    import copy
    var, vae = create("var_tiny", seed=0)
    quantize(var, var_adapter(var), recipe("sq+stwq", w_bits=6, a_bits=6, batch_size=8), tiny_calibration, progress=False)
    clone = copy.deepcopy(var)
    idx, labels = tiny_calibration.tensors["idx_BL"][:2], tiny_calibration.tensors["labels"][:2]
    runs = {}
    for name, model in (("original", var), ("clone", clone)):
        steps = []
        autoregressive_infer_cfg(model, vae, labels, forced_idx_BL=idx, on_scale=steps.append, decode=False)
        runs[name] = torch.cat([s.logits_BlV for s in steps], 1)
    assert torch.equal(runs["original"], runs["clone"])


def test_faithful_mode_reproduces_the_official_settings(tmp_path, tiny_calibration):
    """--faithful: EMA statistics, the three official percentiles, plain activation MSE, mask-less replay."""
    calib = tiny_calibration.save(tmp_path / "calibration.safetensors")
    state = tmp_path / "faithful.safetensors"
    assert quantize_main(["--preset", "var_tiny", "--calibration", str(calib), "--bits", "w6a6", "--faithful",
                          "--out", str(state), "--no-progress"]) == 0
    from quant.io import read_header
    saved = read_header(state)["recipe"]
    assert saved["statistics"] == "ema" and saved["percentiles"] == [0.999, 0.9999, 0.99999]
    assert saved["range_objective"] == "activation" and saved["batch_size"] == 64
    var, _ = create("var_tiny", seed=0)
    load_quantized(var, var_adapter(var), state)
    zero_points = var.blocks[0].attn.mat_qkv.input_quantizer.zero_point
    assert zero_points.numel() == len(var.patch_nums)
