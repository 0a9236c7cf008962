"""`quantize(model, adapter, recipe, calibration)`: the single entry point of the library.

Order for the ptq4arvg recipe (official pipeline): SmoothQuant α = 0.5 → per-channel calibration →
symmetric shift, folded → per-channel re-calibration → GPS factor, folded → switch to STWQ → final
calibration of all quantizers. Transform statistics are gathered with quantization off (the official GPS
step runs with quantization disabled too); sink tokens are excluded from them.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import fold as folding
from .adapter import Adapter, LayerSpec
from .calibration import CalibrationSet, gather_tokens, replay, token_mask
from .context import TokenPositions
from .modules import QuantLinear, QuantMatMul, quantizers_of
from .quantizers import Granularity, LogSqrt2Quantizer, UniformQuantizer
from .recipes import Recipe
from .transforms import dominant_channel_error, gps_scale, smoothquant_scale, symmetric_shift

log = logging.getLogger("quant")


@dataclass
class QuantizedModel:
    """Handle returned by `quantize`: the model (modified in place) and what was done to it."""

    model: nn.Module
    adapter: Adapter
    recipe: Recipe
    positions: TokenPositions
    transforms: dict[str, list[str]] = field(default_factory=dict)
    hook: Any = None

    def summary(self) -> str:
        return summary_table(self)


# ----------------------------------------------------------------------------------------- structure
def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at `path` (dotted) by `module`."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def _input_quantizer(spec: LayerSpec, recipe: Recipe, positions: TokenPositions) -> UniformQuantizer:
    groups = spec.token_groups if recipe.token_wise else None
    return UniformQuantizer(
        recipe.a_bits, granularity=Granularity.TOKEN_GROUPS if groups else Granularity.TENSOR,
        token_groups=groups, positions=positions, range_method=recipe.range_method,
        percentiles=recipe.percentiles, statistics=recipe.statistics, max_samples=recipe.max_samples,
        zero_in_range=recipe.zero_in_range)


def _weight_quantizer(linear: nn.Linear, recipe: Recipe) -> UniformQuantizer:
    return UniformQuantizer(recipe.w_bits, recipe.w_symmetric, granularity=Granularity.OUT_CHANNEL, size=linear.out_features,
                            range_method=recipe.range_method, percentiles=recipe.percentiles,
                            zero_in_range=recipe.zero_in_range).to(linear.weight.device)


def _operand_quantizer(recipe: Recipe, kind: str = "uniform"):
    if kind == "log2":
        return LogSqrt2Quantizer(recipe.a_bits, percentiles=recipe.percentiles, max_samples=recipe.max_samples)
    return UniformQuantizer(recipe.a_bits, range_method=recipe.range_method, percentiles=recipe.percentiles,
                            statistics=recipe.statistics, max_samples=recipe.max_samples,
                            zero_in_range=recipe.zero_in_range)


def wrap_modules(model: nn.Module, adapter: Adapter, recipe: Recipe, positions: TokenPositions) -> None:
    """Replace the adapter's linears and matmul hook points by their quantized versions (uncalibrated)."""
    for spec in adapter.layers:
        linear = model.get_submodule(spec.path)
        device = linear.weight.device
        set_module(model, spec.path, QuantLinear.from_linear(
            linear, _weight_quantizer(linear, recipe), _input_quantizer(spec, recipe, positions).to(device)))
    if recipe.quantize_attention and adapter.matmuls:
        for spec in adapter.matmuls:
            set_module(model, spec.path, QuantMatMul(_operand_quantizer(recipe, spec.a_kind), _operand_quantizer(recipe)))
        for path in adapter.attention_modules:
            model.get_submodule(path).explicit_matmuls = True
    device = next(model.parameters()).device
    for _, quantizer in quantizers_of(model):
        quantizer.to(device)


