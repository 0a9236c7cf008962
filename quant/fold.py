"""Move a per-channel input transform into the op that produces the input.

Convention used across `quant`: a linear layer y = W x + b whose input is transformed online as

    x' = x / s - p            (s > 0: per-input-channel scale, p: per-input-channel shift, shape [C_in])

has its weight set to W' = W·diag(s) and its bias to b' = b + W'·p, so y is unchanged
(`apply_input_transform`). Folding then moves "divide by s, subtract p" into the producer of x, so the
producer emits x' directly and the transform costs nothing at run time. Each fold is exact in real
arithmetic; every function computes in float64 and writes back in the parameters' own dtype.

Producers handled here:
    fold_into_modulation     AdaLN linear producing (scale, shift) chunks (VAR, RAR blocks and heads)
    fold_into_layernorm      nn.LayerNorm (MAR); affine parameters are created when absent
    fold_into_rmsnorm        RMSNorm with a `weight` (LlamaGen / PAR, torch.nn.RMSNorm); adds a bias
    fold_into_linear_output  a linear whose output channel i is the consumer's input channel i
    fold_into_sibling        not a producer: a second consumer of the same input (PAR w3 beside w1)

Folds compose: folding (s1, p1) and then (s2, p2) makes the producer emit (x / s1 - p1) / s2 - p2.
Folding changes the producer for every consumer that reads it, so a producer shared by consumers with
different transforms must not be folded; `fold_into_sibling` keeps a second consumer correct.

All functions modify the modules in place (parameter objects are kept; missing biases / affine
parameters are created as new `nn.Parameter`s, which adds keys to the state_dict: create them with
`ensure_bias`, `ensure_layernorm_affine` or `attach_rmsnorm_bias` before loading a saved folded state
into a freshly built model).
"""
from typing import Optional, Sequence

import torch
from torch import nn

# Name of the bias parameter that `fold_into_rmsnorm` registers on RMSNorm modules.
RMSNORM_FOLD_BIAS = "fold_bias"


# ----------------------------------------------------------------------------------------------
# validation and parameter plumbing

def _transform_vectors(s, p, channels: int, device: torch.device, where: str):
    """(s, p) as float64 vectors of length `channels` on `device`; p defaults to zeros."""
    s = torch.as_tensor(s).detach().to(device=device, dtype=torch.float64)
    if s.dim() != 1 or s.numel() != channels:
        raise ValueError(f"{where}: scale s has shape {tuple(s.shape)} but the transformed input has "
                         f"{channels} channels; pass a 1-D tensor with one scale per channel")
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"{where}: scale s must be finite and > 0 in every channel "
                         f"(min {s.min().item():.3g}); clamp the scales before applying them")
    if p is None:
        return s, torch.zeros_like(s)
    p = torch.as_tensor(p).detach().to(device=device, dtype=torch.float64)
    if p.shape != s.shape:
        raise ValueError(f"{where}: shift p has shape {tuple(p.shape)} but s has shape {tuple(s.shape)}; "
                         f"pass one shift per channel (or p=None for no shift)")
    if not torch.isfinite(p).all():
        raise ValueError(f"{where}: shift p has non-finite entries")
    return s, p


def _linear_weight(linear: nn.Module, where: str) -> torch.Tensor:
    weight = getattr(linear, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{where}: expected a linear layer with a 2-D `weight` [out, in], "
                         f"got {type(linear).__name__}")
    return weight


@torch.no_grad()
def _write(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def ensure_bias(linear: nn.Module) -> nn.Parameter:
    """The linear's bias, created as zeros (weight's dtype/device) when it has none."""
    weight = _linear_weight(linear, "ensure_bias")
    if getattr(linear, "bias", None) is None:
        linear.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                   requires_grad=weight.requires_grad)
    return linear.bias


def ensure_layernorm_affine(norm: nn.LayerNorm, dtype: Optional[torch.dtype] = None,
                            device: Optional[torch.device] = None) -> None:
    """Give a LayerNorm weight = 1 and bias = 0 parameters where it has none.

    `nn.LayerNorm.forward` passes `self.weight` / `self.bias` to `F.layer_norm` whatever
    `elementwise_affine` says, so assigning Parameters is enough; the flag is set for a truthful repr.
    New parameters take the dtype/device of an existing one, else the arguments, else the defaults.
    """
    if not isinstance(norm, nn.LayerNorm):
        raise ValueError(f"expected nn.LayerNorm, got {type(norm).__name__}")
    if len(norm.normalized_shape) != 1:
        raise ValueError(f"LayerNorm normalizes over {tuple(norm.normalized_shape)}; only a single "
                         f"channel dimension can carry a per-channel transform")
    existing = norm.weight if norm.weight is not None else norm.bias
    if existing is not None:
        dtype, device = existing.dtype, existing.device
    factory = dict(dtype=dtype or torch.get_default_dtype(), device=device)
    if norm.weight is None:
        norm.weight = nn.Parameter(torch.ones(norm.normalized_shape, **factory))
    if norm.bias is None:
        norm.bias = nn.Parameter(torch.zeros(norm.normalized_shape, **factory))
    norm.elementwise_affine = True


