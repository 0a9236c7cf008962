"""Command line: IS, FID, sFID, Precision, Recall of a sample batch against a reference batch.

    python evaluation/test.py VIRTUAL_imagenet256_labeled.npz samples.npz [--backend torch|tf] [--json out.json]
    python -m evaluation.test ...

The reference batch keeps its cached statistics (mu, sigma, mu_s, sigma_s) for FID/sFID and its
10,000 arr_0 images for precision/recall; the samples are uint8 RGB NHWC in arr_0, 50,000 in random
(not class-sorted) order.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.backends import BACKENDS, default_backend_name, make_backend  # noqa: E402
from evaluation.evaluator import evaluate  # noqa: E402
from evaluation.inception_file import INCEPTION_URL, inception_path, read_graph_bytes  # noqa: E402
from evaluation.metrics import IS_SPLIT_SIZE  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref_batch", help="reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz)")
    parser.add_argument("sample_batch", help="sample batch .npz (uint8 [N, H, W, 3] in arr_0)")
    parser.add_argument("--backend", choices=sorted(BACKENDS), default=None,
                        help="feature backend (default: torch on CUDA when available, else tf when "
                             "installed, else torch on the CPU)")
    parser.add_argument("--device", default=None, help="torch device for the torch backend and for "
                        "precision/recall (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per network batch (default: 64 for tf, 250 for torch)")
    parser.add_argument("--inception", default=None, help="path to classify_image_graph_def.pb")
    parser.add_argument("--cache-dir", default=None, help="where the .pb is looked for and downloaded to "
                        "(default: $PTQ4ARVG_CACHE/inception or ~/.cache/ptq4arvg/inception)")
    parser.add_argument("--no-download", action="store_true", help="fail instead of downloading the .pb")
    parser.add_argument("--inception-url", default=INCEPTION_URL, help=argparse.SUPPRESS)
    parser.add_argument("--is-split-size", type=int, default=IS_SPLIT_SIZE,
                        help="samples per Inception Score split (the protocol uses 5000)")
    parser.add_argument("--json", default=None, help="also write the metrics (and timings) to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    backend_name = args.backend or default_backend_name()
    graph_path = inception_path(args.inception, args.cache_dir, args.inception_url, not args.no_download)
    print(f"using backend {backend_name} (Inception graph {graph_path})")
    backend = make_backend(backend_name, read_graph_bytes(graph_path), args.device)
    metrics = evaluate(args.ref_batch, args.sample_batch, backend, args.batch_size, args.is_split_size,
                       progress=not args.quiet)
    print(metrics.report())
    result = metrics.as_dict()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, ImportError) as error:  # bad input or setup: no traceback
        sys.exit(f"error: {error}")
