"""Real INT8 deployment of a quantized VAR: `kernels.convert` plus VAR's producer fusions.

    report = to_int8(model, attention="sdpa", kv_cache="int8")

After conversion every block's LayerNorm + adaLN modulation runs inside the quantize kernel of the layer it
feeds (mat_qkv, fc1), and the FFN's GELU inside fc2's: the activations those layers read are written once, in
int8, instead of going through memory in float for the normalisation, the modulation, the GELU, the online
transform and the quantization separately. Numerics: the fused path computes in float32 without rounding the
normalised (or GELU) activation to bf16 first; it equals the unfused INT8 model up to those roundings.
"""
from __future__ import annotations

from torch import nn

from kernels.convert import ConversionReport, Int8Linear, LayerNormModulated, convert

from .model import AdaLNSelfAttn


class FusedAdaLNSelfAttn(AdaLNSelfAttn):
    """AdaLNSelfAttn whose normalisations are handed, still to be computed, to the INT8 layers they feed."""

    def forward(self, x, cond_BD, attn_bias, ada_out=None):
        if ada_out is None:
            ada_out = self.ada_lin(cond_BD)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_out.view(-1, 1, 6, self.C).unbind(2)
        eps = self.ln_wo_grad.eps
        x = x + self.attn(LayerNormModulated(x, eps, scale1.add(1), shift1), attn_bias=attn_bias).mul_(gamma1)
        x = x + self.ffn(LayerNormModulated(x, eps, scale2.add(1), shift2)).mul(gamma2)
        return x


def fuse_int8_blocks(model: nn.Module) -> list[int]:
    """Fuse every block whose mat_qkv, fc1 and fc2 are Int8Linear; returns the indices of the blocks fused."""
    fused = []
    for index, block in enumerate(model.blocks):
        if isinstance(block, FusedAdaLNSelfAttn):
            fused.append(index)
            continue
        layers = (block.attn.mat_qkv, block.ffn.fc1, block.ffn.fc2)
        if not all(isinstance(layer, Int8Linear) for layer in layers):
            continue
        if not (isinstance(block.ffn.act, nn.GELU) and block.ffn.act.approximate == "tanh"):
            raise ValueError(f"block {index}: the FFN activation is {block.ffn.act}, not GELU(tanh); cannot fuse it")
        block.ffn.fc2.prologue = "gelu_tanh"
        block.ffn.act = nn.Identity()
        block.__class__ = FusedAdaLNSelfAttn
        fused.append(index)
    return fused


def to_int8(model: nn.Module, *, attention: str = "sdpa", kv_cache: str = "model", fuse: bool = True) -> ConversionReport:
    """Convert a quantized VAR to real INT8 in place (see kernels.convert) and fuse its producers."""
    report = convert(model, attention=attention, kv_cache=kv_cache)
    if fuse:
        fused = fuse_int8_blocks(model)
        report.notes.append(f"fused LayerNorm + adaLN modulation and GELU into the quantize kernels of "
                            f"{len(fused)} of {len(model.blocks)} blocks")
    return report