def _add_fold_bias(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    # Module-level (not a closure) so deepcopy / pickling of the module keeps a working hook.
    return output + getattr(module, RMSNORM_FOLD_BIAS)


def attach_rmsnorm_bias(norm: nn.Module) -> nn.Parameter:
    """Register a zero `fold_bias` parameter on an RMSNorm and a forward hook adding it (idempotent).

    RMSNorm has no bias, but folding a shift p needs one after the weight multiply
    (output = normalize(x)·weight + bias). Model code must stay identical to the official code (so
    official checkpoints load strictly and nothing is forked), hence the bias is added from outside by a
    forward hook; being a registered parameter it follows `.to()`, appears in the state_dict as
    `<norm>.fold_bias`, and survives deepcopy.
    """
    if RMSNORM_FOLD_BIAS in norm._parameters:
        return norm._parameters[RMSNORM_FOLD_BIAS]
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ValueError(f"attach_rmsnorm_bias: {type(norm).__name__} has no 1-D `weight` parameter; "
                         f"expected an RMSNorm with a per-channel weight")
    if hasattr(norm, RMSNORM_FOLD_BIAS):
        raise ValueError(f"{type(norm).__name__} already has a non-parameter attribute "
                         f"'{RMSNORM_FOLD_BIAS}'; cannot add the fold bias")
    norm.register_parameter(RMSNORM_FOLD_BIAS, nn.Parameter(torch.zeros_like(weight),
                                                            requires_grad=weight.requires_grad))
    norm.register_forward_hook(_add_fold_bias)
    return norm._parameters[RMSNORM_FOLD_BIAS]


# ----------------------------------------------------------------------------------------------
# consumer side

def apply_input_transform(linear: nn.Module, s, p=None) -> None:
    """Consumer side of the convention: W ← W·diag(s), b ← b + W_new·p (bias created if p is given).

    After this, feeding x / s - p gives the output that x gave before.
    """
    weight = _linear_weight(linear, "apply_input_transform")
    s, p_vec = _transform_vectors(s, p, weight.shape[1], weight.device, "apply_input_transform")
    new_weight = _f64(weight) * s
    _write(weight, new_weight)
    if p is not None:
        bias = ensure_bias(linear)
        _write(bias, _f64(bias) + new_weight @ p_vec)


def fold_into_sibling(linear: nn.Module, s, p=None) -> None:
    """Keep a second consumer of the same input correct once its producer emits x / s - p.

    E.g. LlamaGen's feed_forward.w3 reads ffn_norm's output like w1: when w1's (s, p) is folded into
    ffn_norm, w3 must absorb the same transform. This is exactly the consumer-side operation.
    """
    apply_input_transform(linear, s, p)


# ----------------------------------------------------------------------------------------------
# producer side

def fold_into_linear_output(linear: nn.Module, s, p=None) -> None:
    """Producer is a linear (output channel i = consumer input channel i): rows / s, bias → bias/s − p."""
    weight = _linear_weight(linear, "fold_into_linear_output")
    s, p_vec = _transform_vectors(s, p, weight.shape[0], weight.device, "fold_into_linear_output")
    _write(weight, _f64(weight) / s[:, None])
    if p is not None or getattr(linear, "bias", None) is not None:
        bias = ensure_bias(linear)
        _write(bias, _f64(bias) / s - p_vec)


def fold_into_modulation(linear: nn.Module, layout: Sequence[str], scale_chunk: str, shift_chunk: str,
                         s, p=None) -> None:
    """AdaLN: make LN(x)·(1 + scale) + shift come out as (LN(x)·(1 + scale) + shift) / s − p.

    `linear` produces all modulation vectors; its output rows are len(layout) equal chunks of C rows named
    by `layout` (VAR block: gamma1, gamma2, scale1, scale2, shift1, shift2; RAR block: shift_msa,
    scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp; heads: scale, shift). Only the chunks
    `scale_chunk` and `shift_chunk` change:
        scale' = (scale + 1)/s − 1     (rows / s, bias → (bias + 1)/s − 1)
        shift' = shift/s − p           (rows / s, bias → bias/s − p)
    The constant 1 of (1 + scale) becomes c = 1/s; carrying c − 1 in the scale rows' bias keeps the
    model code unchanged. Precision note: c is recovered as 1 + (c − 1) in the activation dtype, so the
    absolute error on c is about eps(dtype); fine in float32, coarse in bf16 when s is large.
    Call once per (scale, shift) pair, e.g. (scale1, shift1) for qkv and (scale2, shift2) for fc1.
    """
    where = "fold_into_modulation"
    layout = tuple(layout)
    if len(layout) == 0 or len(set(layout)) != len(layout):
        raise ValueError(f"{where}: layout {layout} must be a non-empty sequence of distinct chunk names")
    for name in (scale_chunk, shift_chunk):
        if name not in layout:
            raise ValueError(f"{where}: chunk '{name}' is not in the layout {layout}; "
                             f"use one of its names")
    if scale_chunk == shift_chunk:
        raise ValueError(f"{where}: scale_chunk and shift_chunk are both '{scale_chunk}'")
    weight = _linear_weight(linear, where)
    rows = weight.shape[0]
    if rows % len(layout):
        raise ValueError(f"{where}: the linear has {rows} output rows, not divisible into the "
                         f"{len(layout)} chunks of layout {layout}")
    channels = rows // len(layout)
    s, p = _transform_vectors(s, p, channels, weight.device, where)
    i_scale, i_shift = layout.index(scale_chunk), layout.index(shift_chunk)

    new_weight = _f64(weight).view(len(layout), channels, -1).clone()
    new_weight[[i_scale, i_shift]] /= s[:, None]
    _write(weight, new_weight.view_as(weight))

    bias = ensure_bias(linear)
    new_bias = _f64(bias).view(len(layout), channels).clone()
    new_bias[i_scale] = (new_bias[i_scale] + 1) / s - 1
    new_bias[i_shift] = new_bias[i_shift] / s - p
    _write(bias, new_bias.view_as(bias))


def fold_into_layernorm(norm: nn.LayerNorm, s, p=None, dtype: Optional[torch.dtype] = None) -> None:
    """LayerNorm producer: γ ← γ/s, β ← β/s − p.

    A norm without affine parameters first gets weight = 1 and bias = 0, in `dtype` (the activation
    dtype; default torch.get_default_dtype()); `dtype` is ignored when the norm has parameters.
    """
    where = "fold_into_layernorm"
    if not isinstance(norm, nn.LayerNorm):
        raise ValueError(f"{where}: expected nn.LayerNorm, got {type(norm).__name__}")
    if len(norm.normalized_shape) != 1:
        raise ValueError(f"{where}: LayerNorm normalizes over {tuple(norm.normalized_shape)}; only a "
                         f"single channel dimension can carry a per-channel transform")
    existing = norm.weight if norm.weight is not None else norm.bias
    device = existing.device if existing is not None else torch.as_tensor(s).device
    s, p = _transform_vectors(s, p, norm.normalized_shape[0], device, where)
    ensure_layernorm_affine(norm, dtype=dtype, device=device)
    _write(norm.weight, _f64(norm.weight) / s)
    _write(norm.bias, _f64(norm.bias) / s - p)


def fold_into_rmsnorm(norm: nn.Module, s, p=None, dtype: Optional[torch.dtype] = None) -> None:
    """RMSNorm producer: weight ← weight/s and a bias (the `fold_bias` parameter) ← bias/s − p.

    Works for any RMSNorm whose forward ends in `normalized · weight` (LlamaGen's
    `_norm(x.float()).type_as(x) * self.weight`, torch.nn.RMSNorm). The bias is added by a forward hook
    (see `attach_rmsnorm_bias` for why); it is created on the first fold that needs it and folded again
    by later folds, so successive transforms compose. A torch.nn.RMSNorm without weight first gets
    weight = 1 in `dtype` (the activation dtype; default torch.get_default_dtype()).
    """
    where = "fold_into_rmsnorm"
    if isinstance(norm, nn.RMSNorm) and norm.weight is None:
        # torch.nn.RMSNorm(elementwise_affine=False): F.rms_norm uses self.weight once it exists.
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"{where}: RMSNorm normalizes over {tuple(norm.normalized_shape)}; only a "
                             f"single channel dimension can carry a per-channel transform")
        device = torch.as_tensor(s).device
        _transform_vectors(s, p, norm.normalized_shape[0], device, where)  # validate before creating
        norm.weight = nn.Parameter(torch.ones(norm.normalized_shape, device=device,
                                              dtype=dtype or torch.get_default_dtype()))
        norm.elementwise_affine = True
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ValueError(f"{where}: {type(norm).__name__} has no 1-D `weight` parameter; expected an "
                         f"RMSNorm with a per-channel weight")
    s, p_vec = _transform_vectors(s, p, weight.numel(), weight.device, where)
    _write(weight, _f64(weight) / s)
    if p is not None or RMSNORM_FOLD_BIAS in norm._parameters:
        bias = attach_rmsnorm_bias(norm)
        _write(bias, _f64(bias) / s - p_vec)
