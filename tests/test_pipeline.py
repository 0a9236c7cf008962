import copy

import pytest
import torch
from torch import nn

from quant import CalibrationSet, LayerSpec, QuantLinear, load_quantized, quantize, recipe, save_quantized
from quant.adapter import FoldTarget
from quant.calibration import select_calibration
from quant.modules import quantizers_of
from quant.pipeline import quantization_disabled
from quant.quantizers import UniformQuantizer, fake_quantize
from quant.synthetic import SyntheticARVG, SyntheticSpec, synthetic_adapter, synthetic_batch, synthetic_calibration
from quant.transforms import gps_scale, smoothquant_scale, symmetric_shift

SMALL = SyntheticSpec(channels=64, cond_dim=32, scales=(1, 2, 3, 4), depth=2)


def mse(a, b):
    return (a - b).pow(2).mean().item()


def quantized_copy(spec, method, bits=(8, 8), seed=0, calibration=None, **options):
    model = SyntheticARVG(spec, seed=seed)
    calibration = calibration or synthetic_calibration(spec, 8, seed=1)
    options = {"batch_size": 8, **options}
    handle = quantize(model, synthetic_adapter(model), recipe(method, w_bits=bits[0], a_bits=bits[1], **options),
                      calibration, progress=False)
    return model, handle


# ------------------------------------------------------------------------------------ transforms
def test_smoothquant_scale_formula():
    act = torch.tensor([4.0, 1e-9, 9.0])
    weight = torch.tensor([[1.0, 2.0, -0.25], [-0.5, 0.5, 0.0]])
    s = smoothquant_scale(act, weight, 0.5)
    assert s.tolist() == pytest.approx([(4 / 1) ** 0.5, (1e-6 / 2) ** 0.5, (9 / 0.25) ** 0.5])


def test_symmetric_shift_centres_the_range():
    bits = 6
    x = torch.rand(1000, 3) * torch.tensor([1.0, 4.0, 10.0]) + torch.tensor([0.0, -1.0, 5.0])
    q = UniformQuantizer(bits, granularity="in_channel", size=3, percentiles=(1.0,))
    q.start_observing(), q(x), q.finish_observing()
    shifted = x - symmetric_shift(q.step, q.zero_point, bits)
    # after the shift every channel's grid minimum is −(2^(b−1) − 1)·Δ: the range is centred on 0
    lo = -q.zero_point * q.step - symmetric_shift(q.step, q.zero_point, bits)
    assert lo.tolist() == pytest.approx((-(2 ** (bits - 1) - 1) * q.step).tolist(), rel=1e-5)
    assert (shifted.amax(0) + shifted.amin(0)).abs().max() <= 2 * q.step.max() + 1e-5


def test_gps_scale_matches_the_per_channel_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) * torch.tensor([1, 2, 30, 1, 0.5, 3.0], dtype=torch.float64)
    w = torch.randn(5, 6, generator=g, dtype=torch.float64)
    wq = torch.round(w * 4) / 4
    r = x.amax(0) - x.amin(0)
    k = int(r.argmax())
    step_k, zero_k = r[k] / 63, torch.round(-x[:, k].min() / (r[k] / 63))
    err = x - fake_quantize(x, step_k, zero_k, 0, 63)
    s = gps_scale(x.pow(2).sum(0), err.pow(2).sum(0), r, w, wq, 0.5)
    s_star = r[k].sqrt() / (w[:, k].max() - w[:, k].min()).sqrt()
    for i in range(6):
        a = err[:, i].pow(2).sum() * wq[:, i].pow(2).sum()
        gain = x[:, i].pow(2).sum() * (w[:, i] - wq[:, i]).pow(2).sum()
        expected = s_star if i == k else s_star * (gain / a) ** 0.25
        assert s[i].item() == pytest.approx(expected.item(), rel=1e-5)


# --------------------------------------------------------------------------------------- modules
def test_quant_linear_disabled_equals_linear_and_caches_weight():
    linear = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    ref = linear(x)
    q = QuantLinear.from_linear(copy.deepcopy(linear), UniformQuantizer(4, granularity="out_channel", size=4), None)
    assert torch.equal(q(x), ref)  # uncalibrated quantizers pass through
    q.weight_quantizer.calibrate_weight(q.weight)
    first = q.quantized_weight()
    assert first is q.quantized_weight()  # cached
    with torch.no_grad():
        q.weight.mul_(2)
    assert not torch.equal(q.quantized_weight(), first)  # cache follows in-place edits


