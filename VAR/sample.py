"""Sample images from VAR (full precision, or quantized with --quant-state) into a resumable run folder.

    python -m VAR.sample --depth 16 --out outputs/var_d16                  # 50 per class, 50,000 images
    torchrun --nproc_per_node 8 -m VAR.sample --depth 30 --out outputs/var_d30
    python -m VAR.sample --preset var_tiny --per-class 1 --classes 0-15 --out /tmp/tiny   # CPU smoke test
    python -m VAR.sample --depth 30 --quant-state q.safetensors --int8 --int8-kv-cache --fused-decoder \
        --cuda-graphs --dtype bf16 --out outputs/var_d30_w8a8                # real INT8 kernels, the fast path

Writes OUT/shards/*.npz (one per batch), then OUT/samples.npz (`arr_0`: uint8 NHWC, class-interleaved order;
`labels`; `idx_BL`: the sampled token ids) and OUT/grid.png. Rerunning the same command resumes.

Defaults follow the official FID recipe: cfg 1.5, top-k 900, top-p 0.96, fp16 autocast on GPU, uint8 by
truncation. Seeds: batch i uses a seed derived from (--seed, i). --official-reseed instead re-seeds every batch
with --seed, as the reference script does (with --seed 42 --label-order sorted --batch-size 100 it replays
that script's random draws).
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch

from sampling import LABEL_ORDERS, SamplingRun, class_labels, device_for_rank, rank_info_from_env, run_sampling

from .cli import add_model_args, load_models
from .sampling import AUTOCAST_DTYPES, RECIPE, SamplingRecipe, make_sample_fn


def parse_classes(spec: Optional[str], num_classes: int) -> List[int]:
    """'0-9,42,100-102' -> [0..9, 42, 100, 101, 102]; None -> all classes."""
    if not spec:
        return list(range(num_classes))
    classes = []
    for part in spec.split(','):
        lo, _, hi = part.strip().partition('-')
        try:
            classes.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise SystemExit(f'--classes {spec!r}: use comma-separated ids or ranges such as 0-9,42')
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise SystemExit(f'--classes: ids {bad[:5]} are outside [0, {num_classes})')
    return classes


def apply_quant_state(var, path: Path):
    """Quantize `var` in place with the state saved by `VAR.quantize` (quant.io.load_quantized)."""
    try:
        from quant.io import load_quantized

        from .adapter import var_adapter
    except ImportError as err:
        raise SystemExit(f'--quant-state needs quant.io.load_quantized and VAR.adapter, which are not available in this '
                         f'installation ({err}); update the ptq4arvg package, or sample without --quant-state') from err
    if not Path(path).is_file():
        raise SystemExit(f'--quant-state {path} not found: create it with python -m VAR.quantize')
    return load_quantized(var, var_adapter(var), path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument('--quant-state', type=Path, help='quantized state saved by the quantization step')
    p.add_argument('--out', type=Path, required=True, help='run folder (shards, samples.npz, grid.png)')
    p.add_argument('--per-class', type=int, default=50)
    p.add_argument('--classes', default=None, help='class ids, e.g. 0-999 or 1,7,42 (default: all)')
    p.add_argument('--label-order', default='interleaved', choices=LABEL_ORDERS)
    p.add_argument('--num-images', type=int, help='only the first N images of the schedule')
    p.add_argument('--batch-size', type=int, default=100)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--official-reseed', action='store_true', help='re-seed every batch with --seed (reference script)')
    p.add_argument('--cfg', type=float, default=RECIPE.cfg)
    p.add_argument('--top-k', type=int, default=RECIPE.top_k)
    p.add_argument('--top-p', type=float, default=RECIPE.top_p)
    p.add_argument('--dtype', choices=sorted(AUTOCAST_DTYPES), help='autocast precision (default fp16 on GPU, fp32 on CPU)')
    p.add_argument('--int8', action='store_true',
                   help='run the quantized model on the INT8 kernels (VAR.deploy.to_int8; needs --quant-state). '
                        'Attention runs unquantized in F.scaled_dot_product_attention')
    p.add_argument('--int8-kv-cache', action='store_true',
                   help='with --int8: store the KV cache as the int8 codes of the calibrated K/V quantizers')
    p.add_argument('--fused-decoder', action='store_true',
                   help="the VQVAE decoder's GroupNorm + SiLU pairs as one kernel each (VAR.deploy.fuse_decoder)")
    p.add_argument('--cuda-graphs', action='store_true', help='replay each scale as a CUDA graph (GPU only)')
    p.add_argument('--max-batches', type=int, help='stop after this many new batches (rerun to continue)')
    p.add_argument('--grid', type=int, default=64, help='images in grid.png')
    p.add_argument('--no-progress', action='store_true')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    rank = rank_info_from_env()
    device = torch.device(args.device or device_for_rank(rank))   # cuda:LOCAL_RANK under torchrun
    var, vae, preset_name, random_weights = load_models(args, device)
    dtype = args.dtype or ('fp16' if device.type == 'cuda' else 'fp32')
    if args.int8 and args.quant_state is None:
        raise SystemExit('--int8 runs a quantized model on the INT8 kernels: give its --quant-state')
    if args.int8_kv_cache and not args.int8:
        raise SystemExit('--int8-kv-cache is part of the INT8 deployment: add --int8')
    if args.cuda_graphs and device.type != 'cuda':
        raise SystemExit(f'--cuda-graphs needs a CUDA device, not {device}')
    if args.quant_state is not None:
        apply_quant_state(var, args.quant_state)
    deployment = 'fake-quant' if args.quant_state is not None else 'full precision'
    if args.int8:
        from .deploy import to_int8
        print(to_int8(var, attention='sdpa', kv_cache='int8' if args.int8_kv_cache else 'model'), file=sys.stderr)
        deployment = 'int8 + int8 kv cache' if args.int8_kv_cache else 'int8'
    if args.fused_decoder:
        from .deploy import fuse_decoder
        fuse_decoder(vae)

    labels = class_labels(args.per_class, parse_classes(args.classes, var.num_classes), args.label_order)
    if args.num_images is not None:
        labels = labels[:args.num_images]
    recipe = SamplingRecipe(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    run = SamplingRun(
        out_dir=args.out, labels=labels, batch_size=args.batch_size, seed=args.seed,
        reseed_each_batch=args.official_reseed, grid_images=args.grid,
        description={'family': 'VAR', 'preset': preset_name,
                     'weights': f'random (seed {args.weights_seed})' if random_weights else 'released',
                     'quant_state': str(args.quant_state) if args.quant_state else None, 'deployment': deployment,
                     'fused_decoder': args.fused_decoder, 'dtype': dtype,
                     'cfg': recipe.cfg, 'top_k': recipe.top_k, 'top_p': recipe.top_p, 'label_order': args.label_order})
    npz = run_sampling(make_sample_fn(var, vae, recipe, dtype, cuda_graphs=args.cuda_graphs), run, rank=rank, max_new_batches=args.max_batches,
                       progress=not args.no_progress)
    if npz is not None:
        print(f'wrote {npz} ({len(labels)} images) and {npz.parent / "grid.png"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
