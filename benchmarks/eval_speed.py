"""End-to-end speed of the torch evaluator backend: 50,000 samples + 10,000 reference images.

The network is a synthetic GraphDef of the real Inception-v3 (2015) architecture and size (random
weights, ~95 MB like classify_image_graph_def.pb), written to disk and loaded through the same
.pb -> torch conversion as the real file. Images are random uint8 256x256 RGB in np.savez files; the
reference file carries cached mu/sigma/mu_s/sigma_s (random SPD matrices) like
VIRTUAL_imagenet256_labeled.npz. Timed: loading and converting the .pb, reading both files, features,
np.cov, IS, both sqrtm's, precision/recall. The metric values are meaningless (random network/data).

For scale, the same forward pass is timed with torchvision's hand-written Inception-v3 (same FLOPs,
random weights, IEEE fp32), and the run is set against the TensorFlow-on-CPU figure of the reference
evaluator. Needs only torch, numpy, scipy (and torchvision for the comparison, optional).

    python benchmarks/eval_speed.py --report benchmarks/eval_speed.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation import evaluate  # noqa: E402
from evaluation.backends import TorchBackend, cudnn_autotune, full_fp32  # noqa: E402
from evaluation.graph_torch import legacy_resize_bilinear  # noqa: E402
from evaluation.graphdef import serialize_graph_def  # noqa: E402
from evaluation.inception_file import read_graph_bytes  # noqa: E402
from evaluation.synthetic_graph import inception_graph_def  # noqa: E402

# The reference evaluator measured separately with TensorFlow 2.21 on a 2-core CPU: ~10 img/s for the
# network, ~105 min for 10k + 50k images end to end.
TF_CPU_MINUTES = 105


def random_images(n: int, size: int, device: torch.device, seed: int) -> np.ndarray:
    out = np.empty((n, size, size, 3), np.uint8)
    generator = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, n, 2000):
        count = min(2000, n - start)
        chunk = torch.randint(0, 256, (count, size, size, 3), dtype=torch.uint8, device=device, generator=generator)
        out[start:start + count] = chunk.cpu().numpy()
    return out


def random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d)


def work_directory(needed_bytes: int) -> Path:
    """RAM-backed /dev/shm when it has room (the files are then read from memory), else the temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 1.2 * needed_bytes:
        return Path(tempfile.mkdtemp(dir=shm, prefix="eval_speed_"))
    return Path(tempfile.mkdtemp(prefix="eval_speed_"))


def time_torchvision(images: np.ndarray, device: torch.device, batch_size: int) -> float:
    """img/s of torchvision's Inception-v3 fed like the graph (uint8 -> float -> legacy resize to 299)."""
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, init_weights=False).eval().to(device)
    net = net.to(memory_format=torch.channels_last)
    return _throughput(lambda x: net(legacy_resize_bilinear(x, (299, 299)).permute(0, 3, 1, 2)), images,
                       device, batch_size)


def _throughput(forward, images: np.ndarray, device: torch.device, batch_size: int) -> float:
    """img/s of forward(float NHWC batch) over `images`, after one warm-up batch."""
    def run(batch):
        return forward(torch.from_numpy(batch).to(device, non_blocking=True).float())

    with torch.no_grad(), full_fp32(), cudnn_autotune():
        run(images[:batch_size])  # warm-up: cuDNN autotuning
        _sync(device)
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            run(images[i:i + batch_size])
        _sync(device)
    return len(images) / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "cpu cores": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "gpu memory (GiB)": round(props.total_memory / 2 ** 30, 1),
                     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()})
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=50_000)
    parser.add_argument("--num-ref", type=int, default=10_000)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--is-split-size", type=int, default=5000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compare-images", type=int, default=5000,
                        help="images for the torchvision forward-pass comparison (0: skip)")
    parser.add_argument("--report", default=None, help="write the markdown report here")
    parser.add_argument("--json", default=None, help="write the raw numbers here")
    args = parser.parse_args()
    device = torch.device(args.device)
    setup: dict[str, float] = {}

    def log(message: str) -> None:
        print(message, flush=True)

    image_bytes = (args.num_samples + args.num_ref) * args.image_size ** 2 * 3
    workdir = work_directory(image_bytes)
    log(f"work directory {workdir}; environment: {json.dumps(environment(device))}")
    try:
        start = time.perf_counter()
        noise = np.random.default_rng(0).integers(0, 256, (8, args.image_size, args.image_size, 3), dtype=np.uint8)
        graph_path = workdir / "classify_image_graph_def.pb"
        graph_path.write_bytes(serialize_graph_def(inception_graph_def(calibration_images=noise)))
        setup["build synthetic .pb"] = time.perf_counter() - start
        log(f"synthetic graph: {graph_path.stat().st_size / 1e6:.1f} MB in {setup['build synthetic .pb']:.1f} s")

        start = time.perf_counter()
        rng = np.random.default_rng(1)
        ref_images = random_images(args.num_ref, args.image_size, device, 2)
        np.savez(workdir / "ref.npz", arr_0=ref_images, mu=rng.standard_normal(2048) * 0.1,
                 sigma=random_spd(2048, rng), mu_s=rng.standard_normal(2023) * 0.1, sigma_s=random_spd(2023, rng))
        samples = random_images(args.num_samples, args.image_size, device, 3)
        np.savez(workdir / "samples.npz", arr_0=samples)
        compare = samples[:args.compare_images].copy()
        del samples, ref_images
        setup["write npz files"] = time.perf_counter() - start
        log(f"wrote {image_bytes / 1e9:.1f} GB of npz in {setup['write npz files']:.1f} s")

        # ---- timed: what `python -m evaluation.test ref.npz samples.npz --backend torch` does ----
        total_start = time.perf_counter()
        start = time.perf_counter()
        backend = TorchBackend(read_graph_bytes(graph_path), device)
        load_seconds = time.perf_counter() - start
        metrics = evaluate(str(workdir / "ref.npz"), str(workdir / "samples.npz"), backend, args.batch_size,
                           args.is_split_size, progress=False, log=log)
        total = time.perf_counter() - total_start
        phases = {"load + convert .pb": load_seconds, **metrics.timings}
        log(json.dumps({"total_s": total, **phases}))

        comparison = {}
        if args.compare_images:
            comparison["graph converter (img/s)"] = _throughput(lambda x: backend.net(x), compare, device,
                                                                args.batch_size)
            try:
                comparison["torchvision Inception-v3 (img/s)"] = time_torchvision(compare, device, args.batch_size)
            except Exception as error:  # optional: report why it is missing
                log(f"torchvision comparison skipped: {error!r}")
            log(json.dumps(comparison))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result = {"environment": environment(device), "config": vars(args), "setup_s": setup, "phases_s": phases,
              "total_s": total, "metrics (stand-in)": metrics.as_dict(), "comparison": comparison,
              "peak gpu memory (GiB)": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                                        if device.type == "cuda" else None),
              "peak host memory (GiB)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.report:
        Path(args.report).write_text(report(result, workdir))
    log(f"total {total:.1f} s")