def test_online_input_transform_composes_exactly():
    q = QuantLinear.from_linear(nn.Linear(5, 3).double(), None, None)
    x = torch.randn(4, 5, dtype=torch.float64)
    s1, p1 = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    s2, p2 = torch.rand(5, dtype=torch.float64) + 0.5, torch.randn(5, dtype=torch.float64)
    q.input_transform.compose(s1, p1)
    q.input_transform.compose(s2, p2)
    assert torch.allclose(q.input_transform(x), ((x / s1 - p1) / s2 - p2), rtol=1e-12)


# -------------------------------------------------------------------------------------- pipeline
def test_dry_run_prints_layer_map_and_changes_nothing(capsys):
    model = SyntheticARVG(SMALL)
    before = copy.deepcopy(model.state_dict())
    quantize(model, synthetic_adapter(model), recipe("ptq4arvg"), None, dry_run=True)
    out = capsys.readouterr().out
    assert "blocks.0.fc1" in out and "SQ → shift → GPS → modulation blocks.0.ada_lin.1" in out
    assert "token groups (4)" in out and "class_emb" in out
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


@pytest.mark.parametrize("method", ["smoothquant", "ptq4arvg"])
def test_transforms_are_exact_in_full_precision(method):
    """With every quantizer off, the transformed-and-folded model computes the FP function."""
    test = synthetic_batch(SMALL, 4, seed=9)
    ref = SyntheticARVG(SMALL)(test["x"], test["labels"])
    model, _ = quantized_copy(SMALL, method)
    with quantization_disabled(model):
        out = model(test["x"], test["labels"])
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_quantized_model_is_close_at_w8a8_and_every_quantizer_is_calibrated():
    test = synthetic_batch(SMALL, 4, seed=9)
    ref = SyntheticARVG(SMALL)(test["x"], test["labels"])
    model, handle = quantized_copy(SMALL, "ptq4arvg")
    out = model(test["x"], test["labels"])
    # token 0 is the synthetic massive sink: its few huge channels dominate its own error at any setting
    assert mse(out[:, 1:], ref[:, 1:]) < 0.02 * ref[:, 1:].pow(2).mean().item()
    assert mse(out, ref) < 0.25 * ref.pow(2).mean().item()
    assert all(q.calibrated for _, q in quantizers_of(model))
    assert handle.transforms["blocks.0.fc1"] == ["sq(α=0.5)", "shift", "gps"]
    assert "weight SQNR dB" in handle.summary()


def test_sequential_and_joint_calibration_both_work():
    test = synthetic_batch(SMALL, 4, seed=9)
    ref = SyntheticARVG(SMALL)(test["x"], test["labels"])
    errors = {}
    for order in ("sequential", "joint"):
        model, _ = quantized_copy(SMALL, "sq+stwq", (6, 6), calibration_order=order)
        errors[order] = mse(model(test["x"], test["labels"])[:, 1:], ref[:, 1:])
    assert all(e < 0.1 * ref[:, 1:].pow(2).mean().item() for e in errors.values()), errors
    # the synthetic blocks read the same input (no block feeds another), so both orders see the same data
    assert errors["sequential"] == errors["joint"]


def test_method_ordering_on_synthetic_arvg_activations_w6a6():
    """The three ARVG challenges: each component of the method lowers the layer-output error."""
    spec = SyntheticSpec()
    calibration = synthetic_calibration(spec, 16, seed=1)
    test = synthetic_batch(spec, 16, seed=7)
    ref = SyntheticARVG(spec)(test["x"], test["labels"])
    errors = {}
    for method in ("rtn", "smoothquant", "sq+stwq", "ptq4arvg"):
        model, _ = quantized_copy(spec, method, (6, 6), calibration=calibration, batch_size=16)
        with torch.no_grad():
            errors[method] = mse(model(test["x"], test["labels"]), ref)
    assert errors["ptq4arvg"] < errors["sq+stwq"] < errors["smoothquant"] < errors["rtn"], errors


def test_faithful_ema_recipe_runs():
    model, handle = quantized_copy(SMALL, "ptq4arvg", statistics="ema", calibration_order="joint")
    q = model.get_submodule("blocks.0.fc1").input_quantizer
    assert q.calibrated and q.statistics == "ema"


