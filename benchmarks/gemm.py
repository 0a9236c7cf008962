"""INT8 GEMM benchmark on the linear-layer shapes of autoregressive visual generators (one run, one process).

Per shape (C in {768, 1024, 1280, 1536, 1920}; (K, N) in {C x 3C (qkv), C x 4C (fc1), 4C x C (fc2)};
M in {200, 3200, 12800, 51200}) it times, interleaved over rounds, against bf16 F.linear in the same run:
  bf16          F.linear(x, w, b) in bf16 (cuBLAS), measured twice (bf16, bf16_again) to show the noise
  ours_layer    kernels.quantized_linear: quantize kernel + fused CUTLASS INT8 GEMM (the full W8A8 layer)
  ours_gemm     the fused CUTLASS INT8 GEMM alone (int8 inputs, dequantized bf16 output)
  ours_quant    the quantize kernel alone
  copy          x.clone(): the copy bandwidth that the quantize kernel (3 bytes moved per element) is held against
  int_mm        torch._int_mm + the fused dequantize kernel (int8 inputs; the fallback GEMM path)
  int_mm_layer  quantize + torch._int_mm + dequantize (the full layer on the fallback path)
  fp8_rowwise   torch._scaled_mm, FP8 e4m3 with row/column scales and bias (cuBLASLt: the 8-bit ceiling reference)
  torchao       torchao Int8DynamicActivationInt8WeightConfig on an nn.Linear, eager (if torchao imports)
  bf16_model    the layer with its producer, as the bf16 model runs it: for qkv / fc1 the LayerNorm and adaLN
                modulation of the float32 residual stream (then the autocast cast to bf16) before F.linear; for
                fc2 the GELU of fc1's bf16 output
  ours_model    the same with the producer fused into the quantize kernel (kernels.fused_quantize), then the GEMM
and, with --sweep-configs, ours_gemm and ours_layer with every sm_90a tile configuration.
Timing: each variant is captured as a CUDA graph of n launches (n so that a replay takes >= 1 ms; inputs rotate
over enough copies to exceed twice the L2 cache), timed with CUDA events, median of the rounds.

    python benchmarks/gemm.py --out results/gemm    # writes gemm.json, gemm.md, gemm.png there
"""
import argparse
import gc
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
from kernels import _extension  # noqa: E402
from kernels.ops import sm90_tile_config  # noqa: E402

WIDTHS = (768, 1024, 1280, 1536, 1920)
ROWS = (200, 3200, 12800, 51200)
LAYERS = {"qkv": (1, 3), "fc1": (1, 4), "fc2": (4, 1)}  # (K, N) as multiples of C
COMPARED = ("ours_layer", "ours_gemm", "int_mm", "int_mm_layer", "fp8_rowwise", "torchao")
L2_BYTES = 60 * 2**20


def gpu_info() -> dict:
    info = {"gpu": torch.cuda.get_device_name(), "sms": torch.cuda.get_device_properties(0).multi_processor_count,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "extension": kernels.extension_status(), "backend": kernels.active_backend()}
    try:
        query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu"
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        info["nvidia_smi"] = f"unavailable: {error}"
    if _extension.loaded():
        version = _extension.ops().cutlass_version()
        info["cutlass"] = f"{version // 100}.{version // 10 % 10}.{version % 10}"
    try:
        import torchao
        info["torchao"] = torchao.__version__
    except Exception as error:  # optional comparison: any import failure just drops the column
        info["torchao"] = f"not available ({type(error).__name__}: {error})"
    return info


def capture(step_fn, launches: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `launches` calls step_fn(i); outputs are dropped, so their memory is reused."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            step_fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            step_fn(i)
    return graph


def replay_ms(graph: torch.cuda.CUDAGraph) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


class Timed:
    """One variant: a graph of n launches (n chosen so a replay lasts >= min_ms), timed over interleaved rounds."""

    def __init__(self, step_fn, copies: int, min_ms: float):
        probe = capture(step_fn, copies)
        per_call = min(replay_ms(probe) for _ in range(3)) / copies
        del probe
        self.launches = copies * max(1, math.ceil(min_ms / max(per_call, 1e-4) / copies))
        self.graph = capture(step_fn, self.launches)
        replay_ms(self.graph)
        self.samples = []

    def round(self):
        self.samples.append(replay_ms(self.graph) * 1e3 / self.launches)

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples)


