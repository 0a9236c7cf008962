"""What the quantization library needs to know about VAR (method.md §2.1, §4).

- Per block: `ada_lin.1` (per-tensor), `attn.mat_qkv` and `ffn.fc1` (GPS folded into `ada_lin.1` rows
  scale1/shift1 and scale2/shift2; STWQ with one group per scale, the first scale being the sink token),
  `attn.proj` and `ffn.fc2` (STWQ: sink token, rest), the two attention products (per-tensor).
- After the blocks: `head_nm.ada_lin.1` (per-tensor) and `head` (per-tensor, GPS folded into head_nm).
- Kept in full precision: word_embed, class/position/level embeddings, LayerNorms, the VQVAE.
- Positions: the first block sees the tokens of one scale per sampling step; they start where the KV cache
  of block 0 ends (0 for teacher-forced replays, which run without a cache).
"""
from __future__ import annotations

import torch

from quant.adapter import Adapter, FoldTarget, LayerSpec, MatMulSpec
from quant.context import TokenGroups

from .model import VAR

BLOCK_MODULATION = ("gamma1", "gamma2", "scale1", "scale2", "shift1", "shift2")
HEAD_MODULATION = ("scale", "shift")
SINK_TOKENS = 1  # the whole first scale (class token)


def current_positions(block, args, kwargs) -> torch.Tensor:
    """Positions of the tokens entering block 0: after whatever its KV cache already holds."""
    x = args[0] if args else kwargs["x"]
    cached = block.attn.cached_k if block.attn.caching else None
    start = 0 if cached is None else cached.shape[2]
    return torch.arange(start, start + x.shape[1], device=x.device)


def replay_teacher_forced(attn_mask: bool):
    def replay(var: VAR, batch):
        return var(batch["labels"], batch["x_BLCv_wo_first_l"], attn_mask=attn_mask)

    return replay


def var_adapter(var: VAR, official_maskless_replay: bool = False) -> Adapter:
    """The adapter of a VAR instance. `official_maskless_replay` reproduces the official calibration replay,
    which runs the 680-token sequences without the block-causal mask (method.md §8 #3)."""
    scale_groups = TokenGroups.from_sizes([pn * pn for pn in var.patch_nums])
    sink_and_rest = TokenGroups.sink_and_rest(SINK_TOKENS)
    layers, matmuls = [], []
    for i in range(var.depth):
        block = f"blocks.{i}"
        modulation = f"{block}.ada_lin.1"
        layers += [
            LayerSpec(modulation, "modulation", block=i),
            LayerSpec(f"{block}.attn.mat_qkv", "qkv", scale_groups, block=i,
                      fold=FoldTarget("modulation", modulation, BLOCK_MODULATION, "scale1", "shift1")),
            LayerSpec(f"{block}.attn.proj", "proj", sink_and_rest, block=i),
            LayerSpec(f"{block}.ffn.fc1", "fc1", scale_groups, block=i,
                      fold=FoldTarget("modulation", modulation, BLOCK_MODULATION, "scale2", "shift2")),
            LayerSpec(f"{block}.ffn.fc2", "fc2", sink_and_rest, block=i),
        ]
        matmuls += [MatMulSpec(f"{block}.attn.qk_matmul", "qk", block=i),
                    MatMulSpec(f"{block}.attn.av_matmul", "av", block=i)]
    layers += [
        LayerSpec("head_nm.ada_lin.1", "modulation"),
        LayerSpec("head", "head", fold=FoldTarget("modulation", "head_nm.ada_lin.1", HEAD_MODULATION, "scale", "shift")),
    ]
    return Adapter(
        family="VAR", layers=layers, matmuls=matmuls, sink_tokens=SINK_TOKENS,
        positions_module="blocks.0", positions_fn=current_positions,
        attention_modules=tuple(f"blocks.{i}.attn" for i in range(var.depth)),
        replay=replay_teacher_forced(attn_mask=not official_maskless_replay),
        dgc_feature_module=f"blocks.{var.depth - 1}",
        kept_in_fp=("word_embed", "class_emb", "pos_start", "pos_1LC", "lvl_embed", "VQVAE"),
        block_paths=tuple(f"blocks.{i}" for i in range(var.depth)))


# The official code's numerics for VAR (faithful mode): EMA statistics over 64-sample mini-batches.
OFFICIAL_RECIPE_OPTIONS = {"statistics": "ema", "batch_size": 64, "calibration_order": "joint"}
