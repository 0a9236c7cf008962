"""Load the released VAR checkpoints (Hugging Face repo FoundationVision/var) strictly.

`load_var(16)` downloads `var_d16.pth` and `vae_ch160v4096z32.pth` through `huggingface_hub` (its cache is
used, so the files are fetched once) or reads them from `ckpt_dir` / explicit paths. The modules are built on
the meta device and the checkpoint tensors are assigned to them, so loading needs no second copy of the
weights. Any difference between file and model (missing, unexpected or reshaped keys) is an error that names
the file, the keys and the fix.
"""
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from .model import VAR
from .presets import build, get_preset
from .vqvae import VQVAE

HF_REPO = 'FoundationVision/var'
PathLike = Union[str, Path]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not match the model."""


def _hint(filename: str) -> str:
    return (f'download it from https://huggingface.co/{HF_REPO}/resolve/main/{filename} (or run without '
            f'--ckpt-dir to let huggingface_hub fetch it into its cache)')


def resolve_checkpoint(filename: str, ckpt_dir: Optional[PathLike] = None, path: Optional[PathLike] = None) -> Path:
    """Local path of a checkpoint: `path` if given, else `ckpt_dir/filename`, else a Hugging Face download."""
    if path is not None or ckpt_dir is not None:
        local = Path(path) if path is not None else Path(ckpt_dir) / filename
        if not local.is_file():
            raise CheckpointError(f'checkpoint {local} not found: {_hint(filename)}')
        return local
    try:
        from huggingface_hub import hf_hub_download
        return Path(hf_hub_download(repo_id=HF_REPO, filename=filename))
    except Exception as err:  # network, authentication or missing-file errors all end here
        raise CheckpointError(f'could not download {filename} from the Hugging Face repo {HF_REPO} ({err}); '
                              f'download it by hand and pass --ckpt-dir DIR') from err


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Flat state_dict from a .pth/.pt/.bin (torch.load, weights only, memory-mapped when possible) or .safetensors."""
    path = Path(path)
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file
            return load_file(str(path))
        try:
            state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError:  # files in the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        raise CheckpointError(f'could not read checkpoint {path} ({type(err).__name__}: {err}); the file may be '
                              f'truncated: delete it and download it again') from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f'{path} is not a flat state_dict (name -> tensor); VAR checkpoints are flat')
    return state


def _listing(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f', ... ({len(keys)} in total)' if len(keys) > limit else f' ({len(keys)})'
    return ', '.join(keys[:limit]) + more


def check_state_dict(module: nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError unless `state_dict` has exactly the module's keys (buffers included) and shapes."""
    expected = module.state_dict(keep_vars=True)
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    reshaped = {k for k in expected.keys() & state_dict.keys() if tuple(expected[k].shape) != tuple(state_dict[k].shape)}
    if not (missing or unexpected or reshaped):
        return
    lines = [f'checkpoint {source} does not match {type(module).__name__}:']
    if missing:
        lines.append(f'  missing keys: {_listing(missing)}')
    if unexpected:
        lines.append(f'  unexpected keys: {_listing(unexpected)}')
    if reshaped:
        first = sorted(reshaped)[:5]
        shapes = ', '.join(f'{k} file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}' for k in first)
        lines.append(f'  shape mismatches ({len(reshaped)}): {shapes}')
    lines.append('  fix: pass the checkpoint that belongs to this preset (var_d{16,20,24,30}.pth for the generator of '
                 'that depth, vae_ch160v4096z32.pth for the tokenizer), or build the preset that matches the file')
    raise CheckpointError('\n'.join(lines))


def load_into(module: nn.Module, state_dict: Dict[str, torch.Tensor], source: str, device='cpu') -> nn.Module:
    """Check, then load `state_dict` strictly into `module` (which may live on the meta device) and move it to
    `device`. Floating tensors take the module's dtype; integer buffers keep theirs."""
    check_state_dict(module, state_dict, source)
    expected = module.state_dict(keep_vars=True)
    converted = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    module.load_state_dict(converted, strict=True, assign=True)
    return module.to(device).eval().requires_grad_(False)


def load_var(depth: int, ckpt_dir: Optional[PathLike] = None, device='cpu', var_path: Optional[PathLike] = None,
             vae_path: Optional[PathLike] = None) -> Tuple[VAR, VQVAE]:
    """The released VAR-d{depth} generator and its tokenizer, in eval mode without gradients."""
    preset = get_preset(f'var_d{depth}')
    var, vae = build(preset.name, device='meta')
    for module, filename, path in ((var, preset.checkpoint, var_path), (vae, preset.vae_checkpoint, vae_path)):
        local = resolve_checkpoint(filename, ckpt_dir, path)
        load_into(module, read_state_dict(local), str(local), device)
    return var, vae
