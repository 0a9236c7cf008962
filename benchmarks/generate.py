"""End-to-end VAR generation on a GPU: bf16 vs real W8A8 (INT8 kernels), with and without the INT8 KV cache.

    python benchmarks/generate.py --out benchmarks/generate.md [--presets var_d16 var_d30]
    python benchmarks/generate.py --render benchmarks/generate.json     # report and chart again, no timing
    python benchmarks/generate.py --render d16.json d30.json             # ... from runs made one preset at a time

Random weights of the released sizes. The W8A8 model is quantized (ptq4arvg, symmetric 8-bit weights so the
INT8 weights are exact) on a small calibration set (speed does not depend on calibration quality) and timed
on the same labels and seeds as the bf16 model: batch 100 with CFG, 10 scales, bf16 autocast; every variant
decodes with the same VQVAE decoder (GroupNorm + SiLU fused, VAR.deploy.fuse_decoder). Variants:
  bf16           the model as sampled in bf16 autocast
  w8a8_unfused   kernels.convert(attention="sdpa"): INT8 linears, each quantizing its own input
  w8a8           VAR.deploy.to_int8: the same with LayerNorm + adaLN modulation, the residual adds and GELU
                 fused into the quantize kernels, and the attention inputs (bias, head split, q/k L2 norm, KV
                 cache write) in one kernel
  w8a8_kv8       w8a8 with the INT8 KV cache
  bf16 fused attention   bf16 with the same attention-input kernel (VAR.deploy.fuse_attention, graphs only):
                 the like-for-like bf16 baseline for the fusion that does not need INT8
Whole generation (VQVAE decode included) and token generation alone (no decode) are timed. Also the paper's
deployment setting: one forward of the transformer on 100 x 2 sequences of 64 / 128 / 256 tokens. Needs the
built extension (kernels/README.md); without it the INT8 path falls back to torch._int_mm and the report says so.
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
from quant import quantize, recipe
from VAR.adapter import var_adapter
from VAR.calibrate import draw_labels, generate_raw_set
from VAR.deploy import fuse_attention, fuse_decoder, to_int8
from VAR.presets import create
from VAR.sampling import autoregressive_infer_cfg, make_rng, make_sample_fn

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


def generation(var, vae, batch: int, cuda_graphs: bool = False) -> dict:
    sample = make_sample_fn(var, vae, dtype="bf16", cuda_graphs=cuda_graphs)
    labels = np.arange(batch) % 1000
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds = timed_median(lambda: sample(labels, seed=1))
    result = {"seconds": seconds, "images_per_s": batch / seconds, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
    label_B = torch.arange(batch, device="cuda") % 1000

    @torch.inference_mode()
    def tokens():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not cuda_graphs):
            autoregressive_infer_cfg(var, vae, label_B, rng=make_rng("cuda", 1), decode=False,
                                     forward_scale=sample.forward_scale)

    torch.cuda.reset_peak_memory_stats()
    result["tokens_seconds"] = timed_median(tokens)
    result["tokens_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def transformer_to_bf16(var) -> None:
    """bf16 weights for everything the graphs run (blocks, head): without autocast's weight cache (off under CUDA
    graphs), float32 masters would be cast again at every scale."""
    for module in (var.blocks, var.head_nm, var.head):
        module.to(torch.bfloat16)


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


VARIANTS = {"w8a8_unfused": {"fuse": False, "kv_cache": "model"}, "w8a8": {"fuse": True, "kv_cache": "model"},
            "w8a8_kv8": {"fuse": True, "kv_cache": "int8"}}


def run_preset(preset: str, batch: int, lengths: list[int]) -> dict:
    var, vae = create(preset, device="cuda", seed=0)
    fuse_decoder(vae)  # every arm decodes with the fused GroupNorm + SiLU kernel
    result = {"model": preset, "bf16": generation(var, vae, batch)}
    result["bf16_forward"] = {n: single_forward(var, n, batch) for n in lengths}
    fake_quant = quantized(var, vae).cpu()  # kept off the GPU so each run's peak holds one model only
    transformer_to_bf16(var)
    result["bf16_graphs"] = generation(var, vae, batch, cuda_graphs=True)
    fuse_attention(var)
    result["bf16_fused_attention_graphs"] = generation(var, vae, batch, cuda_graphs=True)
    del var
    torch.cuda.empty_cache()
    for name, options in VARIANTS.items():
        model = copy.deepcopy(fake_quant).cuda()
        report = to_int8(model, attention="sdpa", **options)
        if name == "w8a8":
            result["conversion"] = str(report)
        result[name] = generation(model, vae, batch)
        if name != "w8a8_kv8":
            result[f"{name}_forward"] = {n: single_forward(model, n, batch) for n in lengths}
        if options["fuse"]:
            result[f"{name}_graphs"] = generation(model, vae, batch, cuda_graphs=True)
        del model
        torch.cuda.empty_cache()
    return result


# The official VAR code as released (fp32 weights, fp16 autocast), batch 100 with CFG on an H200:
# ../shared/reference/kernels.md, section 3b (another run on the same GPU model).
OFFICIAL_IMAGES_PER_S = {"var_d16": 143.8, "var_d30": 59.1}
NAMES = {"bf16": "bf16", "w8a8_unfused": "W8A8 unfused", "w8a8": "W8A8 fused", "w8a8_kv8": "W8A8 fused + INT8 KV"}
GRAPHED = {"bf16_graphs": "bf16", "bf16_fused_attention_graphs": "bf16 + fused attention inputs",
           "w8a8_graphs": "W8A8 fused", "w8a8_kv8_graphs": "W8A8 fused + INT8 KV"}


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "backend": kernels.active_backend(),
            "extension": kernels.extension_status(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def variant_tables(results: list[dict], names: dict[str, str], baseline: str) -> list[str]:
    """Images/s, token-generation seconds and peak memory of `names`, with ratios to `baseline` (and to the bf16
    arm with the same attention fusion, where measured)."""
    keys, base = list(names), baseline
    fused = next(k for k in keys if k.startswith("w8a8") and "kv8" not in k and "unfused" not in k)
    kv8 = next(k for k in keys if "kv8" in k)
    like = next((k for k in keys if k.startswith("bf16_fused")), None)
    like_header = " | W8A8 fused / bf16 + fused attention" if like else ""
    lines = ["Whole generation (VQVAE decode included), images/s:", "",
             "| model | " + " | ".join(names.values()) + " | W8A8 fused / bf16" + like_header
             + " | W8A8 fused / official code |", "|---" * (len(names) + 3 + bool(like)) + "|"]
    for r in results:
        official = OFFICIAL_IMAGES_PER_S.get(r["model"])
        vs_official = f"{r[fused]['images_per_s'] / official:.2f}x ({official})" if official else "-"
        like_ratio = f" | {r[fused]['images_per_s'] / r[like]['images_per_s']:.2f}x" if like else ""
        lines.append(f"| {r['model']} | " + " | ".join(f"{r[k]['images_per_s']:.1f}" for k in keys)
                     + f" | **{r[fused]['images_per_s'] / r[base]['images_per_s']:.2f}x**{like_ratio} | {vs_official} |")
    lines += ["", "Token generation alone (10 scales, no VQVAE decode), seconds per batch:", "",
              "| model | " + " | ".join(names.values()) + " | W8A8 fused / bf16" + like_header + " |",
              "|---" * (len(names) + 2 + bool(like)) + "|"]
    for r in results:
        like_ratio = f" | {r[like]['tokens_seconds'] / r[fused]['tokens_seconds']:.2f}x" if like else ""
        lines.append(f"| {r['model']} | " + " | ".join(f"{r[k]['tokens_seconds']:.3f}" for k in keys)
                     + f" | **{r[base]['tokens_seconds'] / r[fused]['tokens_seconds']:.2f}x**{like_ratio} |")
    for measure, title in (("peak_gb", "whole generation"), ("tokens_peak_gb", "token generation alone")):
        if not all(measure in r[k] for r in results for k in keys):
            continue  # runs made before this measure was recorded
        lines += ["", f"Peak GPU memory during {title}, GB:", "",
                  "| model | " + " | ".join(names.values()) + " | INT8 KV / bf16 |", "|---" * (len(names) + 2) + "|"]
        for r in results:
            lines.append(f"| {r['model']} | " + " | ".join(f"{r[k][measure]:.2f}" for k in keys)
                         + f" | **{r[kv8][measure] / r[base][measure]:.3f}** |")
    return lines


def targets(results: list[dict]) -> list[str]:
    """The issue's targets, read off this run (VAR-d30 where present)."""
    r = next((r for r in results if r["model"] == "var_d30"), results[-1])

    def verdict(ok: bool) -> str:
        return "met" if ok else "not met"

    whole = {arm: r[f"w8a8{arm}"]["images_per_s"] / r[f"bf16{arm}"]["images_per_s"] for arm in ("", "_graphs")}
    tokens = {arm: r[f"bf16{arm}"]["tokens_seconds"] / r[f"w8a8{arm}"]["tokens_seconds"] for arm in ("", "_graphs")}
    memory = {arm: r[f"w8a8_kv8{arm}"]["peak_gb"] / r[f"bf16{arm}"]["peak_gb"] for arm in ("", "_graphs")}
    tokens_memory = {arm: r[f"w8a8_kv8{arm}"].get("tokens_peak_gb", float("nan"))
                     / r[f"bf16{arm}"].get("tokens_peak_gb", float("nan")) for arm in ("", "_graphs")}
    official = OFFICIAL_IMAGES_PER_S.get(r["model"])
    best = max(r[k]["images_per_s"] for k in ("w8a8", "w8a8_graphs"))
    decode = 1 - r["bf16_graphs"]["tokens_seconds"] / r["bf16_graphs"]["seconds"]
    lines = ["", f"## Targets ({r['model']})", "",
             f"- W8A8 >= 1.4x our bf16 path: whole generation **{whole['_graphs']:.2f}x** with graphs, "
             f"{whole['']:.2f}x eager ({verdict(min(whole.values()) >= 1.4)}); token generation alone "
             f"**{tokens['_graphs']:.2f}x** with graphs, {tokens['']:.2f}x eager. The VQVAE decode, unquantized and "
             f"the same in both arms, is {decode:.0%} of the graphed bf16 generation and caps the whole-generation "
             f"ratio.",
             f"- Against bf16 with the same attention-input kernel (the fusion that needs no INT8), graphed: whole "
             f"generation {r['bf16_fused_attention_graphs']['seconds'] / r['w8a8_graphs']['seconds']:.2f}x, tokens "
             f"{r['bf16_fused_attention_graphs']['tokens_seconds'] / r['w8a8_graphs']['tokens_seconds']:.2f}x.",
             f"- Peak memory <= 0.6x with the INT8 KV cache, whole generation: **{memory['_graphs']:.3f}x** with "
             f"graphs (bf16 weights), {memory['']:.3f}x eager (float32 masters) "
             f"({verdict(max(memory.values()) <= 0.6)}); token generation alone: {tokens_memory['_graphs']:.3f}x with "
             f"graphs, {tokens_memory['']:.3f}x eager. With graphs the KV buffers stay allocated for the next batch "
             f"while the images are decoded, so the decoder's working memory adds to both arms."]
    if official:
        lines.append(f"- >= 2x the official code's throughput: **{best / official:.2f}x** ({best:.1f} vs {official} "
                     f"images/s; {verdict(best / official >= 2)}).")
    lines.append("- The INT8 KV cache is read back into bf16 by one kernel per layer and scale for the fused "
                 "attention: it costs time (it saves memory); an attention kernel reading int8 K/V directly is not "
                 "written.")
    return lines


