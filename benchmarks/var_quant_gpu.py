"""VAR calibration time and fake-quant sampling on a GPU, with random weights of the real sizes.

    python benchmarks/var_quant_gpu.py --out benchmarks/var_quant_gpu.md [--presets var_d16 var_d30]

For each model: build the calibration set the way VAR.calibrate does (128 labels with CFG → 256 sequences,
DGC keeps 128), run the full ptq4arvg W8A8 calibration (SQ → shift → GPS → STWQ, sequential block-wise
activation calibration), then sample batches of 100 images with CFG (fp16 autocast) with the FP model and the
fake-quant W8A8 model, reporting images/s and peak memory. Fake quantization simulates the numerics; the real
INT8 speed-ups are measured by benchmarks/gemm.py and benchmarks/generate.py.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from quant import quantize, recipe
from quant.calibration import select_calibration
from VAR.adapter import var_adapter
from VAR.calibrate import draw_labels, generate_raw_set
from VAR.presets import create
from VAR.sampling import make_sample_fn


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def sampling_speed(var, vae, batches: int, batch_size: int) -> dict:
    sample = make_sample_fn(var, vae, dtype="fp16" if torch.cuda.is_available() else "fp32")
    labels = np.arange(batch_size) % var.num_classes
    sample(labels, seed=0)  # warm-up (allocator, kernels)
    reset_peak()
    _, seconds = timed(lambda: [sample(labels, seed=i + 1) for i in range(batches)])
    return {"images_per_s": batches * batch_size / seconds, "peak_gb": peak_gb()}


def run_preset(preset: str, batches: int, batch_size: int) -> dict:
    result = {"model": preset}
    var, vae = create(preset, device="cuda" if torch.cuda.is_available() else "cpu", seed=0)
    result["fp"] = sampling_speed(var, vae, batches, batch_size)
    labels = draw_labels(128, var.num_classes, seed=0, official=False)
    raw, result["calibration_sampling_s"] = timed(lambda: generate_raw_set(
        var, vae, labels, batch_size=32, seed=0, top_p=0.96, official_reseed=False, progress=False))
    adapter = var_adapter(var)
    selected, result["dgc_s"] = timed(lambda: select_calibration(var, adapter, raw, batch_size=32, progress=False))
    result["dgc_cond_fraction"] = selected.meta["dgc"]["pct_cond"]
    reset_peak()
    _, result["quantize_s"] = timed(lambda: quantize(var, adapter, recipe("ptq4arvg", w_bits=8, a_bits=8, batch_size=32),
                                                     selected, progress=False))
    result["quantize_peak_gb"] = peak_gb()
    result["w8a8_fake"] = sampling_speed(var, vae, batches, batch_size)
    return result


def report(results: list[dict]) -> str:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        hardware = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        hardware = f"CPU ({platform.processor() or platform.machine()})"
    lines = [
        "# VAR on a GPU: ptq4arvg calibration time and fake-quant sampling",
        "",
        f"Measured by `python benchmarks/var_quant_gpu.py` on {hardware}, "
        f"torch {torch.__version__}, Python {platform.python_version()}; random weights "
        "of the released sizes (no checkpoint on the machine).",
        "",
        "Calibration = what `VAR.calibrate` + `VAR.quantize` do: 128 labels sampled with CFG (fp32) → 256 "
        "teacher-forced sequences → DGC keeps 128 → ptq4arvg W8A8 (SQ → shift → GPS → STWQ, block-wise "
        "activation calibration).",
        "",
        "| model | calibration sampling (s) | DGC (s) | quantize (s) | total (s) | quantize peak (GB) | DGC cond fraction |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        total = r["calibration_sampling_s"] + r["dgc_s"] + r["quantize_s"]
        lines.append(f"| {r['model']} | {r['calibration_sampling_s']:.1f} | {r['dgc_s']:.1f} | {r['quantize_s']:.1f} | "
                     f"{total:.1f} | {r['quantize_peak_gb']:.1f} | {r['dgc_cond_fraction']:.2f} |")
    lines += ["", "Sampling, batch 100 with CFG (200 sequences), fp16 autocast, 10 scales:", "",
              "| model | FP images/s | FP peak (GB) | fake-quant W8A8 images/s | fake-quant peak (GB) |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['fp']['images_per_s']:.1f} | {r['fp']['peak_gb']:.1f} | "
                     f"{r['w8a8_fake']['images_per_s']:.1f} | {r['w8a8_fake']['peak_gb']:.1f} |")
    lines += ["", "Fake quantization runs extra elementwise work around every linear and the explicit attention "
              "products, so it is slower than FP by design; it exists to measure quality.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["var_d16", "var_d30"])
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("var_quant_gpu.md"))
    args = parser.parse_args()
    results = []
    for preset in args.presets:
        results.append(run_preset(preset, args.batches, args.batch_size))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the previous model is gone with run_preset's frame
        print(json.dumps(results[-1]), flush=True)
        args.out.write_text(report(results))  # after every model, so a cut-short run keeps what it measured
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
