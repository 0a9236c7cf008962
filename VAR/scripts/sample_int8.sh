#!/usr/bin/env bash
# The deployment path: W8A8 ptq4arvg with symmetric weights, sampled on the INT8 kernels (fused producers, INT8 KV
# cache, fused VQVAE GroupNorm + SiLU, one CUDA graph per scale, bf16). Needs the built extension
# (kernels/README.md); 50 images per class.
#   DEPTH=30 bash VAR/scripts/sample_int8.sh
source "$(dirname "$0")/common.sh"
STATE="${OUT}/ptq4arvg_w8a8_symmetric.safetensors"
[ -f "${OUT}/calibration.safetensors" ] || bash "$(dirname "$0")/calibrate.sh"
[ -f "${STATE}" ] || python -m VAR.quantize ${MODEL_ARGS} --calibration "${OUT}/calibration.safetensors" \
    --bits w8a8 --w-symmetric ${EXTRA} --out "${STATE}"
${LAUNCH} VAR.sample ${MODEL_ARGS} --quant-state "${STATE}" --int8 --int8-kv-cache --fused-decoder --cuda-graphs \
    --dtype bf16 --per-class "${PER_CLASS}" --batch-size "${BATCH}" --out "${OUT}/ptq4arvg_w8a8_int8"
