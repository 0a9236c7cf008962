#!/usr/bin/env bash
# Full-precision samples (fp16 autocast, cfg 1.5, top-k 900, top-p 0.96), 50 per class, class-interleaved .npz.
#   DEPTH=16 NGPU=8 bash VAR/scripts/sample_fp.sh
source "$(dirname "$0")/common.sh"
${LAUNCH} VAR.sample ${MODEL_ARGS} --per-class "${PER_CLASS}" --batch-size "${BATCH}" --out "${OUT}/fp"
