"""Exactness of every fold: the consumer's output is unchanged and the producer emits x / s - p."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quant.fold import (RMSNORM_FOLD_BIAS, apply_input_transform, attach_rmsnorm_bias,
                        fold_into_layernorm, fold_into_linear_output, fold_into_modulation,
                        fold_into_rmsnorm, fold_into_sibling)

F64 = torch.float64
C, D_COND, B, T = 16, 8, 3, 5     # channels, condition width, batch, tokens
EXACT = 1e-10                     # float64 folds land around 1e-14; anything near 1e-5 is a bug

VAR_LAYOUT = ("gamma1", "gamma2", "scale1", "scale2", "shift1", "shift2")
RAR_LAYOUT = ("shift_msa", "scale_msa", "gate_msa", "shift_mlp", "scale_mlp", "gate_mlp")
HEAD_LAYOUT = ("scale", "shift")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def random_transform(channels: int = C, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.exp(torch.randn(channels, generator=g, dtype=F64))   # spans roughly 0.05 .. 20
    p = torch.randn(channels, generator=g, dtype=F64)
    return s, p


class LlamaGenRMSNorm(nn.Module):
    """RMSNorm as written in LlamaGen (PAR): normalize in float32, cast back, multiply by weight."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


def randomize(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(1 + 0.3 * torch.randn(param.shape, generator=g, dtype=F64))
    return module


# ----------------------------------------------------------------------------------------------
# producers: each case returns (emit, fold) where emit() runs the producer on fixed inputs

def modulation_case(layout, scale_chunk, shift_chunk, bias=True):
    torch.manual_seed(1)
    ada_lin = nn.Linear(D_COND, len(layout) * C, bias=bias, dtype=F64)
    cond, x = torch.randn(B, D_COND, dtype=F64), torch.randn(B, T, C, dtype=F64)

    def emit():
        chunks = dict(zip(layout, ada_lin(cond).view(B, 1, len(layout), C).unbind(2)))
        return F.layer_norm(x, (C,)) * (1 + chunks[scale_chunk]) + chunks[shift_chunk]

    return emit, lambda s, p: fold_into_modulation(ada_lin, layout, scale_chunk, shift_chunk, s, p)


def norm_case(norm: nn.Module):
    x = torch.randn(B, T, C, dtype=F64, generator=torch.Generator().manual_seed(2))
    fold = fold_into_layernorm if isinstance(norm, nn.LayerNorm) else fold_into_rmsnorm
    # dtype only matters for norms without affine parameters: they get them in the activation dtype
    return lambda: norm(x), lambda s, p: fold(norm, s, p, dtype=F64)


def linear_output_case(bias: bool):
    torch.manual_seed(3)
    producer = nn.Linear(2 * C, C, bias=bias, dtype=F64)
    x = torch.randn(B, T, 2 * C, dtype=F64)
    return lambda: producer(x), lambda s, p: fold_into_linear_output(producer, s, p)


CASES = {
    "var_block_pair1": lambda: modulation_case(VAR_LAYOUT, "scale1", "shift1"),
    "var_block_pair2": lambda: modulation_case(VAR_LAYOUT, "scale2", "shift2"),
    "rar_block_msa": lambda: modulation_case(RAR_LAYOUT, "scale_msa", "shift_msa"),
    "rar_block_mlp": lambda: modulation_case(RAR_LAYOUT, "scale_mlp", "shift_mlp"),
    "head": lambda: modulation_case(HEAD_LAYOUT, "scale", "shift"),
    "head_without_bias": lambda: modulation_case(HEAD_LAYOUT, "scale", "shift", bias=False),
    "layernorm": lambda: norm_case(randomize(nn.LayerNorm(C, dtype=F64), 4)),
    "layernorm_no_affine": lambda: norm_case(nn.LayerNorm(C, elementwise_affine=False, dtype=F64)),
    "layernorm_no_bias": lambda: norm_case(randomize(nn.LayerNorm(C, bias=False, dtype=F64), 5)),
    "llamagen_rmsnorm": lambda: norm_case(randomize(LlamaGenRMSNorm(C).to(F64), 6)),
    "torch_rmsnorm": lambda: norm_case(randomize(nn.RMSNorm(C, dtype=F64), 7)),
    "torch_rmsnorm_no_affine": lambda: norm_case(nn.RMSNorm(C, elementwise_affine=False, dtype=F64)),
    "linear_output": lambda: linear_output_case(bias=True),
    "linear_output_without_bias": lambda: linear_output_case(bias=False),
}


@pytest.mark.parametrize("case", CASES)
def test_fold_emits_transformed_input_and_keeps_consumer_output(case):
    emit, fold = CASES[case]()
    consumer = nn.Linear(C, 24, dtype=F64)
    s, p = random_transform()
    with torch.no_grad():
        before = emit()
        expected = consumer(before)
        apply_input_transform(consumer, s, p)
        fold(s, p)
        after = emit()
        assert rel_err(after, before / s - p) <= EXACT
        assert rel_err(consumer(after), expected) <= EXACT


@pytest.mark.parametrize("case", CASES)
def test_successive_folds_compose(case):
    emit, fold = CASES[case]()
    consumer = nn.Linear(C, 24, dtype=F64)
    (s1, p1), (s2, p2) = random_transform(seed=10), random_transform(seed=11)
    with torch.no_grad():
        before = emit()
        expected = consumer(before)
        for s, p in ((s1, p1), (s2, p2)):
            apply_input_transform(consumer, s, p)
            fold(s, p)
        after = emit()
        assert rel_err(after, (before / s1 - p1) / s2 - p2) <= EXACT
        assert rel_err(consumer(after), expected) <= EXACT


def test_var_block_folds_two_pairs_independently():
    torch.manual_seed(0)
    ada_lin = nn.Linear(D_COND, 6 * C, dtype=F64)
    qkv, fc1 = nn.Linear(C, 3 * C, dtype=F64), nn.Linear(C, 4 * C, dtype=F64)
    cond, x = torch.randn(B, D_COND, dtype=F64), torch.randn(B, T, C, dtype=F64)
    original = copy.deepcopy(ada_lin)

    def modulated():
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_lin(cond).view(B, 1, 6, C).unbind(2)
        ln = F.layer_norm(x, (C,))
        return ln * (1 + scale1) + shift1, ln * (1 + scale2) + shift2

    (s1, p1), (s2, p2) = random_transform(seed=1), random_transform(seed=2)
    with torch.no_grad():
        attn_in, ffn_in = modulated()
        expected_qkv, expected_fc1 = qkv(attn_in), fc1(ffn_in)
        apply_input_transform(qkv, s1, p1)
        fold_into_modulation(ada_lin, VAR_LAYOUT, "scale1", "shift1", s1, p1)
        apply_input_transform(fc1, s2, p2)
        fold_into_modulation(ada_lin, VAR_LAYOUT, "scale2", "shift2", s2, p2)
        new_attn_in, new_ffn_in = modulated()

    assert rel_err(new_attn_in, attn_in / s1 - p1) <= EXACT
    assert rel_err(new_ffn_in, ffn_in / s2 - p2) <= EXACT
    assert rel_err(qkv(new_attn_in), expected_qkv) <= EXACT
    assert rel_err(fc1(new_ffn_in), expected_fc1) <= EXACT
    # gamma rows (gate of the residual) are untouched, bit for bit
    assert torch.equal(ada_lin.weight[:2 * C], original.weight[:2 * C])
    assert torch.equal(ada_lin.bias[:2 * C], original.bias[:2 * C])
    # the constant 1 of (1 + scale) now lives in the scale rows' bias as 1/s - 1
    assert torch.allclose(ada_lin.bias[2 * C:3 * C], (original.bias[2 * C:3 * C] + 1) / s1 - 1)


def test_par_ffn_norm_fold_with_sibling_w3():
    # LlamaGen SwiGLU: w2(silu(w1(h)) * w3(h)), h = ffn_norm(x); w1's transform is folded into ffn_norm
    torch.manual_seed(0)
    ffn_norm = randomize(LlamaGenRMSNorm(C).to(F64), 1)
    w1, w3 = nn.Linear(C, 40, bias=False, dtype=F64), nn.Linear(C, 40, bias=False, dtype=F64)
    w2 = nn.Linear(40, C, bias=False, dtype=F64)
    x = torch.randn(B, T, C, dtype=F64)
    s, p = random_transform()

    def ffn():
        h = ffn_norm(x)
        return w2(F.silu(w1(h)) * w3(h))

    with torch.no_grad():
        expected = ffn()
        apply_input_transform(w1, s, p)
        fold_into_rmsnorm(ffn_norm, s, p)
        fold_into_sibling(w3, s, p)
        assert rel_err(ffn(), expected) <= EXACT
    assert w3.bias is not None and w3.bias.dtype == F64


def test_float32_modules_keep_dtype_and_stay_within_float32_error():
    torch.manual_seed(0)
    ada_lin, head = nn.Linear(D_COND, 2 * C), nn.Linear(C, 32)
    cond, x = torch.randn(B, D_COND), torch.randn(B, T, C)
    s, p = (t.float() for t in random_transform())

    def logits():
        scale, shift = ada_lin(cond).view(B, 1, 2, C).unbind(2)
        return head(F.layer_norm(x, (C,)) * (1 + scale) + shift)

    with torch.no_grad():
        expected = logits()
        apply_input_transform(head, s, p)
        fold_into_modulation(ada_lin, HEAD_LAYOUT, "scale", "shift", s, p)
        assert rel_err(logits(), expected) <= 1e-5
    assert ada_lin.weight.dtype == ada_lin.bias.dtype == head.weight.dtype == torch.float32


def test_apply_input_transform_without_shift_creates_no_bias():
    torch.manual_seed(0)
    linear = nn.Linear(C, 8, bias=False, dtype=F64)
    x = torch.randn(4, C, dtype=F64)
    s, _ = random_transform()
    with torch.no_grad():
        expected = linear(x)
        apply_input_transform(linear, s)
        assert linear.bias is None
        assert rel_err(linear(x / s), expected) <= EXACT


def test_layernorm_without_affine_gets_parameters_in_state_dict():
    norm = nn.LayerNorm(C, elementwise_affine=False, dtype=F64)
    s, p = random_transform()
    fold_into_layernorm(norm, s, p, dtype=F64)
    assert norm.elementwise_affine
    state = norm.state_dict()
    assert set(state) == {"weight", "bias"}
    assert torch.allclose(state["weight"], 1 / s) and torch.allclose(state["bias"], -p)
    # default dtype for created parameters is torch's default dtype
    norm32 = nn.LayerNorm(C, elementwise_affine=False)
    fold_into_layernorm(norm32, s, p)
    assert norm32.weight.dtype == norm32.bias.dtype == torch.get_default_dtype()


@pytest.mark.parametrize("make_norm", [lambda: LlamaGenRMSNorm(C).to(F64), lambda: nn.RMSNorm(C, dtype=F64)])
def test_rmsnorm_fold_bias_is_one_parameter_one_hook_and_round_trips(make_norm):
    norm = randomize(make_norm(), 3)
    x = torch.randn(B, T, C, dtype=F64)
    for seed in (1, 2):
        fold_into_rmsnorm(norm, *random_transform(seed=seed))
    assert len(norm._forward_hooks) == 1
    assert RMSNORM_FOLD_BIAS in norm.state_dict()
    with torch.no_grad():
        expected = norm(x)
        assert torch.equal(copy.deepcopy(norm)(x), expected)
        # a saved folded state loads onto a fresh module once the bias slot exists
        fresh = make_norm()
        attach_rmsnorm_bias(fresh)
        fresh.load_state_dict(norm.state_dict(), strict=True)
        assert torch.equal(fresh(x), expected)


# ----------------------------------------------------------------------------------------------
# errors

def test_mismatched_sizes_are_rejected():
    s, p = random_transform()
    with pytest.raises(ValueError, match="one scale per channel"):
        apply_input_transform(nn.Linear(C + 1, 4), s, p)
    with pytest.raises(ValueError, match="one shift per channel"):
        apply_input_transform(nn.Linear(C, 4), s, p[:-1])
    with pytest.raises(ValueError, match="not divisible"):
        fold_into_modulation(nn.Linear(D_COND, 6 * C + 1), VAR_LAYOUT, "scale1", "shift1", s, p)
    with pytest.raises(ValueError, match="one scale per channel"):
        fold_into_modulation(nn.Linear(D_COND, 6 * (C + 2)), VAR_LAYOUT, "scale1", "shift1", s, p)
    with pytest.raises(ValueError, match="one scale per channel"):
        fold_into_layernorm(nn.LayerNorm(C - 1), s, p)
    with pytest.raises(ValueError, match="one scale per channel"):
        fold_into_rmsnorm(LlamaGenRMSNorm(2 * C), s, p)
    with pytest.raises(ValueError, match="one scale per channel"):
        fold_into_linear_output(nn.Linear(8, C + 3), s, p)
    with pytest.raises(ValueError, match="no 1-D `weight`"):
        fold_into_rmsnorm(nn.Identity(), s, p)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_or_non_finite_scale_is_rejected_and_nothing_changes(bad):
    s, p = random_transform()
    s[3] = bad
    ada_lin = nn.Linear(D_COND, 2 * C)
    original = copy.deepcopy(ada_lin.state_dict())
    with pytest.raises(ValueError, match="finite and > 0"):
        fold_into_modulation(ada_lin, HEAD_LAYOUT, "scale", "shift", s, p)
    for name, value in ada_lin.state_dict().items():
        assert torch.equal(value, original[name])
    norm = nn.LayerNorm(C, elementwise_affine=False)
    with pytest.raises(ValueError, match="finite and > 0"):
        fold_into_layernorm(norm, s, p)
    assert norm.weight is None  # no half-done fold


def test_bad_chunk_names_are_rejected():
    s, p = random_transform()
    ada_lin = nn.Linear(D_COND, 6 * C)
    with pytest.raises(ValueError, match="'scale3' is not in the layout"):
        fold_into_modulation(ada_lin, VAR_LAYOUT, "scale3", "shift1", s, p)
    with pytest.raises(ValueError, match="'shift' is not in the layout"):
        fold_into_modulation(ada_lin, RAR_LAYOUT, "scale_msa", "shift", s, p)
    with pytest.raises(ValueError, match="both 'scale1'"):
        fold_into_modulation(ada_lin, VAR_LAYOUT, "scale1", "scale1", s, p)
    with pytest.raises(ValueError, match="distinct chunk names"):
        fold_into_modulation(ada_lin, ("scale", "scale", "shift", "a", "b", "c"), "scale", "shift", s, p)
