#!/usr/bin/env bash
# Quantize (default ptq4arvg) at the given bits, then sample 50 images per class with the quantized model.
#   DEPTH=16 bash VAR/scripts/quantize_sample.sh w6a6 [method]
source "$(dirname "$0")/common.sh"
BITS=${1:-w8a8}
METHOD=${2:-ptq4arvg}
STATE="${OUT}/${METHOD}_${BITS}.safetensors"
[ -f "${OUT}/calibration.safetensors" ] || bash "$(dirname "$0")/calibrate.sh"
python -m VAR.quantize ${MODEL_ARGS} --calibration "${OUT}/calibration.safetensors" --method "${METHOD}" \
    --bits "${BITS}" ${EXTRA} --out "${STATE}"
${LAUNCH} VAR.sample ${MODEL_ARGS} --quant-state "${STATE}" --per-class "${PER_CLASS}" --batch-size "${BATCH}" \
    --out "${OUT}/${METHOD}_${BITS}"
