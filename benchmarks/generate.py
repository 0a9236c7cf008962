"""End-to-end VAR generation on a GPU: bf16 vs real W8A8 (INT8 kernels), with and without the INT8 KV cache.

    python benchmarks/generate.py --out benchmarks/generate.md [--presets var_d16 var_d30]

Random weights of the released sizes. The W8A8 model is quantized (ptq4arvg, symmetric 8-bit weights so the
INT8 weights are exact) on a small calibration set (speed does not depend on calibration quality), converted
with `kernels.convert(attention="sdpa")`, and timed on the same labels and seeds as the bf16 model: batch 100
with CFG, 10 scales, bf16 autocast, VQVAE decode included. Also the paper's deployment setting: one forward of
the transformer on 100 x 2 sequences of 64 / 128 / 256 tokens. Needs the built extension
(kernels/README.md); without it the INT8 path falls back to torch._int_mm and the numbers say so.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import kernels
from kernels.convert import convert
from quant import quantize, recipe
from VAR.adapter import var_adapter
from VAR.calibrate import draw_labels, generate_raw_set
from VAR.presets import create
from VAR.sampling import make_sample_fn

REPEATS = 3


def timed_median(fn, repeats: int = REPEATS) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def generation(var, vae, batch: int) -> dict:
    sample = make_sample_fn(var, vae, dtype="bf16")
    labels = np.arange(batch) % 1000
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds = timed_median(lambda: sample(labels, seed=1))
    return {"seconds": seconds, "images_per_s": batch / seconds, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}


@torch.no_grad()
def single_forward(var, tokens: int, batch: int) -> float:
    x = torch.randn(2 * batch, tokens, var.C, device="cuda")
    cond = var.class_emb(torch.arange(2 * batch, device="cuda") % 1000)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return timed_median(lambda: var.forward_blocks(x, cond, attn_bias=None))


def quantized(var, vae):
    labels = draw_labels(4, var.num_classes, seed=0, official=False)
    raw = generate_raw_set(var, vae, labels, batch_size=4, seed=0, top_p=0.96, official_reseed=False, progress=False)
    model = copy.deepcopy(var)
    quantize(model, var_adapter(model), recipe("ptq4arvg", w_bits=8, a_bits=8, w_symmetric=True, batch_size=8,
                                               calibration_order="joint"), raw, progress=False)
    return model


def run_preset(preset: str, batch: int, lengths: list[int]) -> dict:
    var, vae = create(preset, device="cuda", seed=0)
    result = {"model": preset, "bf16": generation(var, vae, batch)}
    result["bf16_forward"] = {n: single_forward(var, n, batch) for n in lengths}
    int8 = quantized(var, vae)
    del var
    spare = copy.deepcopy(int8).cpu()  # kept off the GPU so each run's peak holds one model only
    result["conversion"] = str(convert(int8, attention="sdpa"))
    result["w8a8"] = generation(int8, vae, batch)
    result["w8a8_forward"] = {n: single_forward(int8, n, batch) for n in lengths}
    del int8
    kv8 = spare.cuda()
    convert(kv8, attention="sdpa", kv_cache="int8")
    result["w8a8_kv8"] = generation(kv8, vae, batch)
    del kv8, vae
    torch.cuda.empty_cache()
    return result


def report(results: list[dict], batch: int, lengths: list[int]) -> str:
    props = torch.cuda.get_device_properties(0)
    lines = [
        "# VAR generation: bf16 vs real W8A8 (INT8 kernels) and the INT8 KV cache",
        "",
        f"Measured by `python benchmarks/generate.py` on {props.name}, torch {torch.__version__}, CUDA "
        f"{torch.version.cuda}, Python {platform.python_version()}; INT8 backend `{kernels.active_backend()}` "
        f"({kernels.extension_status()}). Random weights of the released sizes; median of {REPEATS} runs after a "
        f"warm-up; batch {batch} with CFG ({2 * batch} sequences), bf16 autocast, VQVAE decode included.",
        "",
        "| model | bf16 images/s | W8A8 images/s | speedup | W8A8 + INT8 KV images/s | bf16 peak GB | W8A8 peak GB | W8A8 + INT8 KV peak GB | memory ratio (INT8 KV / bf16) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b, q, k = r["bf16"], r["w8a8"], r["w8a8_kv8"]
        lines.append(f"| {r['model']} | {b['images_per_s']:.1f} | {q['images_per_s']:.1f} | "
                     f"{q['images_per_s'] / b['images_per_s']:.2f}x | {k['images_per_s']:.1f} | {b['peak_gb']:.1f} | "
                     f"{q['peak_gb']:.1f} | {k['peak_gb']:.1f} | {k['peak_gb'] / b['peak_gb']:.2f} |")
    lines += ["", f"Paper setting: one transformer forward (all blocks + head, no cache) on {2 * batch} sequences:", "",
              "| model | tokens | bf16 ms | W8A8 ms | speedup |", "|---|---|---|---|---|"]
    for r in results:
        for n in lengths:
            bf, q = r["bf16_forward"][n], r["w8a8_forward"][n]
            lines.append(f"| {r['model']} | {n} | {1e3 * bf:.2f} | {1e3 * q:.2f} | {bf / q:.2f}x |")
    lines += ["", "Conversion reports:", ""]
    for r in results:
        lines += [f"- {r['model']}: " + r["conversion"].replace("\n", "; ")]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["var_d16", "var_d30"])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("generate.md"))
    args = parser.parse_args()
    results = []
    for preset in args.presets:
        results.append(run_preset(preset, args.batch, args.lengths))
        print(json.dumps(results[-1]), flush=True)
        args.out.write_text(report(results, args.batch, args.lengths))
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
