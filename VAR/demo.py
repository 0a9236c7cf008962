"""The whole PTQ4ARVG workflow on a small VAR, offline, in about a minute on a CPU.

    python -m VAR.demo --out outputs/demo                  # var_tiny, random weights (no download)
    python -m VAR.demo --depth 16 --out outputs/d16 ...    # the released VAR-d16 (downloads, wants a GPU)

Steps (each is also a script: VAR.calibrate, VAR.quantize, VAR.sample):
1. calibration: generate N labels with CFG, keep N of the 2N sequences by DGC;
2. quantize with PTQ4ARVG (and the baselines asked for) and save each quantized state;
3. sample the same labels and seeds with the FP and every quantized model (sharded, resumable .npz + grid);
4. report how far each quantized model's tokens and images are from the FP ones.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from quant import load_quantized, quantize, recipe, save_quantized
from sampling import SamplingRun, class_labels, run_sampling

from .adapter import var_adapter
from .calibrate import draw_labels, generate_raw_set
from .cli import add_model_args, load_models
from .quantize import parse_bits
from .sampling import make_sample_fn
from quant.calibration import CalibrationSet, select_calibration


def sample(var, vae, out_dir: Path, labels: np.ndarray, batch_size: int, dtype: str, description: dict) -> dict:
    run = SamplingRun(out_dir=out_dir, labels=labels, batch_size=batch_size, seed=0, grid_images=len(labels),
                      description=description)
    npz = run_sampling(make_sample_fn(var, vae, dtype=dtype), run, progress=False)
    return dict(np.load(npz))


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument('--out', type=Path, default=Path('outputs/demo'))
    p.add_argument('--methods', default='ptq4arvg,smoothquant,rtn', help='comma-separated recipes')
    p.add_argument('--bits', type=parse_bits, default=(6, 6))
    p.add_argument('--num-labels', type=int, default=16, help='calibration images (2N sequences before DGC)')
    p.add_argument('--classes', type=int, default=8, help='sample one image for each of the first C classes')
    p.add_argument('--per-class', type=int, default=2)
    p.add_argument('--batch-size', type=int, default=8)
    args = p.parse_args(argv)
    if args.preset is None and args.depth is None:
        args.preset = 'var_tiny'
    start = time.perf_counter()
    var, vae, preset, random_weights = load_models(args)
    device = var.lvl_1L.device
    dtype = 'fp16' if device.type == 'cuda' else 'fp32'
    args.out.mkdir(parents=True, exist_ok=True)

    print(f"[1/4] calibration set for {preset} ({'random' if random_weights else 'released'} weights)")
    calib_path = args.out / 'calibration.safetensors'
    if calib_path.exists():
        calibration = CalibrationSet.load(calib_path)
    else:
        labels = draw_labels(args.num_labels, var.num_classes, seed=0, official=False)
        raw = generate_raw_set(var, vae, labels, batch_size=args.batch_size, seed=0, top_p=0.96,
                               official_reseed=False, progress=False)
        calibration = select_calibration(var, var_adapter(var), raw, batch_size=args.batch_size, progress=False)
        calibration.save(calib_path)
    print(f"      {len(calibration)} sequences kept by DGC ({calibration.meta['dgc']['mode']}), "
          f"cond fraction {calibration.meta['dgc']['pct_cond']:.2f}")

    labels = class_labels(args.per_class, list(range(args.classes)))
    description = {'preset': preset, 'dtype': dtype}
    print(f"[2/4] full-precision samples: {len(labels)} images")
    reference = sample(var, vae, args.out / 'fp', labels, args.batch_size, dtype, {**description, 'model': 'fp'})

    w_bits, a_bits = args.bits
    rows = []
    for method in [m.strip() for m in args.methods.split(',') if m.strip()]:
        r = recipe(method, w_bits=w_bits, a_bits=a_bits, batch_size=args.batch_size)
        print(f"[3/4] {r.name}: quantize, save, reload onto a fresh model, sample")
        model, _, _, _ = load_models(args, device)
        t0 = time.perf_counter()
        handle = quantize(model, var_adapter(model), r, calibration, progress=False)
        seconds = time.perf_counter() - t0
        state = save_quantized(handle, args.out / f'{r.name}.safetensors')
        fresh, _, _, _ = load_models(args, device)
        load_quantized(fresh, var_adapter(fresh), state)
        out = sample(fresh, vae, args.out / r.name, labels, args.batch_size, dtype, {**description, 'model': r.name})
        same_tokens = float((out['idx_BL'] == reference['idx_BL']).mean())
        psnr = 10 * np.log10(255.0 ** 2 / max(np.mean((out['arr_0'].astype(np.float64) - reference['arr_0']) ** 2), 1e-12))
        rows.append((r.name, seconds, same_tokens, psnr))

    print("[4/4] quantized vs full precision (same labels and seeds)")
    print(f"      {'recipe':<18} {'calibration s':>13} {'tokens equal to FP':>19} {'image PSNR dB':>14}")
    for name, seconds, same, psnr in rows:
        print(f"      {name:<18} {seconds:>13.1f} {same:>19.1%} {psnr:>14.1f}")
    print(f"done in {time.perf_counter() - start:.0f} s; samples (samples.npz, grid.png) under {args.out}/")
    return 0


if __name__ == '__main__':
    sys.exit(main())
