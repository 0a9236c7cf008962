"""VAR's sampling loop: next-scale prediction with classifier-free guidance and the KV cache.

Reproduces `VAR.autoregressive_infer_cfg` of FoundationVision/VAR (more_smooth=False, the FID setting):

* batch [cond; uncond] of 2B rows, the null class is `num_classes`;
* guidance at scale si: t = cfg * si / (SN - 1), logits = (1 + t) * cond - t * uncond;
* VAR's top-k (keep logits >= the k-th largest, ties kept) then VAR's top-p (sort ascending, drop the tokens
  whose ascending cumulative probability is <= 1 - top_p, always keep the largest);
* one `torch.multinomial(probs, 1, generator=rng)` per scale on the (B * pn**2, V) matrix.

RNG protocol: the official sampler owns a `torch.Generator` on the model device and re-seeds it with `g_seed`
at the start of every call; pass such a generator as `rng` (see `make_rng`) and the same seed gives the same
tokens. On CPU, `multinomial` draws Exp(1) noise q and returns argmax(probs / q).

The FID recipe (README of the official repository) is `RECIPE`: cfg 1.5, top-k 900, top-p 0.96, fp16 autocast.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch

from .model import VAR
from .vqvae import VQVAE


@dataclass(frozen=True)
class SamplingRecipe:
    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96


RECIPE = SamplingRecipe()

AUTOCAST_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': None}
DECODE_CHUNK = 25   # images decoded at once: keeps the 256x256 decoder below the KV cache's memory at batch 100


@dataclass
class ScaleStep:
    """What one scale of the sampling loop computed (passed to `on_scale` for tests and calibration)."""
    si: int
    pn: int
    token_map: torch.Tensor     # (2B, pn**2, C) input of the first block
    logits_BlV: torch.Tensor    # (2B, pn**2, V) raw logits, rows [cond; uncond]
    guided_BlV: torch.Tensor    # (B, pn**2, V) logits after guidance, before top-k / top-p
    idx_Bl: torch.Tensor        # (B, pn**2) token ids of this scale
    f_hat: torch.Tensor         # (B, Cvae, H, W) accumulated latent after this scale (updated in place later)


@dataclass
class Generation:
    images: torch.Tensor        # (B, 3, H, W) in [0, 1]
    idx_BL: torch.Tensor        # (B, L) int64 token ids, scales concatenated (scale k at begin_ends[k])
    f_hat: torch.Tensor         # (B, Cvae, H, W) final latent


def make_rng(device, seed: int) -> torch.Generator:
    """A generator on the model device, seeded like the official `self.rng.manual_seed(g_seed)`."""
    rng = torch.Generator(device=device)
    rng.manual_seed(int(seed))
    return rng


def top_k_top_p_filter(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """VAR's filtering: removed logits become -inf. A top_k >= V keeps everything (the official code would fail)."""
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        kth_largest = logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth_largest, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        sorted_remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        sorted_remove[..., -1:] = False
        logits_BlV = logits_BlV.masked_fill(sorted_remove.scatter(sorted_idx.ndim - 1, sorted_idx, sorted_remove), -torch.inf)
    return logits_BlV