def report(run: dict) -> str:
    env, results, batch = run["environment"], run["results"], run["batch"]
    lines = [
        "# VAR generation: bf16 vs real W8A8 (INT8 kernels) and the INT8 KV cache", "",
        f"Measured by `python benchmarks/generate.py` on {env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}, "
        f"Python {env['python']}, {env['date']}; INT8 backend `{env['backend']}` ({env['extension']}). Random "
        f"weights of the released sizes; median of {REPEATS} runs after a warm-up; batch {batch} with CFG "
        f"({2 * batch} sequences), bf16 autocast. W8A8 unfused: `kernels.convert` (each INT8 linear quantizes its "
        f"own input); W8A8 fused: `VAR.deploy.to_int8` (LayerNorm + adaLN modulation, the residual adds and GELU "
        f"inside the quantize kernels, the attention inputs in one kernel); bf16 + fused attention inputs: bf16 "
        f"with that attention-input kernel (`VAR.deploy.fuse_attention`), the like-for-like baseline. Every arm decodes "
        f"images with the same VQVAE decoder, its GroupNorm + SiLU pairs fused (`VAR.deploy.fuse_decoder`, "
        f"benchmarks/decode.md). The official code's throughput is from ../shared/reference/kernels.md (same GPU model, fp16 "
        f"autocast, another run).", "",
        "## With CUDA graphs (one graph per scale, `make_sample_fn(..., cuda_graphs=True)`)", "",
        "Both arms graphed; the bf16 arm holds its transformer weights in bf16 (under graphs autocast's weight cache "
        "is off, and float32 masters would be cast again at every scale).", ""]
    lines += variant_tables(results, GRAPHED, "bf16_graphs")
    lines += ["", "## Eager (no CUDA graphs)", "", "The bf16 arm keeps float32 master weights under autocast, as the "
              "official sampler does.", ""]
    lines += variant_tables(results, NAMES, "bf16")
    lines += ["", f"## Paper setting: one transformer forward (all blocks + head, no cache) on {2 * batch} sequences, ms",
              "", "| model | tokens | bf16 | W8A8 unfused | W8A8 fused | fused / bf16 |", "|---|---|---|---|---|---|"]
    for r in results:
        for n, bf in r["bf16_forward"].items():
            unfused, fused = r["w8a8_unfused_forward"][n], r["w8a8_forward"][n]
            lines.append(f"| {r['model']} | {n} | {1e3 * bf:.2f} | {1e3 * unfused:.2f} | {1e3 * fused:.2f} | "
                         f"{bf / fused:.2f}x |")
    lines += targets(results)
    lines += ["", "Conversion reports:", ""]
    lines += [f"- {r['model']}: " + r["conversion"].replace("\n", ";") for r in results]
    lines.append("")
    return "\n".join(lines)


