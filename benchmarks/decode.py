"""VQVAE decode of VAR samples on a GPU: the image decoder is half of VAR-d16's generation time at batch 100.

    python benchmarks/decode.py --out benchmarks/decode.md

Times `decode_f_hat` (batch 100, 16x16x32 latents -> 256x256 images) under bf16 autocast in the layouts and
settings that can change its speed without changing what it computes: chunk size, channels-last tensors,
cuDNN autotuning; then with the decoder's GroupNorm + SiLU pairs fused into one kernel each
(`VAR.deploy.fuse_decoder`, which changes the images by float32 rounding only). Same process, same inputs, median of 5 runs after a warm-up; results are checked against the
default layout (max abs difference of the images).
"""
from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from generate import timed_median  # benchmarks/ is on sys.path when this script runs
from VAR.deploy import fuse_decoder
from VAR.presets import create
from VAR.sampling import decode_f_hat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("decode.md"))
    args = parser.parse_args()
    _, vae = create("var_d16", device="cuda", seed=0)
    g = torch.Generator(device="cuda").manual_seed(0)
    f_hat = torch.randn(args.batch, vae.Cvae, 16, 16, device="cuda", generator=g)
    rows, reference = [], None
    settings = [(False, bench, cl) for bench in (False, True) for cl in (False, True)] + [(True, False, False)]
    for fused, benchmark_cudnn, channels_last in settings:
        if fused:
            fuse_decoder(vae)
        torch.backends.cudnn.benchmark = benchmark_cudnn
        vae.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        latents = f_hat.contiguous(memory_format=torch.channels_last) if channels_last else f_hat
        for chunk in (25, 50, None):
            def run():
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return decode_f_hat(vae, latents, chunk)
            images = run().float()
            reference = images if reference is None else reference
            torch.cuda.reset_peak_memory_stats()
            seconds = timed_median(run, repeats=5)
            rows.append((fused, benchmark_cudnn, channels_last, chunk, seconds, torch.cuda.max_memory_allocated() / 1e9,
                         (images - reference).abs().max().item()))
            print(rows[-1], flush=True)
    base = rows[0][4]
    lines = ["# VQVAE decode (VAR tokenizer), batch of latents to 256x256 images", "",
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, Python "
             f"{platform.python_version()}; batch {args.batch}, bf16 autocast, median of 5 runs after a warm-up.", "",
             "| fused GroupNorm + SiLU | cudnn.benchmark | channels_last | chunk | seconds | images/s | speedup | "
             "peak GB | max abs diff |", "|---|---|---|---|---|---|---|---|---|"]
    for fused, bench, cl, chunk, seconds, peak, diff in rows:
        lines.append(f"| {fused} | {bench} | {cl} | {chunk or 'all'} | {seconds:.4f} | {args.batch / seconds:.0f} | "
                     f"{base / seconds:.2f}x | {peak:.1f} | {diff:.2e} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