def layer_map(adapter: Adapter, recipe: Recipe) -> list[dict[str, str]]:
    """What every module will get, without touching the model (the dry run)."""
    rows = []
    for spec in adapter.layers:
        groups = spec.token_groups if recipe.token_wise else None
        act = f"A{recipe.a_bits} " + (f"token groups ({groups.num_groups})" if groups else "per-tensor")
        transform = "-"
        if spec.fold is not None and recipe.transform != "none":
            steps = {"sq": f"SQ α={recipe.sq_alpha}", "gps": "SQ → shift → GPS"}[recipe.transform]
            transform = f"{steps} → {spec.fold.kind} {spec.fold.path}"
            if spec.siblings:
                transform += f" (+{', '.join(spec.siblings)})"
        rows.append({"module": spec.path, "role": spec.role, "weight": f"W{recipe.w_bits} per-channel asym",
                     "input": act, "transform": transform})
    if recipe.quantize_attention:
        for spec in adapter.matmuls:
            a = "log-√2" if spec.a_kind == "log2" else "uniform"
            rows.append({"module": spec.path, "role": f"matmul {spec.role}", "weight": "-",
                         "input": f"A{recipe.a_bits} per-tensor ({a}, uniform)", "transform": "-"})
    for path in adapter.kept_in_fp:
        rows.append({"module": path, "role": "kept in FP", "weight": "-", "input": "-", "transform": "-"})
    return rows