def plot(run: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = run["results"]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.2))
    measures = [("generation", None), ("tokens only", None)]
    labels = [f"{r['model']}\n{m}" for r in results for m, _ in measures]
    shown = {"w8a8": "W8A8 fused, eager (vs bf16 eager)", "w8a8_kv8": "+ INT8 KV, eager (vs bf16 eager)",
             "w8a8_graphs": "W8A8 fused, graphs (vs bf16 graphs)",
             "w8a8_kv8_graphs": "+ INT8 KV, graphs (vs bf16 graphs)"}
    like_for_like = ("w8a8_graphs", "bf16_fused_attention_graphs")
    width = 0.8 / len(shown)
    for j, (v, label) in enumerate(shown.items()):
        base = "bf16_graphs" if v.endswith("graphs") else "bf16"
        values = [r[base]["seconds"] / r[v]["seconds"] if m == "generation" else
                  r[base]["tokens_seconds"] / r[v]["tokens_seconds"] for r in results for m, _ in measures]
        speed.bar([i + (j - (len(shown) - 1) / 2) * width for i in range(len(values))], values, width, label=label)
    values = [r[like_for_like[1]]["seconds"] / r[like_for_like[0]]["seconds"] if m == "generation" else
              r[like_for_like[1]]["tokens_seconds"] / r[like_for_like[0]]["tokens_seconds"]
              for r in results for m, _ in measures]
    speed.scatter(range(len(values)), values, marker="_", s=400, color="black", zorder=3,
                  label="W8A8 fused, graphs (vs bf16 + fused attention inputs, graphs)")
    top = max(max(bar.get_height() for bar in speed.patches), max(values))
    speed.axhline(1.0, color="black", linewidth=0.8)
    speed.set_xticks(range(len(labels)), labels, fontsize=8)
    speed.set_ylabel("speedup over bf16")
    speed.set_title("VAR generation speed, batch 100 with CFG")
    speed.set_ylim(0, 1.7 * top)
    speed.legend(fontsize=7, ncol=1, loc="upper left")
    speed.grid(axis="y", alpha=0.3)
    peaks = {"bf16": "bf16 (float32 masters)", "bf16_graphs": "bf16 weights, graphs", "w8a8_graphs": "W8A8, graphs",
             "w8a8_kv8_graphs": "W8A8 + INT8 KV, graphs"}
    for j, (v, label) in enumerate(peaks.items()):
        memory.bar([i + (j - 1.5) * 0.2 for i in range(len(results))], [r[v]["peak_gb"] for r in results], 0.2,
                   label=label)
    memory.set_xticks(range(len(results)), [r["model"] for r in results])
    memory.set_ylabel("peak GPU memory (GB)")
    memory.set_title("Peak memory during generation")
    memory.set_ylim(0, 1.3 * max(r["bf16"]["peak_gb"] for r in results))
    memory.legend(fontsize=7, ncol=2, loc="upper left")
    memory.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{run['environment']['gpu']}: bf16 vs real W8A8", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["var_d16", "var_d30"])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("generate.md"))
    parser.add_argument("--render", type=Path, nargs="+",
                        help="write the report and chart again from these JSON files (their results in order), no "
                             "timing")
    args = parser.parse_args()
    if args.render:
        runs = [json.loads(path.read_text()) for path in args.render]
        run = dict(runs[0], results=[r for one in runs for r in one["results"]])
        args.out.with_suffix(".json").write_text(json.dumps(run, indent=1))
    else:
        run = {"environment": environment(), "batch": args.batch, "results": []}
        for preset in args.presets:
            run["results"].append(run_preset(preset, args.batch, args.lengths))
            print(json.dumps(run["results"][-1]), flush=True)
            args.out.with_suffix(".json").write_text(json.dumps(run, indent=1))
            args.out.write_text(report(run))
    args.out.write_text(report(run))
    plot(run, args.out.with_suffix(".png"))
    print(report(run))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
