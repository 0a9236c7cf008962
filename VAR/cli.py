"""Command-line pieces shared by VAR's sample / calibrate / quantize scripts."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Tuple

import torch

from .loading import load_var
from .model import VAR
from .presets import PRESETS, create, get_preset
from .vqvae import VQVAE


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--preset', default=None, choices=sorted(PRESETS), help='model preset (default var_d16)')
    p.add_argument('--depth', type=int, choices=(16, 20, 24, 30), help='shorthand for --preset var_d{depth}')
    p.add_argument('--ckpt-dir', type=Path, help='folder holding var_d*.pth and vae_ch160v4096z32.pth '
                                                 '(default: download from Hugging Face FoundationVision/var)')
    p.add_argument('--random-weights', action='store_true', help='skip the checkpoints; deterministic random weights')
    p.add_argument('--weights-seed', type=int, default=0, help='seed of the random weights')
    p.add_argument('--device', help='default: cuda if available, else cpu')


def load_models(args: argparse.Namespace, device: torch.device | str | None = None) -> Tuple[VAR, VQVAE, str, bool]:
    """(var, vae, preset name, random_weights) from the --preset/--depth/--ckpt-dir/--random-weights options."""
    if args.preset and args.depth:
        raise SystemExit('give either --preset or --depth, not both')
    preset = get_preset(args.preset or f'var_d{args.depth or 16}')
    device = device or args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    random_weights = args.random_weights or not preset.checkpoint
    if random_weights:
        var, vae = create(preset.name, device=device, seed=args.weights_seed)
    else:
        var, vae = load_var(preset.var.depth, ckpt_dir=args.ckpt_dir, device=device)
    return var, vae, preset.name, random_weights
