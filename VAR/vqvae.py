"""VAR's multi-scale VQVAE tokenizer (`vae_ch160v4096z32`).

Module and parameter names follow FoundationVision/VAR (`models/vqvae.py`, `quant.py`, `basic_vae.py`) so the
released `vae_ch160v4096z32.pth` loads with `strict=True`. Only inference is implemented: encoding an image to
multi-scale ids, decoding ids or f_hat to an image, and the two helpers the generator needs (teacher-forcing
input and the next autoregressive input).

Shapes: B batch, C channels (Cvae = z_channels = 32), pn side of one scale's token map, SN number of scales,
L = sum(pn**2) tokens over all scales, H = W = pn of the last scale (16) in latent space.
"""
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


# ----------------------------------------------------------------------------------------------------------------
# Encoder / decoder (LDM "vq-f16" layout)

def Normalize(in_channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode='nearest'))


class Downsample2x(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        # asymmetric padding (right/bottom only), as in the original VQGAN
        return self.conv(F.pad(x, pad=(0, 1, 0, 1), mode='constant', value=0))


class ResnetBlock(nn.Module):
    def __init__(self, *, in_channels: int, out_channels: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
                             if in_channels != out_channels else nn.Identity())

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map (1x1-conv projections)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.C = in_channels
        self.norm = Normalize(in_channels)
        self.qkv = nn.Conv2d(in_channels, 3 * in_channels, kernel_size=1, stride=1, padding=0)
        self.w_ratio = int(in_channels) ** (-0.5)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x):
        qkv = self.qkv(self.norm(x))
        B, _, H, W = qkv.shape
        q, k, v = qkv.reshape(B, 3, self.C, H * W).unbind(1)                          # each B, C, HW
        # contiguous copies keep the same GEMM layouts as the reference implementation
        w = torch.bmm(q.permute(0, 2, 1).contiguous(), k.contiguous()).mul_(self.w_ratio)  # B, HW(q), HW(k)
        w = F.softmax(w, dim=2)
        h = torch.bmm(v.contiguous(), w.permute(0, 2, 1).contiguous())                  # B, C, HW(q)
        return x + self.proj_out(h.view(B, self.C, H, W))


def make_attn(in_channels: int, using_sa: bool = True) -> nn.Module:
    return AttnBlock(in_channels) if using_sa else nn.Identity()


