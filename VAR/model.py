"""VAR: next-scale autoregressive transformer (FoundationVision/VAR `models/var.py`, `basic_var.py`).

Module and parameter names match the official code, so the released `var_d{16,20,24,30}.pth` load with
`strict=True` (buffers `lvl_1L`, `attn_bias_for_masking`, `blocks.*.attn.zero_k_bias` included). The model holds
no tokenizer and no random generator: sampling lives in `VAR/sampling.py` and takes both explicitly.

Quantization wraps modules from outside: every linear layer is called as a module (`mat_qkv`, `proj`, `fc1`,
`fc2`, `ada_lin.1`, `head_nm.ada_lin.1`, `head`, `word_embed`), and each `SelfAttention` exposes its two
attention products as `qk_matmul` / `av_matmul`, used when `explicit_matmuls` is True.

Shapes: B batch (2B with classifier-free guidance), L tokens (680 over 10 scales), l tokens of the current scale,
C = D width (64 * depth), H heads, c head dim (64), V codebook size (4096), Cvae latent channels (32).
"""
import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from quant.nn_hooks import MatMul

from .vqvae import OFFICIAL_PATCH_NUMS


class FFN(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate='tanh')
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    def __init__(self, block_idx: int, embed_dim: int = 768, num_heads: int = 12, attn_l2_norm: bool = False):
        super().__init__()
        assert embed_dim % num_heads == 0, f'embed_dim {embed_dim} is not divisible by num_heads {num_heads}'
        self.block_idx, self.num_heads, self.head_dim = block_idx, num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            # q and k are unit vectors; a learned per-head temperature (capped at 100) replaces 1/sqrt(c)
            self.scale = 1
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)

        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(embed_dim)), nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer('zero_k_bias', torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

        # hook points for quantized attention products; see `explicit_matmuls`
        self.qk_matmul = MatMul()
        self.av_matmul = MatMul()
        self.explicit_matmuls = False

        # KV cache of the scales seen so far (inference only): cached_k / cached_v are (B, H, len, c)
        self.caching, self.cached_k, self.cached_v = False, None, None
        self.kv_capacity: Optional[int] = None
        self._kv_buffer: Optional[torch.Tensor] = None
        # How the cache stores keys and values: None keeps the compute dtype; a codec (e.g.
        # kernels.kv_cache.Int8KVCodec) stores them compressed: encode(k, v) -> stored pair,
        # decode(stored_k, stored_v, dtype) -> (k, v).
        self.kv_codec = None

    def kv_caching(self, enable: bool, max_len: Optional[int] = None):
        """Start (or stop) caching keys and values; clears the cache.

        With `max_len`, keys and values are written in place into one buffer of that length (allocated at the
        first step); `cached_k` / `cached_v` are then views of its filled part. Without it, they grow by
        concatenation as in the official code. Both give the same values.
        """
        self.caching, self.cached_k, self.cached_v = enable, None, None
        self.kv_capacity = max_len if enable else None
        self._kv_buffer = None

    def _append_kv(self, k: torch.Tensor, v: torch.Tensor):
        if self.kv_codec is None:
            return self._store_kv(k, v)
        stored_k, stored_v = self._store_kv(*self.kv_codec.encode(k, v))
        return self.kv_codec.decode(stored_k, stored_v, k.dtype)

    def _store_kv(self, k: torch.Tensor, v: torch.Tensor):
        if self.kv_capacity is None:
            if self.cached_k is not None:
                k, v = torch.cat((self.cached_k, k), dim=2), torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
            return k, v
        k_slots, v_slots = self.kv_slots(*k.shape, k.dtype, k.device)
        k_slots.copy_(k)
        v_slots.copy_(v)
        return self.cached_k, self.cached_v

    def kv_slots(self, B: int, H: int, l: int, c: int, dtype: torch.dtype, device: torch.device):
        """The preallocated cache's next l positions for keys and values, (B, H, l, c) views to write in place;
        `cached_k` / `cached_v` then cover them. Needs `kv_caching(True, max_len=...)`."""
        if self._kv_buffer is None:
            self._kv_buffer = torch.empty(2, B, H, self.kv_capacity, c, dtype=dtype, device=device)
        start = 0 if self.cached_k is None else self.cached_k.shape[2]
        if start + l > self.kv_capacity or self._kv_buffer.shape[1] != B or self._kv_buffer.dtype != dtype:
            raise RuntimeError(f'KV cache of block {self.block_idx} holds {self.kv_capacity} positions of '
                               f'{self._kv_buffer.dtype} for batch {self._kv_buffer.shape[1]}; got {l} more of '
                               f'{dtype} after {start} for batch {B}. Call kv_caching(True, max_len=...) before each '
                               f'generation.')
        buffer = self._kv_buffer
        self.cached_k, self.cached_v = buffer[0, :, :, :start + l], buffer[1, :, :, :start + l]
        return buffer[0, :, :, start:start + l], buffer[1, :, :, start:start + l]

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        """x: (B, l, C). attn_bias: additive (1, 1, l, L) mask, or None (KV-cache inference, mask-less replay)."""
        B, L, C = x.shape
        qkv = self.mat_qkv(x)
        # the key bias is a constant zero buffer: only q and v carry a learned bias
        qkv = qkv + torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)).to(qkv.dtype)
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # each B H l c
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
            # the normalisation runs in float32 under autocast; the attention products run in v's dtype anyway
            q, k = q.to(v.dtype), k.to(v.dtype)
        if self.caching:
            k, v = self._append_kv(k, v)

        if self.explicit_matmuls:
            attn = self.qk_matmul(q if self.scale == 1 else q.mul(self.scale), k.transpose(-2, -1))  # B H l L
            if attn_bias is not None:
                attn = attn + attn_bias
            out = self.av_matmul(attn.softmax(dim=-1), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))

    def extra_repr(self) -> str:
        return f'attn_l2_norm={self.attn_l2_norm}, explicit_matmuls={self.explicit_matmuls}'