# --------------------------------------------------------------------------------------------- io
def test_save_and_load_roundtrip(tmp_path):
    test = synthetic_batch(SMALL, 4, seed=9)
    model, handle = quantized_copy(SMALL, "ptq4arvg", (6, 6))
    expected = model(test["x"], test["labels"])
    path = save_quantized(handle, tmp_path / "state.safetensors")
    fresh = SyntheticARVG(SMALL)
    load_quantized(fresh, synthetic_adapter(fresh), path)
    assert torch.equal(fresh(test["x"], test["labels"]), expected)


def test_load_onto_another_model_fails_clearly(tmp_path):
    _, handle = quantized_copy(SMALL, "rtn")
    path = save_quantized(handle, tmp_path / "state.safetensors")
    other_spec = SyntheticSpec(channels=32, cond_dim=32, scales=(1, 2, 3, 4), depth=2)
    other = SyntheticARVG(other_spec)
    with pytest.raises(ValueError, match="different synthetic model"):
        load_quantized(other, synthetic_adapter(other), path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_quantized(other, synthetic_adapter(other), tmp_path / "missing.safetensors")


def test_calibration_set_roundtrip_and_errors(tmp_path):
    calibration = synthetic_calibration(SMALL, 4, seed=3)
    path = calibration.save(tmp_path / "calib.safetensors")
    loaded = CalibrationSet.load(path)
    assert loaded.meta == calibration.meta and torch.equal(loaded.tensors["x"], calibration.tensors["x"])
    with pytest.raises(FileNotFoundError, match="calibrate script"):
        CalibrationSet.load(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="disagree on the number of samples"):
        CalibrationSet({"a": torch.zeros(3), "b": torch.zeros(4)})


def test_dgc_selection_through_the_adapter():
    model = SyntheticARVG(SMALL)
    raw = synthetic_calibration(SMALL, 8, seed=3)
    official = select_calibration(model, synthetic_adapter(model), raw, mode="official", progress=False)
    assert len(official) == 8
    # unconditional rows share one null-class modulation but their tokens differ, so pinv distances are
    # the degenerate (n−1)/√n for both branches → the official rule keeps half of each
    assert official.meta["dgc"]["pct_cond"] == 0.5
    entropy = select_calibration(model, synthetic_adapter(model), raw, progress=False)
    assert len(entropy) == 8 and entropy.meta["dgc"]["mode"] == "entropy"


# ---------------------------------------------------------------------------------------- adapter
def test_adapter_validation_names_the_problem():
    model = SyntheticARVG(SMALL)
    adapter = synthetic_adapter(model)
    adapter.layers.append(LayerSpec("blocks.9.fc1", "fc1"))
    adapter.layers.append(LayerSpec("blocks.0.fc2", "fc2", fold=FoldTarget("layernorm", "blocks.0.norm")))
    with pytest.raises(ValueError, match=r"blocks\.0\.fc2' is listed twice(.|\n)*blocks\.9\.fc1.*missing(.|\n)*"
                                         r"fold target 'blocks\.0\.norm'"):
        quantize(model, adapter, recipe("rtn"), synthetic_calibration(SMALL, 2))


def test_recipe_parsing_and_errors():
    r = recipe("ptq4arvg-w6a6")
    assert (r.method, r.w_bits, r.a_bits, r.token_wise, r.transform) == ("ptq4arvg", 6, 6, True, "gps")
    assert r.faithful(statistics="ema").percentiles == (0.999, 0.9999, 0.99999)
    with pytest.raises(ValueError, match="unknown method"):
        recipe("gptq")
    with pytest.raises(ValueError, match="unsupported bit width"):
        recipe("rtn", w_bits=12)
    with pytest.raises(ValueError, match="non-empty calibration set"):
        model = SyntheticARVG(SMALL)
        quantize(model, synthetic_adapter(model), recipe("rtn"), None)


def test_cached_fake_quant_weight_follows_moves_and_is_not_copied():
    """The cached fake-quant weight is derived state: a device/dtype move or a deep copy must not keep the old one
    (it held a second copy of every weight on the GPU after model.cpu())."""
    import copy

    from torch import nn

    from quant import QuantLinear
    from quant.quantizers import UniformQuantizer

    layer = QuantLinear.from_linear(nn.Linear(16, 8), UniformQuantizer(8, granularity="out_channel", size=8), None)
    layer.weight_quantizer.calibrate_weight(layer.weight)
    x = torch.randn(3, 16)
    expected = layer(x)
    assert layer._cached_weight is not None
    assert copy.deepcopy(layer)._cached_weight is None
    layer.double()
    assert layer._cached_weight is None
    assert torch.allclose(layer(x.double()).float(), expected, atol=1e-5)
