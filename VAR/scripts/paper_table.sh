#!/usr/bin/env bash
# Every VAR row of the paper's table: FP, and W8A8 / W6A6 for PTQ4ARVG and the available baselines, for each
# depth; then the metrics of each .npz against the ImageNet reference batch.
#   REF=VIRTUAL_imagenet256_labeled.npz NGPU=8 bash VAR/scripts/paper_table.sh
set -euo pipefail
REF=${REF:?set REF to VIRTUAL_imagenet256_labeled.npz}
DEPTHS=${DEPTHS:-"16 20 24 30"}
METHODS=${METHODS:-"ptq4arvg smoothquant"}
for depth in ${DEPTHS}; do
    export DEPTH=${depth} OUT=outputs/var_d${depth}
    bash "$(dirname "$0")/sample_fp.sh"
    bash "$(dirname "$0")/calibrate.sh"
    for bits in w8a8 w6a6; do
        for method in ${METHODS}; do
            bash "$(dirname "$0")/quantize_sample.sh" "${bits}" "${method}"
        done
    done
    for npz in "${OUT}"/*/samples.npz; do
        python evaluation/test.py "${REF}" "${npz}" --json "${npz%.npz}_metrics.json"
    done
done