class Encoder(nn.Module):
    def __init__(self, *, ch=128, ch_mult=(1, 2, 4, 8), num_res_blocks=2, dropout=0.0, in_channels=3,
                 z_channels, double_z=False, using_sa=True, using_mid_sa=True):
        super().__init__()
        self.ch, self.num_resolutions, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        self.downsample_ratio = 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if i_level == self.num_resolutions - 1 and using_sa:  # attention only at the lowest resolution
                    attn.append(make_attn(block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample2x(block_in)
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, using_sa=using_mid_sa)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    def __init__(self, *, ch=128, ch_mult=(1, 2, 4, 8), num_res_blocks=2, dropout=0.0, in_channels=3,
                 z_channels, using_sa=True, using_mid_sa=True):
        super().__init__()
        self.ch, self.num_resolutions, self.num_res_blocks = ch, len(ch_mult), num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, using_sa=using_mid_sa)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)

        # built from the lowest resolution up, stored so that self.up[i] matches encoder level i
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if i_level == self.num_resolutions - 1 and using_sa:
                    attn.append(make_attn(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample2x(block_in)
            self.up.insert(0, up)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


# ----------------------------------------------------------------------------------------------------------------
# Residual quantizer with the Phi refiners

class Phi(nn.Conv2d):
    """phi(h) = (1 - r) * h + r * conv3x3(h): refines an upsampled code map before it is added to f_hat."""

    def __init__(self, embed_dim: int, quant_resi: float):
        super().__init__(in_channels=embed_dim, out_channels=embed_dim, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw):
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


def _phi_ticks(K: int) -> np.ndarray:
    return np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)


def phi_index(at_from_0_to_1: float, K: int) -> int:
    """Which of K Phi layers serves the scale at relative position `si / (SN - 1)`.

    Computed in float64 numpy on purpose: some positions are exact ties between two ticks (2/9 and 7/9 for 10
    scales, 0.5 for 5) and the released models were trained with the tie broken by float64 rounding.
    """
    return int(np.argmin(np.abs(_phi_ticks(K) - at_from_0_to_1)))


class PhiShared(nn.Module):
    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def __getitem__(self, _: float) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return self.qresi_ls[phi_index(at_from_0_to_1, len(self.qresi_ls))]


class PhiNonShared(nn.ModuleList):
    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return super().__getitem__(phi_index(at_from_0_to_1, len(self)))


class VectorQuantizer2(nn.Module):
    def __init__(self, vocab_size: int, Cvae: int, using_znorm: bool, beta: float = 0.25, default_qresi_counts: int = 0,
                 v_patch_nums: Sequence[int] = OFFICIAL_PATCH_NUMS, quant_resi: float = 0.5, share_quant_resi: int = 4):
        super().__init__()
        self.vocab_size, self.Cvae, self.using_znorm, self.beta = vocab_size, Cvae, using_znorm, beta
        self.v_patch_nums = tuple(v_patch_nums)
        self.quant_resi_ratio = quant_resi

        def make_phi():
            return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()
        if share_quant_resi == 0:    # one Phi per scale
            self.quant_resi = PhiNonShared([make_phi() for _ in range(default_qresi_counts or len(self.v_patch_nums))])
        elif share_quant_resi == 1:  # one Phi for all scales
            self.quant_resi = PhiShared(make_phi())
        else:                        # share_quant_resi Phis spread over the scales (released models: 4)
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([make_phi() for _ in range(share_quant_resi)]))

        # training statistic, kept because the released state_dict carries it
        self.register_buffer('ema_vocab_hit_SV', torch.full((len(self.v_patch_nums), vocab_size), fill_value=0.0))
        self.embedding = nn.Embedding(vocab_size, Cvae)

    def extra_repr(self) -> str:
        return f'{self.v_patch_nums}, znorm={self.using_znorm}, quant_resi={self.quant_resi_ratio}'

    def split_scales(self, idx_BL: torch.Tensor) -> List[torch.Tensor]:
        """(B, L) ids with the scales concatenated -> list of (B, pn**2), one per scale."""
        sizes = [pn * pn for pn in self.v_patch_nums]
        if idx_BL.ndim != 2 or idx_BL.shape[1] != sum(sizes):
            raise ValueError(f'expected token ids of shape (B, {sum(sizes)}) for patch_nums {self.v_patch_nums}, '
                             f'got {tuple(idx_BL.shape)}')
        return list(idx_BL.split(sizes, dim=1))

    def _as_scale_list(self, ms_idx_Bl: Union[torch.Tensor, Sequence[torch.Tensor]]) -> List[torch.Tensor]:
        return self.split_scales(ms_idx_Bl) if isinstance(ms_idx_Bl, torch.Tensor) else list(ms_idx_Bl)

    def embed_to_fhat(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale=True, last_one=False):
        """Accumulate per-scale code maps into f_hat (the official `all_to_max_scale=True` path only)."""
        if not all_to_max_scale:
            raise NotImplementedError('only all_to_max_scale=True (the path used for sampling and evaluation) is implemented')
        B, H = ms_h_BChw[0].shape[0], self.v_patch_nums[-1]
        SN = len(self.v_patch_nums)
        f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, H, H, dtype=torch.float32)
        ls_f_hat = []
        for si in range(SN):
            h_BChw = ms_h_BChw[si]
            if si < SN - 1:
                h_BChw = F.interpolate(h_BChw, size=(H, H), mode='bicubic')
            f_hat.add_(self.quant_resi[si / (SN - 1)](h_BChw))
            if not last_one:
                ls_f_hat.append(f_hat.clone())
        return f_hat if last_one else ls_f_hat

    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool,
                           v_patch_nums: Optional[Sequence[Union[int, Tuple[int, int]]]] = None) -> List[torch.Tensor]:
        """Multi-scale residual quantisation of an encoder feature map: per scale, the ids (B, ph*pw) or f_hat."""
        B, C, H, W = f_BChw.shape
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        patch_hws = [(pn, pn) if isinstance(pn, int) else (pn[0], pn[1]) for pn in (v_patch_nums or self.v_patch_nums)]
        if patch_hws[-1] != (H, W):
            raise ValueError(f'the last scale {patch_hws[-1]} must match the feature map size {(H, W)}')
        codebook = self.embedding.weight.data
        SN = len(patch_hws)
        out = []
        for si, (ph, pw) in enumerate(patch_hws):
            z = F.interpolate(f_rest, size=(ph, pw), mode='area') if si != SN - 1 else f_rest
            z_NC = z.permute(0, 2, 3, 1).reshape(-1, C)
            if self.using_znorm:
                idx_N = torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(codebook.T, dim=0), dim=1)
            else:  # squared L2 distance, expanded as |z|^2 + |e|^2 - 2 z.e
                d = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(codebook.square(), dim=1, keepdim=False)
                d.addmm_(z_NC, codebook.T, alpha=-2, beta=1)
                idx_N = torch.argmin(d, dim=1)
            h_BChw = self.embedding(idx_N.view(B, ph, pw)).permute(0, 3, 1, 2)
            h_BChw = F.interpolate(h_BChw, size=(H, W), mode='bicubic').contiguous() if si != SN - 1 else h_BChw.contiguous()
            h_BChw = self.quant_resi[si / (SN - 1)](h_BChw)
            f_hat.add_(h_BChw)
            f_rest.sub_(h_BChw)
            out.append(f_hat.clone() if to_fhat else idx_N.reshape(B, ph * pw))
        return out

    def idxBl_to_var_input(self, gt_ms_idx_Bl: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        """Teacher-forcing input of the generator, (B, L - first_l, Cvae), from ground-truth ids.

        Accepts the per-scale list of the official API or one (B, L) tensor with the scales concatenated.
        Scale si+1's input is f_hat after scales 0..si, area-downsampled to scale si+1's size.
        """
        ms_idx = self._as_scale_list(gt_ms_idx_Bl)
        B, C, H = ms_idx[0].shape[0], self.Cvae, self.v_patch_nums[-1]
        SN = len(self.v_patch_nums)
        f_hat = ms_idx[0].new_zeros(B, C, H, H, dtype=torch.float32)
        next_scales = []
        for si in range(SN - 1):
            pn = self.v_patch_nums[si]
            h_BChw = self.embedding(ms_idx[si]).transpose_(1, 2).view(B, C, pn, pn)
            f_hat.add_(self.quant_resi[si / (SN - 1)](F.interpolate(h_BChw, size=(H, H), mode='bicubic')))
            pn_next = self.v_patch_nums[si + 1]
            next_scales.append(F.interpolate(f_hat, size=(pn_next, pn_next), mode='area').view(B, C, -1).transpose(1, 2))
        return torch.cat(next_scales, dim=1)

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor,
                                      h_BChw: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Add scale si's code map to f_hat (in place); return f_hat and the next scale's (B, C, pn, pn) input."""
        HW = self.v_patch_nums[-1]
        if si != SN - 1:
            f_hat.add_(self.quant_resi[si / (SN - 1)](F.interpolate(h_BChw, size=(HW, HW), mode='bicubic')))
            pn_next = self.v_patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode='area')
        f_hat.add_(self.quant_resi[si / (SN - 1)](h_BChw))
        return f_hat, f_hat


# ----------------------------------------------------------------------------------------------------------------

class VQVAE(nn.Module):
    """Multi-scale VQVAE. `ch_mult` and `num_res_blocks` are fixed in the official code; they are options here
    (official defaults) so that small test tokenizers keep the same structure."""

    def __init__(self, vocab_size=4096, z_channels=32, ch=128, dropout=0.0, beta=0.25, using_znorm=False,
                 quant_conv_ks=3, quant_resi=0.5, share_quant_resi=4, default_qresi_counts=0,
                 v_patch_nums: Sequence[int] = OFFICIAL_PATCH_NUMS, test_mode=True,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2):
        super().__init__()
        self.test_mode = test_mode
        self.V, self.Cvae, self.vocab_size = vocab_size, z_channels, vocab_size
        ddconfig = dict(dropout=dropout, ch=ch, z_channels=z_channels, in_channels=3, ch_mult=tuple(ch_mult),
                        num_res_blocks=num_res_blocks, using_sa=True, using_mid_sa=True)
        self.encoder = Encoder(double_z=False, **ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.quantize = VectorQuantizer2(vocab_size=vocab_size, Cvae=z_channels, using_znorm=using_znorm, beta=beta,
                                         default_qresi_counts=default_qresi_counts, v_patch_nums=v_patch_nums,
                                         quant_resi=quant_resi, share_quant_resi=share_quant_resi)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=quant_conv_ks // 2)
        if test_mode:
            self.eval()
            self.requires_grad_(False)

    @property
    def image_size(self) -> int:
        return self.quantize.v_patch_nums[-1] * self.downsample

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode f_hat (B, Cvae, H, W) to an image in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def img_to_idxBl(self, inp_img_no_grad: torch.Tensor, v_patch_nums=None) -> List[torch.LongTensor]:
        f = self.quant_conv(self.encoder(inp_img_no_grad))
        return self.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=v_patch_nums)

    def idxBl_to_img(self, ms_idx_Bl: Union[torch.Tensor, Sequence[torch.Tensor]], same_shape: bool = True, last_one=False):
        """Decode multi-scale ids (per-scale list, or (B, L) with the scales concatenated) to an image in [-1, 1]."""
        ms_idx = self.quantize._as_scale_list(ms_idx_Bl)
        B = ms_idx[0].shape[0]
        ms_h_BChw = []
        for idx_Bl in ms_idx:
            pn = round(idx_Bl.shape[1] ** 0.5)
            ms_h_BChw.append(self.quantize.embedding(idx_Bl).transpose(1, 2).view(B, self.Cvae, pn, pn))
        return self.embed_to_img(ms_h_BChw, all_to_max_scale=same_shape, last_one=last_one)

    def embed_to_img(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool, last_one=False):
        f_hat = self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale=all_to_max_scale, last_one=last_one)
        return self.fhat_to_img(f_hat) if last_one else [self.fhat_to_img(f) for f in f_hat]

    def img_to_reconstructed_img(self, x: torch.Tensor, v_patch_nums=None, last_one=False):
        f = self.quant_conv(self.encoder(x))
        ls_f_hat = self.quantize.f_to_idxBl_or_fhat(f, to_fhat=True, v_patch_nums=v_patch_nums)
        return self.fhat_to_img(ls_f_hat[-1]) if last_one else [self.fhat_to_img(f_hat) for f_hat in ls_f_hat]