def sample_with_top_k_top_p(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                            rng: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, l, V) logits -> (B, l) ids: one multinomial draw per row of the (B * l, V) probability matrix."""
    B, l, V = logits_BlV.shape
    probs = top_k_top_p_filter(logits_BlV, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs.view(-1, V), num_samples=1, replacement=True, generator=rng).view(B, l)


@torch.no_grad()
def autoregressive_infer_cfg(var: VAR, vae: VQVAE, label_B: torch.LongTensor, *, cfg: float = RECIPE.cfg,
                             top_k: int = RECIPE.top_k, top_p: float = RECIPE.top_p,
                             rng: Optional[torch.Generator] = None, forced_idx_BL: Optional[torch.Tensor] = None,
                             on_scale: Optional[Callable[[ScaleStep], None]] = None, reuse_ada_lin: bool = True,
                             decode: bool = True, decode_chunk: Optional[int] = DECODE_CHUNK,
                             forward_scale: Optional[Callable] = None) -> Generation:
    """Generate B images of classes `label_B` (B,). Returns images in [0, 1] and the sampled ids.

    rng: the generator the draws come from (None: the global RNG, as the official code does without g_seed).
    forced_idx_BL: (B, L) ids to feed instead of sampling (teacher forcing through the KV-cache path).
    on_scale: called after every scale with a `ScaleStep`.
    reuse_ada_lin: compute each block's `ada_lin(cond)` once per batch instead of once per scale (same values;
        turn off when something must observe every per-scale call of the `ada_lin` modules).
    decode: False skips the tokenizer decoder (`images` is then None).
    decode_chunk: decode at most this many images at a time (None: all at once). Each image is decoded on its
        own anyway; the chunks only bound the decoder's activation memory, which at 256x256 exceeds the KV cache.
    forward_scale: runs the transformer on one scale, (si, token_map, cond_BD, ada_outs) -> logits; None runs
        `var.forward_blocks`. `VAR.graphs.ScaleGraphs` replays CUDA graphs instead.
    """
    idx_BL, f_hat = _sample_tokens(var, vae, label_B, cfg, top_k, top_p, rng, forced_idx_BL, on_scale, reuse_ada_lin,
                                   forward_scale)
    images = decode_f_hat(vae, f_hat, decode_chunk) if decode else None
    return Generation(images=images, idx_BL=idx_BL, f_hat=f_hat)


def decode_f_hat(vae: VQVAE, f_hat: torch.Tensor, chunk: Optional[int] = DECODE_CHUNK) -> torch.Tensor:
    """f_hat (B, Cvae, H, W) -> images (B, 3, H', W') in [0, 1], as `vae.fhat_to_img(f_hat).add(1).mul(0.5)`."""
    parts = f_hat.split(chunk) if chunk else (f_hat,)
    images = [vae.fhat_to_img(part).add_(1).mul_(0.5) for part in parts]
    return images[0] if len(images) == 1 else torch.cat(images)


def _sample_tokens(var: VAR, vae: VQVAE, label_B, cfg, top_k, top_p, rng, forced_idx_BL, on_scale, reuse_ada_lin,
                   forward_scale=None):
    """The scale loop; returns (idx_BL, f_hat). Its large intermediates (logits, KV cache) are freed on return,
    before the tokenizer decodes."""
    quantize = vae.quantize
    if tuple(quantize.v_patch_nums) != var.patch_nums:
        raise ValueError(f'generator patch_nums {var.patch_nums} != tokenizer v_patch_nums {quantize.v_patch_nums}')
    B = label_B.shape[0]
    SN = len(var.patch_nums)
    cond_BD = sos = var.class_emb(torch.cat((label_B, torch.full_like(label_B, fill_value=var.num_classes)), dim=0))
    ada_outs = var.block_ada_outs(cond_BD) if reuse_ada_lin else None

    lvl_pos = var.lvl_pos()
    next_token_map = (sos.unsqueeze(1).expand(2 * B, var.first_l, -1) + var.pos_start.expand(2 * B, var.first_l, -1)
                      + lvl_pos[:, :var.first_l])
    f_hat = sos.new_zeros(B, var.Cvae, var.patch_nums[-1], var.patch_nums[-1])
    idx_per_scale: List[torch.Tensor] = []

    var.kv_caching(True, max_len=var.L)
    try:
        for si, pn in enumerate(var.patch_nums):
            begin, end = var.begin_ends[si]
            if forward_scale is None:
                logits_BlV = var.forward_blocks(next_token_map, cond_BD, attn_bias=None, ada_outs=ada_outs)
            else:
                logits_BlV = forward_scale(si, next_token_map, cond_BD, ada_outs)
            t = cfg * si / var.num_stages_minus_1
            guided_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
            if forced_idx_BL is None:
                idx_Bl = sample_with_top_k_top_p(guided_BlV, top_k=top_k, top_p=top_p, rng=rng)
            else:
                idx_Bl = forced_idx_BL[:, begin:end]
            idx_per_scale.append(idx_Bl)

            h_BChw = quantize.embedding(idx_Bl).transpose_(1, 2).reshape(B, var.Cvae, pn, pn)
            f_hat, next_map = quantize.get_next_autoregressive_input(si, SN, f_hat, h_BChw)
            if on_scale is not None:
                on_scale(ScaleStep(si, pn, next_token_map, logits_BlV, guided_BlV, idx_Bl, f_hat))
            if si != SN - 1:
                next_map = next_map.view(B, var.Cvae, -1).transpose(1, 2)
                next_token_map = var.word_embed(next_map) + lvl_pos[:, end:var.begin_ends[si + 1][1]]
                next_token_map = next_token_map.repeat(2, 1, 1)  # [cond; uncond] share the image so far
    finally:
        var.kv_caching(False)
    return torch.cat(idx_per_scale, dim=1), f_hat


def to_uint8(images_B3HW: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> (B, H, W, 3) uint8 by `mul(255).byte()` (truncation), as the reference sampling script."""
    return images_B3HW.mul(255).byte().permute(0, 2, 3, 1)


def make_sample_fn(var: VAR, vae: VQVAE, recipe: SamplingRecipe = RECIPE, dtype: str = 'fp16',
                   reuse_ada_lin: bool = True, cuda_graphs: bool = False) -> Callable[[np.ndarray, int], dict]:
    """A batch sampler for `sampling.run_sampling`: (labels, seed) -> {'images': (B, H, W, 3) uint8,
    'idx_BL': (B, L) int16 token ids}. Each call seeds a fresh generator on the model device with `seed`;
    `dtype` picks the autocast precision ('fp16', 'bf16', or 'fp32' for no autocast). `cuda_graphs` replays
    the transformer forward of each scale as a CUDA graph (VAR.graphs; CUDA only; autocast's weight cache is
    then off, so give the transformer weights in the compute dtype rather than float32 masters)."""
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f'dtype {dtype!r}: choose one of {sorted(AUTOCAST_DTYPES)}')
    device = var.lvl_1L.device
    autocast_dtype = AUTOCAST_DTYPES[dtype]
    if cuda_graphs and device.type != 'cuda':
        raise ValueError(f'cuda_graphs needs the model on a CUDA device, not {device}')
    forward_scale = None
    if cuda_graphs:
        from .graphs import ScaleGraphs
        forward_scale = ScaleGraphs(var)

    def sample(labels: np.ndarray, seed: int) -> dict:
        label_B = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                                    enabled=autocast_dtype is not None, cache_enabled=not cuda_graphs):
            gen = autoregressive_infer_cfg(var, vae, label_B, cfg=recipe.cfg, top_k=recipe.top_k, top_p=recipe.top_p,
                                           rng=make_rng(device, seed), reuse_ada_lin=reuse_ada_lin,
                                           forward_scale=forward_scale)
            images = to_uint8(gen.images)
        return {'images': images.cpu().numpy(), 'idx_BL': gen.idx_BL.to(torch.int16).cpu().numpy()}

    sample.forward_scale = forward_scale  # the graphs, for callers that drive autoregressive_infer_cfg themselves
    return sample