def asymmetric_8bit(x: torch.Tensor):
    """Static per-tensor asymmetric 8-bit parameters (as in PTQ4ARVG's activation quantizers)."""
    lo, hi = x.float().min(), x.float().max()
    step = ((hi - lo) / 255).reshape(1)
    return step, torch.round(-lo / step).to(torch.int32).reshape(1)


def fp8_rowwise(x: torch.Tensor, dim: int):
    scale = x.float().abs().amax(dim=dim, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max
    return (x.float() / scale).to(torch.float8_e4m3fn), scale.float()


def torchao_linear(weight: torch.Tensor, bias: torch.Tensor):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    quantize_(layer, Int8DynamicActivationInt8WeightConfig())
    return layer


PRODUCERS = {"qkv": "layernorm", "fc1": "layernorm", "fc2": "gelu_tanh"}
SAMPLES = 200  # sequences per batch (100 images with CFG): the adaLN modulation is per sequence


def bench_shape(M, K, N, args, configs, use_torchao, broken: set, producer: str = "layernorm") -> dict:
    ops = _extension.ops()
    g = torch.Generator(device="cuda").manual_seed(M * 7 + K * 3 + N)
    bytes_per_copy = M * K * 4 + N * K * 4
    copies = max(1, min(32, math.ceil(2 * L2_BYTES / bytes_per_copy)))
    sets = []
    for _ in range(copies):
        x = (torch.randn(M, K, device="cuda", generator=g) + 0.2).to(torch.bfloat16)
        w = (torch.randn(N, K, device="cuda", generator=g) / math.sqrt(K)).to(torch.bfloat16)
        b = torch.randn(N, device="cuda", generator=g).to(torch.bfloat16)
        step, zero = asymmetric_8bit(x)
        weight = kernels.quantize_weight_symmetric(w.float())
        xq, act_zero = kernels.quantize_rows(x, step, zero, 8)
        x8, sx = fp8_rowwise(x, 1)
        w8, sw = fp8_rowwise(w, 1)
        s = dict(x=x, w=w, b=b, b32=b.float(), step=step, zero=zero, weight=weight, xq=xq, act_zero=act_zero,
                 x8=x8, sx=sx, w8=w8, sw=sw.t().contiguous())
        if producer == "layernorm":
            samples = SAMPLES if M % SAMPLES == 0 else 1
            s["residual"] = x.float().reshape(samples, M // samples, K)
            ada = torch.randn(samples, 2, K, device="cuda", generator=g).to(torch.bfloat16)
            s["mul"], s["add"] = ada[:, :1, :] + 1, ada[:, 1:, :]
            s["modulation"] = (s["mul"].reshape(samples, K), s["add"].reshape(samples, K))
        if use_torchao:
            s["torchao"] = torchao_linear(w, b)
        sets.append(s)

    def layer_with(config):  # quantize + GEMM with one tile configuration, through the raw ops
        def step_fn(i):
            s = sets[i % copies]
            xq, act_zero = ops.quantize_rows(s["x"], s["step"], s["zero"], 8)
            wt = s["weight"]
            ops.int8_linear(xq, wt.wq, s["step"], act_zero, wt.w_scale, wt.wsum, s["b32"], torch.bfloat16, config)
        return step_fn

    def gemm_with(config):  # the GEMM alone with one tile configuration
        def step_fn(i):
            s = sets[i % copies]
            wt = s["weight"]
            ops.int8_linear(s["xq"], wt.wq, s["step"], s["act_zero"], wt.w_scale, wt.wsum, s["b32"],
                            torch.bfloat16, config)
        return step_fn

    def ours_layer(i):  # the public op, with its own choice of tile configuration
        s = sets[i % copies]
        wt = s["weight"]
        kernels.quantized_linear(s["x"], s["step"], s["zero"], 8, wt.wq, wt.w_scale, wt.wsum, s["b32"])

    def ours_gemm(i):
        s = sets[i % copies]
        wt = s["weight"]
        kernels.int8_linear(s["xq"], wt.wq, s["step"], s["act_zero"], wt.w_scale, wt.wsum, s["b32"])

    def bf16(i):
        s = sets[i % copies]
        F.linear(s["x"], s["w"], s["b"])

    def int_mm(i):
        s = sets[i % copies]
        wt = s["weight"]
        kernels.int8_linear(s["xq"], wt.wq, s["step"], s["act_zero"], wt.w_scale, wt.wsum, s["b32"],
                            torch.bfloat16, backend="int_mm")

    def int_mm_layer(i):
        s = sets[i % copies]
        wt = s["weight"]
        kernels.quantized_linear(s["x"], s["step"], s["zero"], 8, wt.wq, wt.w_scale, wt.wsum, s["b32"],
                                 backend="int_mm")

    def fp8(i):
        s = sets[i % copies]
        torch._scaled_mm(s["x8"], s["w8"].t(), scale_a=s["sx"], scale_b=s["sw"], bias=s["b"],
                         out_dtype=torch.bfloat16, use_fast_accum=True)

    def quant(i):
        s = sets[i % copies]
        ops.quantize_rows(s["x"], s["step"], s["zero"], 8)

    def copy(i):
        sets[i % copies]["x"].clone()

    def bf16_model(i):
        s = sets[i % copies]
        if producer == "layernorm":
            h = F.layer_norm(s["residual"], (K,), eps=1e-6).mul(s["mul"]).add_(s["add"]).to(torch.bfloat16)
        else:
            h = F.gelu(s["x"], approximate="tanh")
        F.linear(h, s["w"], s["b"])

    def ours_model(i):
        s = sets[i % copies]
        wt = s["weight"]
        if producer == "layernorm":
            xq, act_scale, act_zero = kernels.fused_quantize(s["residual"], s["step"], s["zero"], 8,
                                                             prologue="layernorm", modulation=s["modulation"])
        else:
            xq, act_scale, act_zero = kernels.fused_quantize(s["x"], s["step"], s["zero"], 8, prologue="gelu_tanh")
        kernels.int8_linear(xq, wt.wq, act_scale, act_zero, wt.w_scale, wt.wsum, s["b32"])

    def torchao(i):
        s = sets[i % copies]
        s["torchao"](s["x"])

    variants = {"bf16": bf16, "ours_layer": ours_layer, "ours_gemm": ours_gemm, "ours_quant": quant, "copy": copy,
                "int_mm": int_mm, "int_mm_layer": int_mm_layer, "fp8_rowwise": fp8, "bf16_again": bf16,
                "bf16_model": bf16_model, "ours_model": ours_model}
    if use_torchao:
        variants["torchao"] = torchao
    if args.sweep_configs:
        for c in range(len(configs)):
            variants[f"gemm@{c}"] = gemm_with(c)
            variants[f"layer@{c}"] = layer_with(c)

    timed, failed = {}, {}
    for name, fn in variants.items():
        if name in broken:
            failed[name] = "skipped: failed on an earlier shape"
            continue
        try:
            timed[name] = Timed(fn, copies, args.min_ms)
        except Exception as error:  # a variant that cannot run (or be captured) is reported, not fatal
            failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            broken.add(name)  # a failed capture can strand its memory pool: do not retry it on larger shapes
            torch.cuda.synchronize()
    for _ in range(args.rounds):
        for t in timed.values():
            t.round()

    s = sets[0]
    wt = s["weight"]
    ours = kernels.quantized_linear(s["x"], s["step"], s["zero"], 8, wt.wq, wt.w_scale, wt.wsum, s["b32"])
    exact = kernels.quantized_linear(s["x"], s["step"], s["zero"], 8, wt.wq, wt.w_scale, wt.wsum, s["b32"],
                                     out_dtype=torch.float32, backend="int_mm")
    bf16_ref = F.linear(s["x"].float(), s["w"].float(), s["b"].float())
    err = ((ours.float() - exact).abs() / exact.abs().max()).max().item()
    quant_err = (torch.linalg.norm(exact - bf16_ref) / torch.linalg.norm(bf16_ref)).item()
    row = dict(M=M, K=K, N=N, copies=copies, auto_config=table_config(M, N, K),
               us={k: t.median_us for k, t in timed.items()},
               spread={k: [min(t.samples), max(t.samples)] for k, t in timed.items()},
               launches={k: t.launches for k, t in timed.items()}, failed=failed,
               max_err_vs_exact=err, w8a8_rel_err_vs_fp32=quant_err)
    del sets, timed
    gc.collect()
    torch.cuda.empty_cache()
    return row


def table_config(M, N, K) -> str:
    return sm90_tile_config(M)


def apply_current_table(results: dict) -> int:
    """Where the tile table now picks another configuration than the one timed as ours_*, take ours_* from the
    configuration sweep of the same run (marked in the report). Returns how many shapes changed."""
    changed = 0
    for r in results["rows"]:
        now = table_config(r["M"], r["N"], r["K"])
        if now != r["auto_config"] and f"layer@{results['configs'].index(now)}" in r["us"]:
            index = results["configs"].index(now)
            r["us"]["ours_layer"], r["us"]["ours_gemm"] = r["us"][f"layer@{index}"], r["us"][f"gemm@{index}"]
            r["timed_config"], r["auto_config"] = r["auto_config"], now
            changed += 1
    return changed


def geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def speedups(row, variant):
    us = row["us"]
    return us["bf16"] / us[variant] if variant in us and "bf16" in us else None


def model_speedup(row):
    """The layer with its producer: bf16 model ops over ours (fused producer + GEMM)."""
    us = row["us"]
    return us["bf16_model"] / us["ours_model"] if "bf16_model" in us and "ours_model" in us else None


def write_report(results: dict, out: Path) -> str:
    info, rows = results["info"], results["rows"]
    lines = ["# INT8 GEMM benchmark (ARVG linear shapes)", "",
             f"GPU: {info['gpu']} ({info['sms']} SMs); nvidia-smi: {info['nvidia_smi']}  ",
             f"torch {info['torch']}, CUDA {info['cuda']}, Python {info['python']}, CUTLASS {info.get('cutlass', '-')}, "
             f"torchao {info['torchao']}  ",
             f"extension: {info['extension']}; backend: {info['backend']}  ",
             f"date: {results['date']}; rounds: {results['args']['rounds']}; wall time {results['seconds']:.0f} s", "",
             "Every figure is a median over interleaved rounds of CUDA-graph replays (>= 1 ms each, inputs rotated "
             "over copies larger than twice the L2), timed with CUDA events; speedups are bf16 time / variant time "
             "from the same run. W8A8: static per-tensor asymmetric 8-bit activations (PTQ4ARVG style), symmetric "
             "per-channel int8 weights, bf16 output with bias. ours_layer is the quantize kernel followed by the "
             "fused GEMM (two launches; the GEMM uses programmatic dependent launch to overlap its prologue), starting "
             "from a bf16 x that something else produced; the section after this one fuses the quantization into "
             "that producer, as the deployed model does. ours_gemm, int_mm and fp8_rowwise start from "
             "already-quantized operands.", "",
             "## Geometric-mean speedup over bf16 F.linear", "",
             "| M | " + " | ".join(COMPARED) + " | bf16 vs itself |", "|---" * (len(COMPARED) + 2) + "|"]
    groups = [(str(m), [r for r in rows if r["M"] == m]) for m in sorted({r["M"] for r in rows})]
    groups.append(("all M >= 3200", [r for r in rows if r["M"] >= 3200]))
    for label, group in groups:
        cells = [f"{geomean([speedups(r, v) for r in group]):.2f}x" if any(v in r['us'] for r in group) else "-"
                 for v in COMPARED]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {geomean([speedups(r, 'bf16_again') for r in group]):.2f}x |")
    big = [r for r in rows if r["M"] >= 3200]
    quant_tbps = statistics.median(r["M"] * r["K"] * 3 / r["us"]["ours_quant"] / 1e6 for r in big)
    copies_timed = [r for r in big if "copy" in r["us"]]
    copy_note = (f" (a copy of x, `x.clone()`, moves 4 bytes per element at "
                 f"{statistics.median(r['M'] * r['K'] * 4 / r['us']['copy'] / 1e6 for r in copies_timed):.2f} TB/s)"
                 if copies_timed else "")
    quant_share = statistics.median(r["us"]["ours_quant"] / r["us"]["ours_layer"] for r in big)
    layer_big = geomean([speedups(r, "ours_layer") for r in big])
    layer_small = geomean([speedups(r, "ours_layer") for r in rows if r["M"] == 200])
    lines += ["", f"Quantize + GEMM against the bare F.linear: **{layer_big:.2f}x** at M >= 3200 (1.6x target: "
              f"{'met' if layer_big >= 1.6 else 'not met'}) and **{layer_small:.2f}x** at M = 200 (1.0x target: "
              f"{'met' if layer_small >= 1.0 else 'not met'}); with the producer fused, see the next section.", "",
              f"Where the time goes (M >= 3200, medians): the quantize kernel moves 3 bytes per input element at "
              f"{quant_tbps:.2f} TB/s{copy_note} and takes {quant_share:.0%} of the full layer's time; the GEMM "
              f"alone runs at {geomean([speedups(r, 'ours_gemm') for r in big]):.2f}x bf16 (cuBLASLt FP8 row-wise: "
              f"{geomean([speedups(r, 'fp8_rowwise') for r in big]):.2f}x).", "",
              "## The layer with its producer, as the model runs it", "",
              "bf16_model: the bf16 model's own operations, LayerNorm + adaLN modulation of the float32 residual "
              "stream and the cast to bf16 before F.linear (qkv, fc1), or the GELU of fc1's bf16 output before "
              "F.linear (fc2). ours_model: the producer fused into the quantize kernel (`kernels.fused_quantize`, "
              "what `VAR.deploy.to_int8` runs), then the fused GEMM. Both include the producer's own work, so the "
              "ratio is the layer-level gain a model sees. Part of the qkv / fc1 gain is fusion itself: the bf16 "
              "model runs its LayerNorm and modulation as separate PyTorch kernels over float32 (a fused bf16 kernel "
              "would narrow those two columns toward the GEMM-alone ratio); fc2's GELU is one bf16 pass either way.",
              "",
              "| M | qkv | fc1 | fc2 | all |", "|---|---|---|---|---|"]
    for label, group in groups:
        cells = [f"{geomean([model_speedup(r) for r in group if r['layer'] == layer]):.2f}x" for layer in LAYERS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {geomean([model_speedup(r) for r in group]):.2f}x |")
    model_big = geomean([model_speedup(r) for r in big])
    model_small = geomean([model_speedup(r) for r in rows if r["M"] == 200])
    lines += ["", f"With the producer fused: **{model_big:.2f}x** at M >= 3200 (target 1.6x: "
              f"{'met' if model_big >= 1.6 else 'not met'}) and **{model_small:.2f}x** at M = 200 (target 1.0x: "
              f"{'met' if model_small >= 1.0 else 'not met'}).", "",
              "## Per shape", "",
              "µs, and speedup over bf16 in brackets. TOPS counts 2·M·N·K.", "",
              "| M | C | layer | K x N | bf16 µs (TFLOP/s) | ours layer | ours GEMM (TOPS) | quant µs | int_mm+dq | "
              "int_mm layer | fp8 row-wise | torchao | config | max err |",
              "|---" * 14 + "|"]
    for r in rows:
        us, ops = r["us"], 2 * r["M"] * r["N"] * r["K"]

        def cell(v):
            return f"{us[v]:.1f} ({speedups(r, v):.2f}x)" if v in us else "-"
        lines.append(
            f"| {r['M']} | {r['C']} | {r['layer']} | {r['K']}x{r['N']} | {us['bf16']:.1f} ({ops / us['bf16'] / 1e6:.0f}) | "
            f"{cell('ours_layer')} | {cell('ours_gemm')} ({ops / us['ours_gemm'] / 1e6:.0f}) | "
            f"{us.get('ours_quant', float('nan')):.1f} | {cell('int_mm')} | {cell('int_mm_layer')} | "
            f"{cell('fp8_rowwise')} | {cell('torchao')} | {r['auto_config']}{'*' if 'timed_config' in r else ''} | "
            f"{r['max_err_vs_exact']:.1e} |")
    sweep = [r for r in rows if any(k.startswith("gemm@") for k in r["us"])]
    if sweep:
        names = results["configs"]
        lines += ["", "## Tile configurations (full layer, speedup over bf16)", "",
                  "| M | K x N | " + " | ".join(names) + " | auto |", "|---" * (len(names) + 3) + "|"]
        for r in sweep:
            cells = [f"{speedups(r, f'layer@{c}'):.2f}" if f"layer@{c}" in r["us"] else "-" for c in range(len(names))]
            lines.append(f"| {r['M']} | {r['K']}x{r['N']} | " + " | ".join(cells) + f" | {r['auto_config']} |")
    failures = {}
    for r in rows:
        for variant, message in r["failed"].items():
            failures.setdefault((variant, message), []).append(f"M={r['M']} {r['K']}x{r['N']}")
    if failures:
        lines += ["", "## Variants that did not run", ""]
        lines += [f"- {variant} on {len(where)} shape(s) ({where[0]}{' ...' if len(where) > 1 else ''}): {message}"
                  for (variant, message), where in failures.items()]
    expected = {(m, c, layer) for m in ROWS for c in WIDTHS for layer in LAYERS}
    missing = sorted(expected - {(r["M"], r["C"], r["layer"]) for r in rows})
    if missing:
        lines += ["", f"Not measured ({len(missing)} of {len(expected)} shapes): "
                  + ", ".join(f"M={m} C={c} {layer}" for m, c, layer in missing) + "."]
    lines += ["", "Max err: max |ours - exact| / max |exact| with the exact result from integer accumulation and a "
              "float32 epilogue (bf16 rounding is 2^-8 = 3.9e-3 relative)."]
    if any("timed_config" in r for r in rows):
        lines += ["", "\\* the tile table was revised after this run from its configuration sweep: for these shapes "
                  "the ours columns are the sweep's timings of the configuration the table now picks (same run, "
                  "same method; the error column was measured with the earlier choice)."]
    text = "\n".join(lines) + "\n"
    (out / "gemm.md").write_text(text)
    return text


def plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results["rows"]
    ms = sorted({r["M"] for r in rows})
    shown = [v for v in ("ours_layer", "ours_gemm", "fp8_rowwise", "int_mm_layer", "torchao")
             if any(v in r["us"] for r in rows)]
    fig, axes = plt.subplots(len(ms), 1, figsize=(14, 3.2 * len(ms)), sharey=True)
    width = 0.8 / len(shown)
    for ax, m in zip(axes, ms):
        group = [r for r in rows if r["M"] == m]
        for j, v in enumerate(shown):
            ax.bar([i + (j - (len(shown) - 1) / 2) * width for i in range(len(group))],
                   [speedups(r, v) or 0 for r in group], width, label=v)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(group)), [f"{r['layer']}\nC={r['C']}" for r in group], fontsize=7)
        ax.set_ylabel("speedup vs bf16")
        ax.set_title(f"M = {m} tokens", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, ncol=len(shown), fontsize=9, loc="upper center", bbox_to_anchor=(0.5, 0.965))
    fig.suptitle(f"W8A8 linear layers on {results['info']['gpu']} (speedup over bf16 F.linear)")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out / "gemm.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--widths", type=int, nargs="+", default=WIDTHS)
    parser.add_argument("--rows", type=int, nargs="+", default=ROWS)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-ms", type=float, default=1.0)
    parser.add_argument("--sweep-configs", action="store_true", help="also time every sm_90a tile configuration")
    parser.add_argument("--no-torchao", action="store_true")
    parser.add_argument("--render", type=Path, help="re-render gemm.md / gemm.png from this gemm.json, no timing")
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.render.read_text())
        print(f"{apply_current_table(results)} shapes take the current tile table's configuration from the sweep")
        args.out.mkdir(parents=True, exist_ok=True)
        print(write_report(results, args.out).split("## Per shape")[0])
        plot(results, args.out)
        return
    if not (torch.cuda.is_available() and _extension.runs_sm90_gemm(torch.device("cuda"))):
        sys.exit(f"needs an sm_90 GPU and the built extension ({kernels.extension_status()})")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    info = gpu_info()
    use_torchao = not args.no_torchao and not info["torchao"].startswith("not available")
    configs = list(_extension.ops().sm90_configs())
    print(json.dumps(info, indent=1), flush=True)
    started, rows, broken = time.time(), [], set()
    shapes = [(M, C, layer, C * k, C * n) for M in args.rows for C in args.widths for layer, (k, n) in LAYERS.items()]
    for M, C, layer, K, N in shapes:
        t0 = time.time()
        row = bench_shape(M, K, N, args, configs, use_torchao, broken, PRODUCERS[layer])
        row.update(C=C, layer=layer)
        rows.append(row)
        print(f"M={M:6d} {layer} C={C:5d} K={K:5d} N={N:5d}  bf16 {row['us']['bf16']:8.1f} us  "
              f"layer x{speedups(row, 'ours_layer'):.2f}  gemm x{speedups(row, 'ours_gemm'):.2f}  "
              f"fp8 x{speedups(row, 'fp8_rowwise') or 0:.2f}  int_mm x{speedups(row, 'int_mm') or 0:.2f}  "
              f"torchao x{speedups(row, 'torchao') or 0:.2f}  with producer x{model_speedup(row) or 0:.2f}  "
              f"[{row['auto_config']}] err {row['max_err_vs_exact']:.1e}"
              f"  ({time.time() - t0:.1f} s){'  FAILED: ' + str(row['failed']) if row['failed'] else ''}", flush=True)
        results = dict(info=info, args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                       configs=configs, rows=rows, seconds=time.time() - started,
                       date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        (args.out / "gemm.json").write_text(json.dumps(results, indent=1))  # kept up to date if interrupted
    info["nvidia_smi_after"] = gpu_info()["nvidia_smi"]
    (args.out / "gemm.json").write_text(json.dumps(results, indent=1))
    text = write_report(results, args.out)
    plot(results, args.out)
    print(text.split("## Per shape")[0])


if __name__ == "__main__":
    main()
