"""Build VAR's calibration set: generate with CFG, record the sampled token ids, keep N of the 2N sequences by DGC.

    python -m VAR.calibrate --depth 16 --out outputs/var_d16/calibration.safetensors
    python -m VAR.calibrate --preset var_tiny --num-labels 16 --out outputs/tiny/calibration.safetensors

Each generated image gives two teacher-forced sequences, the conditional one (its class) and the unconditional
one (null class 1000, same tokens: both CFG branches see the same token maps). Batches are stored as
[cond B, uncond B] chunks. The raw 2N set is saved beside the output (`*_raw.safetensors`); the output holds
the N sequences DGC keeps, with the DGC outcome (mode, cond fraction, indices) in its metadata.

Defaults fix the official script's defects (method.md §8 #12): labels in [0, 1000), the evaluation top-p
(0.96), one seed per batch. `--official` reproduces it: labels randint(0, 999), top-p 0.95, the sampling
generator re-seeded with 42 every batch, DGC in the official ratio mode on the mask-less replay.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

import torch
from tqdm.auto import tqdm

from quant.calibration import CalibrationSet, select_calibration

from .adapter import var_adapter
from .cli import add_model_args, load_models
from .sampling import RECIPE, autoregressive_infer_cfg, make_rng

OFFICIAL_TOP_P = 0.95
OFFICIAL_G_SEED = 42


def draw_labels(num_labels: int, num_classes: int, seed: int, official: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    high = num_classes - 1 if official else num_classes  # the official randint(0, 999) never draws class 999
    return torch.randint(0, high, (num_labels,), generator=generator)


@torch.no_grad()
def generate_raw_set(var, vae, labels: torch.Tensor, *, batch_size: int, seed: int, top_p: float,
                     official_reseed: bool, progress: bool = True) -> CalibrationSet:
    """Generate every label once with CFG (fp32, as the official calibration run) and record 2N sequences."""
    device = var.lvl_1L.device
    null = var.num_classes
    parts = {"labels": [], "x_BLCv_wo_first_l": [], "idx_BL": []}
    is_cond: List[bool] = []
    batches = labels.split(batch_size)
    for index, label_B in enumerate(tqdm(batches, desc="calibration sampling", disable=not progress)):
        label_B = label_B.to(device)
        rng = make_rng(device, OFFICIAL_G_SEED if official_reseed else seed + index)
        gen = autoregressive_infer_cfg(var, vae, label_B, cfg=RECIPE.cfg, top_k=RECIPE.top_k, top_p=top_p, rng=rng,
                                       decode=False)
        x_BLCv = vae.quantize.idxBl_to_var_input(gen.idx_BL)
        B = label_B.shape[0]
        parts["labels"] += [label_B.cpu(), torch.full((B,), null)]
        parts["x_BLCv_wo_first_l"] += [x_BLCv.cpu(), x_BLCv.cpu()]
        parts["idx_BL"] += [gen.idx_BL.cpu(), gen.idx_BL.cpu()]
        is_cond += [True] * B + [False] * B
    tensors = {name: torch.cat(chunks) for name, chunks in parts.items()}
    uniform_chunks = all(len(b) == batch_size for b in batches)
    meta = {"family": "VAR", "is_cond": is_cond, "dgc_chunk": batch_size if uniform_chunks else None,
            "labels": labels.tolist(), "seed": seed, "top_p": top_p, "official_reseed": official_reseed}
    if not uniform_chunks and len(batches) > 1:
        raise ValueError(f"--num-labels {len(labels)} is not a multiple of --batch-size {batch_size}: DGC needs "
                         f"equal [cond, uncond] chunks")
    return CalibrationSet(tensors, meta)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument('--out', type=Path, required=True, help='calibration set written here (safetensors)')
    p.add_argument('--num-labels', type=int, default=128, help='N: images generated (2N sequences before DGC)')
    p.add_argument('--batch-size', type=int, default=32, help='labels per generation batch (= DGC chunk)')
    p.add_argument('--seed', type=int, default=0, help='seed of the labels and of the sampling')
    p.add_argument('--dgc', default='entropy', choices=('entropy', 'official', 'topk', 'none'),
                   help="DGC mode; 'none' keeps all 2N sequences")
    p.add_argument('--dgc-pct', type=float, help='override the cond fraction kept by DGC')
    p.add_argument('--official', action='store_true', help='reproduce the official calibration (see above)')
    p.add_argument('--no-progress', action='store_true')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    var, vae, preset, _ = load_models(args)
    raw_path = args.out.with_name(args.out.stem + "_raw" + args.out.suffix)
    if raw_path.exists():
        raw = CalibrationSet.load(raw_path)
        print(f"reusing {raw_path} ({len(raw)} sequences)")
    else:
        labels = draw_labels(args.num_labels, var.num_classes, args.seed, args.official)
        raw = generate_raw_set(var, vae, labels, batch_size=args.batch_size, seed=args.seed,
                               top_p=OFFICIAL_TOP_P if args.official else RECIPE.top_p,
                               official_reseed=args.official, progress=not args.no_progress)
        raw.meta["preset"] = preset
        raw.save(raw_path)
        print(f"wrote {raw_path} ({len(raw)} sequences)")
    if args.dgc == 'none':
        selected = raw
    else:
        adapter = var_adapter(var, official_maskless_replay=args.official)
        selected = select_calibration(var, adapter, raw, mode=args.dgc, pct=args.dgc_pct,
                                      batch_size=args.batch_size, progress=not args.no_progress)
        dgc = selected.meta["dgc"]
        print(f"DGC {dgc['mode']}: kept {len(selected)} of {len(raw)} sequences, cond fraction {dgc['pct_cond']:.3f}")
    selected.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
