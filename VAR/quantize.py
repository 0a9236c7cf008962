"""Quantize VAR on a calibration set and save the quantized state.

    python -m VAR.quantize --depth 16 --calibration outputs/var_d16/calibration.safetensors \
        --method ptq4arvg --bits w6a6 --out outputs/var_d16/ptq4arvg_w6a6.safetensors
    python -m VAR.quantize --depth 16 --method ptq4arvg --bits w8a8 --dry-run     # print the layer map

Then sample with `python -m VAR.sample --depth 16 --quant-state outputs/var_d16/ptq4arvg_w6a6.safetensors ...`.
`--faithful` reproduces the official numerics (three percentile candidates, plain activation MSE, EMA over
64-sample mini-batches, mask-less calibration replay).
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path
from typing import List, Optional

from quant import CalibrationSet, quantize, recipe, save_quantized
from quant.recipes import METHODS

from .adapter import OFFICIAL_RECIPE_OPTIONS, var_adapter
from .cli import add_model_args, load_models


def parse_bits(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"w(\d)a(\d)", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"bits must look like w8a8 or w6a6, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument('--calibration', type=Path, help='calibration set from VAR.calibrate')
    p.add_argument('--method', default='ptq4arvg', choices=sorted(METHODS))
    p.add_argument('--bits', type=parse_bits, default=(8, 8), help='w8a8 (default), w6a6, w4a8, ...')
    p.add_argument('--no-attention', action='store_true', help='keep the attention products in floating point')
    p.add_argument('--w-symmetric', action='store_true',
                   help='symmetric weight grids: exact on the INT8 kernels (sample with --int8)')
    p.add_argument('--batch-size', type=int, default=32, help='calibration mini-batch')
    p.add_argument('--calibration-order', choices=('sequential', 'joint'), default='sequential')
    p.add_argument('--faithful', action='store_true', help="the official code's numerics")
    p.add_argument('--dry-run', action='store_true', help='print the layer map and exit')
    p.add_argument('--out', type=Path, help='quantized state written here (safetensors)')
    p.add_argument('--no-progress', action='store_true')
    return p


def build_recipe(args):
    w_bits, a_bits = args.bits
    r = recipe(args.method, w_bits=w_bits, a_bits=a_bits, quantize_attention=not args.no_attention,
               batch_size=args.batch_size, calibration_order=args.calibration_order, w_symmetric=args.w_symmetric)
    return r.faithful(**OFFICIAL_RECIPE_OPTIONS) if args.faithful else r


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    var, _, preset, _ = load_models(args)
    adapter = var_adapter(var, official_maskless_replay=args.faithful)
    r = build_recipe(args)
    if args.dry_run:
        quantize(var, adapter, r, dry_run=True)
        return 0
    if args.calibration is None or args.out is None:
        raise SystemExit('--calibration and --out are required (or use --dry-run)')
    calibration = CalibrationSet.load(args.calibration)
    start = time.perf_counter()
    handle = quantize(var, adapter, r, calibration, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    print(handle.summary())
    save_quantized(handle, args.out)
    print(f"{preset}: {r.name} calibrated on {len(calibration)} sequences in {seconds:.1f} s; wrote {args.out}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