def format_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(empty)"
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys), "  ".join("-" * widths[k] for k in keys)]
    lines += ["  ".join(str(r[k]).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- statistics
class _AbsMax:
    def __init__(self) -> None:
        self.value = None

    def update(self, rows: torch.Tensor) -> None:
        current = rows.detach().abs().amax(0).float()
        self.value = current if self.value is None else torch.maximum(self.value, current)


class _ChannelQuantizer:
    """Per-input-channel asymmetric quantizer fitted over the whole set (shift and GPS statistics)."""

    def __init__(self, channels: int, recipe: Recipe, device) -> None:
        self.quantizer = UniformQuantizer(recipe.a_bits, granularity=Granularity.IN_CHANNEL, size=channels,
                                          percentiles=recipe.percentiles, max_samples=recipe.max_samples,
                                          zero_in_range=recipe.zero_in_range).to(device)
        self.quantizer.start_observing()
        self.range = None

    def update(self, rows: torch.Tensor) -> None:
        self.quantizer._observe(rows, None)

    def finish(self) -> None:
        lo, hi = self.quantizer.observed_range()
        self.range = hi - lo
        self.quantizer.finish_observing()


class _GPSNorms:
    """Σ_t X_it² and Σ_t (X_it − Q_k(X_it))² for every channel i."""

    def __init__(self, step_k: torch.Tensor, zero_k: torch.Tensor, bits: int) -> None:
        self.step_k, self.zero_k, self.bits = step_k, zero_k, bits
        self.sq = self.err = 0.0

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float()
        self.sq = self.sq + rows.pow(2).sum(0)
        self.err = self.err + dominant_channel_error(rows, self.step_k, self.zero_k, self.bits).pow(2).sum(0)


def _collect(model: nn.Module, adapter: Adapter, specs: Iterable[LayerSpec], calibration: CalibrationSet,
             recipe: Recipe, positions: TokenPositions, device, make: Callable[[LayerSpec, QuantLinear], Any],
             desc: str, progress: bool) -> dict[str, Any]:
    """Run the calibration set with quantization off and feed each layer's transformed input (sink tokens
    excluded) to a statistic object."""
    stats, handles = {}, []
    for spec in specs:
        layer = model.get_submodule(spec.path)
        stats[spec.path] = stat = make(spec, layer)
        # Sink tokens with their own STWQ group are kept out of the transform statistics; when the layer's
        # activation quantizer is per tensor they share its range and must be counted.
        sink_tokens = adapter.sink_tokens if recipe.token_wise and spec.token_groups is not None else 0

        def hook(module, inputs, output, stat=stat, sink_tokens=sink_tokens):
            keep = token_mask(positions, output.shape[-2], sink_tokens, output.device)
            stat.update(gather_tokens(output, keep))

        handles.append(layer.input_transform.register_forward_hook(hook))
    try:
        with quantization_disabled(model):
            replay(model, adapter, calibration, batch_size=recipe.batch_size, device=device, desc=desc,
                   progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    return stats


class quantization_disabled:
    """Context in which every quantizer of the model passes its input through."""

    def __init__(self, model: nn.Module) -> None:
        self.quantizers = [q for _, q in quantizers_of(model)]

    def __enter__(self):
        self.saved = [q.enabled for q in self.quantizers]
        for q in self.quantizers:
            q.enabled = False

    def __exit__(self, *exc):
        for q, enabled in zip(self.quantizers, self.saved):
            q.enabled = enabled


# ------------------------------------------------------------------------------------- transforms
def apply_transform(model: nn.Module, spec: LayerSpec, scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
    """x → x/scale − shift for the layer (and its siblings), folded into the producer of its input."""
    layer = model.get_submodule(spec.path)
    ones = torch.ones(layer.in_features, dtype=torch.float64, device=layer.weight.device)
    s = ones if scale is None else scale.to(ones)
    p = torch.zeros_like(ones) if shift is None else shift.to(ones)
    folding.apply_input_transform(layer, s, p)
    for sibling in spec.siblings:
        folding.apply_input_transform(model.get_submodule(sibling), s, p)
    fold_into_producer(model, spec, s, p)


def fold_into_producer(model: nn.Module, spec: LayerSpec, s: torch.Tensor, p: torch.Tensor) -> None:
    target = spec.fold
    producer = model.get_submodule(target.path)
    if target.kind == "modulation":
        folding.fold_into_modulation(producer, target.layout, target.scale_chunk, target.shift_chunk, s, p)
    elif target.kind == "layernorm":
        folding.fold_into_layernorm(producer, s, p)
    elif target.kind == "rmsnorm":
        folding.fold_into_rmsnorm(producer, s, p)
    elif target.kind == "linear":
        folding.fold_into_linear_output(producer, s, p)
    else:
        raise ValueError(f"unknown fold target kind {target.kind!r} for {spec.path}")


def _note(result: QuantizedModel, path: str, what: str) -> None:
    result.transforms.setdefault(path, []).append(what)


def smooth(model, adapter, specs, calibration, recipe, positions, device, result, progress) -> None:
    stats = _collect(model, adapter, specs, calibration, recipe, positions, device, lambda s, l: _AbsMax(),
                     "SmoothQuant statistics", progress)
    for spec in specs:
        layer = model.get_submodule(spec.path)
        apply_transform(model, spec, smoothquant_scale(stats[spec.path].value, layer.weight, recipe.sq_alpha), None)
        _note(result, spec.path, f"sq(α={recipe.sq_alpha})")


def _channel_quantizers(model, adapter, specs, calibration, recipe, positions, device, progress, desc):
    stats = _collect(model, adapter, specs, calibration, recipe, positions, device,
                     lambda spec, layer: _ChannelQuantizer(layer.in_features, recipe, device), desc, progress)
    for stat in stats.values():
        stat.finish()
    return stats


def shift_to_symmetric(model, adapter, specs, calibration, recipe, positions, device, result, progress) -> None:
    stats = _channel_quantizers(model, adapter, specs, calibration, recipe, positions, device, progress,
                                "per-channel calibration")
    for spec in specs:
        q = stats[spec.path].quantizer
        apply_transform(model, spec, None, symmetric_shift(q.step, q.zero_point, recipe.a_bits))
        _note(result, spec.path, "shift")


def gain_projected_scaling(model, adapter, specs, calibration, recipe, positions, device, result, progress) -> None:
    channel = _channel_quantizers(model, adapter, specs, calibration, recipe, positions, device, progress,
                                  "per-channel re-calibration")
    dominant = {}
    for spec in specs:
        stat = channel[spec.path]
        k = int(torch.argmax(stat.range))
        dominant[spec.path] = (stat.quantizer.step[k], stat.quantizer.zero_point[k])
    norms = _collect(model, adapter, specs, calibration, recipe, positions, device,
                     lambda spec, layer: _GPSNorms(*dominant[spec.path], recipe.a_bits), "GPS statistics", progress)
    for spec in specs:
        layer = model.get_submodule(spec.path)
        probe = _weight_quantizer(layer, recipe)
        probe.calibrate_weight(layer.weight)
        weight_q = probe(layer.weight.detach().float())
        scale = gps_scale(norms[spec.path].sq, norms[spec.path].err, channel[spec.path].range, layer.weight,
                          weight_q, recipe.gps_alpha)
        apply_transform(model, spec, scale, None)
        _note(result, spec.path, "gps")


# ------------------------------------------------------------------------------------ calibration
def calibrate_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.weight_quantizer is not None:
            module.weight_quantizer.calibrate_weight(module.weight)


def _stages(model: nn.Module, adapter: Adapter, recipe: Recipe) -> list[tuple[int | None, list]]:
    """Activation quantizers grouped by the block they belong to, in execution order."""
    by_block: dict[int | None, list] = {}
    for spec in adapter.layers:
        q = model.get_submodule(spec.path).input_quantizer
        if q is not None:
            by_block.setdefault(spec.block, []).append(q)
    if recipe.quantize_attention:
        for spec in adapter.matmuls:
            mm = model.get_submodule(spec.path)
            by_block.setdefault(spec.block, []).extend(q for q in (mm.a_quantizer, mm.b_quantizer) if q is not None)
    if recipe.calibration_order == "joint" or not adapter.block_paths:
        return [(None, [q for qs in by_block.values() for q in qs])]
    order = sorted(k for k in by_block if k is not None) + ([None] if None in by_block else [])
    return [(k, by_block[k]) for k in order]


def set_error_weights(model: nn.Module, adapter: Adapter, recipe: Recipe) -> None:
    """Weight each input channel's error by ‖W_:,i‖² in the range search (recipe.range_objective)."""
    for spec in adapter.layers:
        layer = model.get_submodule(spec.path)
        if layer.input_quantizer is not None and recipe.range_objective == "output":
            layer.input_quantizer.channel_weights = layer.weight.detach().float().pow(2).sum(0)


def calibrate_activations(model, adapter, calibration, recipe, device, progress) -> None:
    set_error_weights(model, adapter, recipe)
    for block, quantizers in _stages(model, adapter, recipe):
        for q in quantizers:
            q.start_observing()
        # Quantizers of block b only need the forward up to the end of block b.
        last = None if block is None else model.get_submodule(adapter.block_paths[block])
        desc = "activation calibration" + ("" if block is None else f" (block {block})")
        replay(model, adapter, calibration, batch_size=recipe.batch_size, device=device, desc=desc,
               last_module=last, progress=progress)
        for q in quantizers:
            q.finish_observing()
            if not q.calibrated:
                raise RuntimeError("an activation quantizer saw no data during calibration: does the replay "
                                   "run every quantized layer?")


# ------------------------------------------------------------------------------------------ entry
def quantize(model: nn.Module, adapter: Adapter, recipe: Recipe, calibration: CalibrationSet | None = None, *,
             device: torch.device | str | None = None, dry_run: bool = False, progress: bool = True) -> QuantizedModel:
    """Quantize `model` in place with `recipe`, calibrating on `calibration` (teacher-forced sequences).

    With dry_run=True nothing is changed: the resolved layer map is printed and returned in the handle.
    """
    adapter.validate(model)
    if dry_run:
        print(f"{adapter.family}: {recipe.name}\n{format_table(layer_map(adapter, recipe))}")
        return QuantizedModel(model, adapter, recipe, TokenPositions())
    if calibration is None or len(calibration) == 0:
        raise ValueError("quantize needs a non-empty calibration set (see the family's calibrate script)")
    device = device or next(model.parameters()).device
    positions = TokenPositions()
    result = QuantizedModel(model, adapter, recipe, positions, hook=adapter.install_position_hook(model, positions))
    model.eval()
    wrap_modules(model, adapter, recipe, positions)
    transformable = [spec for spec in adapter.layers if spec.fold is not None]
    if recipe.transform in ("sq", "gps") and transformable:
        smooth(model, adapter, transformable, calibration, recipe, positions, device, result, progress)
    if recipe.transform == "gps" and transformable:
        shift_to_symmetric(model, adapter, transformable, calibration, recipe, positions, device, result, progress)
        gain_projected_scaling(model, adapter, transformable, calibration, recipe, positions, device, result, progress)
    calibrate_weights(model)
    calibrate_activations(model, adapter, calibration, recipe, device, progress)
    log.info("%s quantized with %s\n%s", adapter.family, recipe.name, summary_table(result))
    return result


# ---------------------------------------------------------------------------------------- summary
def _sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    noise = (reference - approx).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def summary_rows(handle: QuantizedModel) -> list[dict[str, str]]:
    rows = []
    for spec in handle.adapter.layers:
        layer = handle.model.get_submodule(spec.path)
        weight = layer.weight.detach().float()
        wq = layer.quantized_weight().detach().float()
        q = layer.input_quantizer
        steps = q.step.float() if q is not None and q.step.numel() else None
        rows.append({
            "module": spec.path, "role": spec.role,
            "input quantizer": "-" if q is None else q.extra_repr(),
            "transforms": " → ".join(handle.transforms.get(spec.path, [])) or "-",
            "weight SQNR dB": f"{_sqnr_db(weight, wq):.1f}",
            "act step min/max": "-" if steps is None else f"{steps.min().item():.3g}/{steps.max().item():.3g}",
        })
    return rows


def summary_table(handle: QuantizedModel) -> str:
    return format_table(summary_rows(handle))
