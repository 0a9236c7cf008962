"""Real INT8 deployment of a quantized VAR: `kernels.convert` plus VAR's producer fusions.

    report = to_int8(model, attention="sdpa", kv_cache="int8")

After conversion each block runs as four INT8 GEMMs, the fused attention and five memory-bound kernels
(six with the INT8 KV cache):
  * mat_qkv's quantize kernel computes the block's first LayerNorm + adaLN modulation, after adding the residual
    branch the previous block left pending (x + γ₂·ffn(...));
  * one kernel splits qkv into heads, adds the q/v bias, L2-normalises q and k (times the learned temperature)
    and writes k and v straight into the KV cache, as int8 codes with the INT8 KV cache (`kernels.split_qkv`);
  * proj's quantize kernel reads the attention output in place (q's layout makes it [S, l, C] without a copy);
  * fc1's quantize kernel adds the attention branch (x + γ₁·attn(...)) and computes the second LayerNorm +
    modulation, writing the updated residual stream as it goes;
  * fc2's quantize kernel computes the GELU;
  * with the INT8 KV cache, one more kernel reads the cached codes back for the attention.
Numerics: the fused path computes in float32 without rounding the normalised (or GELU) activation to bf16 first;
it equals the unfused INT8 model up to those roundings. The residual adds, the bias, the L2 normalisation and
the K/V codes round exactly as the model's own ops do (the norm's reduction order aside).

`fuse_attention` alone applies the attention-input kernel to any VAR, INT8 or not (the like-for-like bf16
baseline of benchmarks/generate.py). `fuse_decoder` runs the VQVAE decoder's GroupNorm + SiLU pairs as one
kernel each (`kernels.group_norm_silu`); it changes images by float32 rounding of the statistics only.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kernels.convert import ConversionReport, Int8Linear, LayerNormModulated, convert
from kernels.ops import group_norm_silu, split_qkv

from .model import AdaLNSelfAttn, SelfAttention
from .vqvae import ResnetBlock


class FusedSelfAttention(SelfAttention):
    """SelfAttention whose attention inputs come from one kernel (`kernels.split_qkv`); see the module docstring.

    Used with `F.scaled_dot_product_attention`; with `explicit_matmuls` (fake-quant attention) it runs the
    model's own code."""

    def prepare(self) -> None:
        """Precompute what every call would otherwise rebuild: the qkv bias and the q temperature, float32."""
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)).detach().float()
        self.register_buffer('qkv_bias', bias, persistent=False)
        temperature = None
        if self.attn_l2_norm:
            temperature = self.scale_mul_1H11.detach().clamp_max(self.max_scale_mul).exp().float().reshape(-1)
        self.register_buffer('q_temperature', temperature, persistent=False)

    def forward(self, x, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.explicit_matmuls:
            return super().forward(x, attn_bias)
        qkv = self.mat_qkv(x)
        S, l, _ = qkv.shape
        H, c = self.num_heads, self.head_dim
        codec = self.kv_codec if self.caching else None
        stored = torch.int8 if codec is not None else qkv.dtype
        if self.caching and self.kv_capacity is not None:
            k, v = self.kv_slots(S, H, l, c, stored, qkv.device)
        else:
            k = torch.empty(S, H, l, c, dtype=stored, device=qkv.device)
            v = torch.empty_like(k)
        grid, bits = codec.grid(qkv.device) if codec is not None else (None, 8)
        q = split_qkv(qkv, H, k, v, bias=self.qkv_bias, l2_norm=self.attn_l2_norm, q_scale=self.q_temperature,
                      kv_grid=grid, kv_bits=bits)
        if self.caching:
            k, v = self._store_kv(k, v) if self.kv_capacity is None else (self.cached_k, self.cached_v)
        if codec is not None:
            k, v = codec.decode(k, v, qkv.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(S, l, H * c))


class PendingResidual(NamedTuple):
    """x + branch * gamma, left for the next block's first quantize kernel to add."""
    x: torch.Tensor
    branch: torch.Tensor
    gamma: torch.Tensor


class FusedAdaLNSelfAttn(AdaLNSelfAttn):
    """AdaLNSelfAttn whose normalisations and residual adds are handed, still to be computed, to the INT8 layers
    they feed. With `defer_residual` (every fused block but the last of a run) it returns its FFN branch as a
    PendingResidual instead of adding it."""

    defer_residual = False

    def forward(self, x, cond_BD, attn_bias, ada_out=None):
        if ada_out is None:
            ada_out = self.ada_lin(cond_BD)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_out.view(-1, 1, 6, self.C).unbind(2)
        eps = self.ln_wo_grad.eps
        if isinstance(x, PendingResidual):
            attn_in = LayerNormModulated(x.x, eps, scale1.add(1), shift1, residual=(x.branch, x.gamma))
        else:
            attn_in = LayerNormModulated(x, eps, scale1.add(1), shift1)
        del x  # the dels below free each activation as soon as its last consumer has run (peak memory)
        h = self.attn(attn_in, attn_bias=attn_bias)
        ffn_in = LayerNormModulated(attn_in.summed(), eps, scale2.add(1), shift2, residual=(h, gamma1))
        del attn_in, h
        hidden = self.ffn.fc1(ffn_in)  # also writes the residual stream after the attention branch
        x = ffn_in.summed()
        del ffn_in
        f = self.ffn.fc2(self.ffn.act(hidden))
        del hidden
        if self.defer_residual:
            return PendingResidual(x, f, gamma2)
        return x + f.mul(gamma2)


def fuse_attention(model: nn.Module) -> int:
    """Give every block's attention the fused attention-input kernel; returns how many were switched."""
    count = 0
    for block in model.blocks:
        attn = block.attn
        codec = attn.kv_codec
        if codec is not None and codec.key.bits != codec.value.bits:
            continue  # the kernel writes one code width for both
        if not isinstance(attn, FusedSelfAttention):
            attn.__class__ = FusedSelfAttention
            attn.prepare()
        count += 1
    return count


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
    for index in fused:  # a block hands its last residual add to the next one only if that one is fused too
        model.blocks[index].defer_residual = index + 1 in fused
    return fused


class FusedResnetBlock(ResnetBlock):
    """ResnetBlock whose two GroupNorm + SiLU pairs run as one kernel each, writing the autocast dtype the
    convolutions read."""

    def _norm_silu(self, x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, out_dtype=out_dtype)

    def forward(self, x):
        h = self.conv1(self._norm_silu(x, self.norm1))
        h = self.conv2(self.dropout(self._norm_silu(h, self.norm2)))
        return self.nin_shortcut(x) + h


def fuse_decoder(vae: nn.Module) -> int:
    """Switch the ResnetBlocks of the VQVAE decoder to FusedResnetBlock; returns how many were switched."""
    count = 0
    for module in vae.decoder.modules():
        if type(module) is ResnetBlock:
            module.__class__ = FusedResnetBlock
            count += 1
    return count


def to_int8(model: nn.Module, *, attention: str = "sdpa", kv_cache: str = "model",
            fuse: bool = True) -> ConversionReport:
    """Convert a quantized VAR to real INT8 in place (see kernels.convert) and fuse its producers."""
    report = convert(model, attention=attention, kv_cache=kv_cache)
    if fuse:
        fused = fuse_int8_blocks(model)
        attention_fused = fuse_attention(model)
        report.notes.append(f"fused LayerNorm + adaLN modulation, the residual adds and GELU into the quantize "
                            f"kernels of {len(fused)} of {len(model.blocks)} blocks; attention inputs of "
                            f"{attention_fused} blocks in one kernel")
    return report
