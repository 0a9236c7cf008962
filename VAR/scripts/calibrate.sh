#!/usr/bin/env bash
# Calibration set: 128 labels generated with CFG (256 sequences), then DGC keeps 128.
#   DEPTH=16 bash VAR/scripts/calibrate.sh            DGC=official EXTRA=--official for the official run
source "$(dirname "$0")/common.sh"
python -m VAR.calibrate ${MODEL_ARGS} --dgc "${DGC}" ${EXTRA} --out "${OUT}/calibration.safetensors"
