"""Named VAR configurations: `create('var_d16', device=...) -> (var, vae)`.

The released models (`var_d16/20/24/30`) follow the official `build_vae_var`: width 64 * depth, depth heads,
L2-normalised attention, no shared adaLN, and the `vae_ch160v4096z32` tokenizer. `var_tiny` keeps the same
structure at toy sizes so that a whole pipeline runs on a CPU in seconds.

`create` builds with deterministic random weights (for tests and benchmarks); `VAR.loading.load_var` builds
on the meta device and loads the released checkpoints instead. On `device='meta'` nothing is allocated.
"""
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Tuple

import torch
from torch import nn

from .model import VAR
from .vqvae import OFFICIAL_PATCH_NUMS, VQVAE


@dataclass(frozen=True)
class VQVAEConfig:
    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    share_quant_resi: int = 4
    v_patch_nums: Tuple[int, ...] = OFFICIAL_PATCH_NUMS
    ch_mult: Tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2


@dataclass(frozen=True)
class VARConfig:
    depth: int
    embed_dim: int
    num_heads: int
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    attn_l2_norm: bool = True
    patch_nums: Tuple[int, ...] = OFFICIAL_PATCH_NUMS


@dataclass(frozen=True)
class Preset:
    name: str
    var: VARConfig
    vae: VQVAEConfig = field(default_factory=VQVAEConfig)
    checkpoint: str = ''                          # file name in the Hugging Face repo FoundationVision/var
    vae_checkpoint: str = 'vae_ch160v4096z32.pth'

    @property
    def image_size(self) -> int:
        return self.vae.v_patch_nums[-1] * 2 ** (len(self.vae.ch_mult) - 1)


def _released(depth: int) -> Preset:
    return Preset(name=f'var_d{depth}', var=VARConfig(depth=depth, embed_dim=64 * depth, num_heads=depth),
                  checkpoint=f'var_d{depth}.pth')


_TINY_PATCH_NUMS = (1, 2, 3, 4, 6, 8)
PRESETS: Dict[str, Preset] = {
    **{f'var_d{d}': _released(d) for d in (16, 20, 24, 30)},
    # 6 scales, 64-wide 2-block generator, 256 codes, f4 tokenizer: 32x32 images
    'var_tiny': Preset(
        name='var_tiny',
        var=VARConfig(depth=2, embed_dim=64, num_heads=2, patch_nums=_TINY_PATCH_NUMS),
        vae=VQVAEConfig(vocab_size=256, z_channels=32, ch=32, v_patch_nums=_TINY_PATCH_NUMS, ch_mult=(1, 2, 2),
                        num_res_blocks=1),
        vae_checkpoint=''),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f'unknown VAR preset {name!r}; choose one of {sorted(PRESETS)}')
    return PRESETS[name]


def build(name: str, device='cpu') -> Tuple[VAR, VQVAE]:
    """Construct the modules of a preset with PyTorch's default initialisation (nothing is allocated on 'meta')."""
    preset = get_preset(name)
    with torch.device(device):
        vae = VQVAE(**asdict(preset.vae))
        var = VAR(Cvae=preset.vae.z_channels, V=preset.vae.vocab_size, **asdict(preset.var))
    return var.eval().requires_grad_(False), vae.eval().requires_grad_(False)


def create(name: str, device='cpu', seed: int = 0) -> Tuple[VAR, VQVAE]:
    """A preset with deterministic random weights (`randomize_`), in eval mode without gradients."""
    var, vae = build(name, device)
    if torch.device(device).type != 'meta':
        randomize_(var, seed)
        randomize_(vae, seed + 1)
    return var, vae


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, emb_std: float = 1.0) -> nn.Module:
    """Overwrite every parameter from one generator seeded with `seed`, in `named_parameters()` order.

    The recipe keeps activations O(1) everywhere, including the parts the official initialisation zeroes
    (adaLN gates, head), so random models exercise every path: norm weights 1 + 0.1 N(0,1); biases 0.05 N(0,1);
    Linear/Conv weights N(0,1)/sqrt(fan_in); embeddings and position tables emb_std N(0,1); VAR's attention
    temperature log(4) + 0.2 N(0,1). Buffers keep their constructor values. Values depend on the device type
    (CPU and CUDA generators differ).
    """
    owners = {f'{mod_name}.{p_name}' if mod_name else p_name: mod
              for mod_name, mod in module.named_modules() for p_name, _ in mod.named_parameters(recurse=False)}
    gen = None
    for name, p in module.named_parameters():
        if gen is None:
            gen = torch.Generator(device=p.device)
            gen.manual_seed(seed)
        noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
        owner, leaf = owners[name], name.rsplit('.', 1)[-1]
        if isinstance(owner, (nn.LayerNorm, nn.GroupNorm)) and leaf == 'weight':
            value = 1 + 0.1 * noise
        elif leaf == 'scale_mul_1H11':
            value = math.log(4) + 0.2 * noise
        elif leaf.endswith('bias'):
            value = 0.05 * noise
        elif isinstance(owner, (nn.Linear, nn.Conv2d)):
            value = noise / math.sqrt(p[0].numel())   # fan_in = in_features (* kh * kw)
        else:                                         # embeddings, position tables, start token
            value = emb_std * noise
        p.copy_(value)
    return module