def report(r: dict, workdir: Path) -> str:
    env, cfg, phases, total = r["environment"], r["config"], r["phases_s"], r["total_s"]
    images = cfg["num_samples"] + cfg["num_ref"]
    feature_seconds = phases["reference activations"] + phases["sample activations"]
    lines = [
        "# Evaluator speed: torch backend, 50,000 samples + 10,000 reference images",
        "",
        "Produced by `python benchmarks/eval_speed.py --report benchmarks/eval_speed.md` (one run).",
        "",
        "## Setup",
        "",
        f"- Hardware: {env.get('gpu', 'CPU')}" + (f" ({env['gpu memory (GiB)']} GiB)" if "gpu" in env else "")
        + f", {env['cpu cores']} CPU cores; {env['platform']}",
        f"- Software: Python {env['python']}, torch {env['torch']}"
        + (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}" if "cuda" in env else "")
        + f", numpy {env['numpy']}, scipy {env['scipy']}",
        f"- Data: {cfg['num_samples']:,} samples + {cfg['num_ref']:,} reference images, random uint8 "
        f"{cfg['image_size']}x{cfg['image_size']}x3 in `np.savez` files ({images * cfg['image_size'] ** 2 * 3 / 1e9:.1f} GB); "
        f"the reference file carries cached mu/sigma/mu_s/sigma_s. Files in `{workdir.parent}` "
        f"({'RAM-backed' if str(workdir).startswith('/dev/shm') else 'disk, just written, so in the page cache'}).",
        "- Network: synthetic GraphDef of the real Inception-v3 (2015) architecture, random weights, "
        "95.7 MB, loaded from disk and converted like classify_image_graph_def.pb; IEEE fp32 (TF32 off), "
        f"batch {cfg['batch_size']}, {cfg['device']}.",
        "",
        "## Timings (end to end, one run)",
        "",
        "| phase | seconds |",
        "|---|---|",
    ]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in phases.items()]
    lines += [f"| **total** | **{total:.1f}** |", "",
              f"Features: {images / feature_seconds:,.0f} img/s including npz reading; the 50k samples alone "
              f"{cfg['num_samples'] / phases['sample activations']:,.0f} img/s (the reference phase also pays the "
              f"one-time CUDA/cuDNN start-up and autotuning). "
              f"Peak GPU memory {r['peak gpu memory (GiB)'] or 0:.1f} GiB, peak host RSS "
              f"{r['peak host memory (GiB)']:.1f} GiB. Requirement: under 180 s; measured {total:.0f} s.", ""]
    if r["comparison"]:
        size = cfg["image_size"]
        lines += ["## Comparison", "", f"| forward pass of {len(r['comparison']) and cfg['compare_images']:,} "
                  f"images: uint8 {size}x{size} -> legacy resize to 299 -> network, fp32 | img/s |", "|---|---|"]
        lines += [f"| {name.replace(' (img/s)', '')} | {rate:,.0f} |" for name, rate in r["comparison"].items()]
        rates = list(r["comparison"].values())
        if len(rates) == 2:
            lines += ["", f"The GraphDef converter runs at {rates[0] / rates[1]:.2f}x the speed of torchvision's "
                      f"hand-written module (same architecture and FLOPs, random weights)."]
        lines += [""]
    lines += [f"The reference evaluator (TensorFlow 2.21) on a 2-core CPU needs about {TF_CPU_MINUTES} minutes "
              f"for the same job (measured separately, about 10 img/s; TensorFlow is not installed on this "
              f"machine, so it was not run here): {TF_CPU_MINUTES * 60 / total:.0f}x longer.", "",
              "Metric values of this run (random network and data, meaningless): "
              + ", ".join(f"{k} {r['metrics (stand-in)'][k]:.4g}"
                          for k in ("inception_score", "fid", "sfid", "precision", "recall")) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