class AdaLNSelfAttn(nn.Module):
    """Transformer block modulated by the class condition (adaLN, 6 vectors per sample)."""

    def __init__(self, block_idx: int, embed_dim: int, cond_dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 norm_eps: float = 1e-6, attn_l2_norm: bool = False):
        super().__init__()
        self.block_idx, self.C, self.D = block_idx, embed_dim, cond_dim
        self.attn = SelfAttention(block_idx=block_idx, embed_dim=embed_dim, num_heads=num_heads, attn_l2_norm=attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * embed_dim))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias: Optional[torch.Tensor],
                ada_out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, l, C); cond_BD: (B, D). `ada_out` is a precomputed `self.ada_lin(cond_BD)`, reusable across
        scales because it depends on the class only."""
        if ada_out is None:
            ada_out = self.ada_lin(cond_BD)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_out.view(-1, 1, 6, self.C).unbind(2)
        x = x + self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1), attn_bias=attn_bias).mul_(gamma1)
        x = x + self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2)
        return x


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, D: int, norm_eps: float = 1e-6):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, ada_out: Optional[torch.Tensor] = None):
        if ada_out is None:
            ada_out = self.ada_lin(cond_BD)
        scale, shift = ada_out.view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)


def _autocast_dtype(device_type: str, fallback: torch.dtype) -> torch.dtype:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else fallback


class VAR(nn.Module):
    """The generator. Constructor arguments use the official names; `Cvae` and `V` come from the tokenizer
    (the official constructor reads them from a `vae_local` argument). Training-only arguments (dropout,
    drop-path, label dropout, fused kernels) are not taken: this implementation is for inference."""

    def __init__(self, Cvae: int = 32, V: int = 4096, num_classes: int = 1000, depth: int = 16, embed_dim: int = 1024,
                 num_heads: int = 16, mlp_ratio: float = 4.0, norm_eps: float = 1e-6, shared_aln: bool = False,
                 attn_l2_norm: bool = False, patch_nums: Sequence[int] = OFFICIAL_PATCH_NUMS):
        super().__init__()
        if shared_aln:
            raise NotImplementedError('shared_aln=True is not used by any released VAR checkpoint and is not implemented')
        self.Cvae, self.V = Cvae, V
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.num_classes = num_classes
        self.patch_nums = tuple(patch_nums)
        self.L = sum(pn ** 2 for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends = []
        cur = 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn ** 2))
            cur += pn ** 2
        self.num_stages_minus_1 = len(self.patch_nums) - 1

        init_std = math.sqrt(1 / self.C / 3)
        self.word_embed = nn.Linear(Cvae, self.C)
        self.class_emb = nn.Embedding(num_classes + 1, self.C)  # row num_classes is the null (unconditional) class
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, self.C))
        for p in (self.class_emb.weight, self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p.data, mean=0, std=init_std)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), self.C)
        self.shared_ada_lin = nn.Identity()

        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(block_idx=i, embed_dim=self.C, cond_dim=self.D, num_heads=num_heads, mlp_ratio=mlp_ratio,
                          norm_eps=norm_eps, attn_l2_norm=attn_l2_norm)
            for i in range(depth)
        ])

        # lvl_1L: scale index of every token; attn_bias_for_masking: scale k attends to scales <= k
        d = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.patch_nums)]).view(1, self.L, 1)
        dT = d.transpose(1, 2)
        self.register_buffer('lvl_1L', dT[:, 0].contiguous())
        self.register_buffer('attn_bias_for_masking',
                             torch.where(d >= dT, 0.0, -torch.inf).reshape(1, 1, self.L, self.L).contiguous())

        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_eps=norm_eps)
        self.head = nn.Linear(self.C, self.V)

    # ------------------------------------------------------------------------------------------------------------
    # pieces shared by the teacher-forced pass and the sampler

    def kv_caching(self, enable: bool, max_len: Optional[int] = None):
        for b in self.blocks:
            b.attn.kv_caching(enable, max_len)

    def lvl_pos(self) -> torch.Tensor:
        """(1, L, C): level embedding + absolute position embedding of every token."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def block_ada_outs(self, cond_BD: torch.Tensor) -> List[torch.Tensor]:
        """`ada_lin(cond_BD)` of every block and of the head norm (last item), computed once per batch."""
        return [b.ada_lin(cond_BD) for b in self.blocks] + [self.head_nm.ada_lin(cond_BD)]

    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor, head_ada_out: Optional[torch.Tensor] = None):
        return self.head(self.head_nm(h.float(), cond_BD, ada_out=head_ada_out).float()).float()

    def forward_blocks(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, attn_bias: Optional[torch.Tensor] = None,
                       ada_outs: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """All blocks then the head on a token map: logits (B, l, V)."""
        for i, b in enumerate(self.blocks):
            x_BLC = b(x_BLC, cond_BD, attn_bias, ada_out=None if ada_outs is None else ada_outs[i])
        return self.get_logits(x_BLC, cond_BD, None if ada_outs is None else ada_outs[-1])

    def forward_fn(self, token_map: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Mask-less, cache-less replay of one token map (the calibration pass of PTQ4ARVG's `VAR.forward_fn`):
        the tokens attend to each other only. token_map: (B, l, C) as the sampler feeds the first block."""
        self.kv_caching(False)
        return self.forward_blocks(token_map, cond_BD, attn_bias=None)

    def teacher_forcing_input(self, label_B: torch.LongTensor, x_BLCv_wo_first_l: torch.Tensor):
        """Input of the first block for all L tokens, and the class condition: (x_BLC, cond_BD), in float32."""
        B = x_BLCv_wo_first_l.shape[0]
        with torch.autocast(x_BLCv_wo_first_l.device.type, enabled=False):
            sos = cond_BD = self.class_emb(label_B)
            sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
            x_BLC = x_BLC + (self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC)
        return x_BLC, cond_BD

    def forward(self, label_B: torch.LongTensor, x_BLCv_wo_first_l: torch.Tensor, attn_mask: bool = True) -> torch.Tensor:
        """Teacher-forced logits (B, L, V) for all scales at once (official `VAR.forward`, no label dropout).

        x_BLCv_wo_first_l: (B, L - first_l, Cvae), from `vae.quantize.idxBl_to_var_input(idx_BL)`.
        attn_mask=True applies the block-causal mask (scale k sees scales <= k, as in training and as the
        KV-cache sampler computes); attn_mask=False lets every token attend to every token.
        """
        x_BLC, cond_BD = self.teacher_forcing_input(label_B, x_BLCv_wo_first_l)
        # like the official code: blocks run in the autocast dtype when autocast is on (x, cond and mask cast)
        main_type = _autocast_dtype(x_BLC.device.type, x_BLC.dtype)
        attn_bias = self.attn_bias_for_masking.to(main_type) if attn_mask else None
        h = x_BLC.to(main_type)
        cond_blocks = cond_BD.to(main_type)
        for b in self.blocks:
            h = b(h, cond_blocks, attn_bias)
        return self.get_logits(h.float(), cond_BD)

    def set_explicit_matmuls(self, enable: bool = True):
        """Route attention through `qk_matmul` / `av_matmul` (True) or `F.scaled_dot_product_attention` (False)."""
        for b in self.blocks:
            b.attn.explicit_matmuls = enable
