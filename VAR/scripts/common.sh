# Shared settings of the VAR scripts; override any of them from the environment.
set -euo pipefail
DEPTH=${DEPTH:-16}
OUT=${OUT:-outputs/var_d${DEPTH}}
NGPU=${NGPU:-1}
CKPT_DIR=${CKPT_DIR:-}                  # folder with var_d*.pth + vae_ch160v4096z32.pth; empty = Hugging Face
PER_CLASS=${PER_CLASS:-50}              # 50 x 1000 classes = the 50,000 images of the paper's tables
BATCH=${BATCH:-100}
DGC=${DGC:-entropy}                     # entropy (default) | official | topk | none
EXTRA=${EXTRA:-}                        # e.g. EXTRA=--faithful for the official numerics
MODEL_ARGS="--depth ${DEPTH} ${CKPT_DIR:+--ckpt-dir ${CKPT_DIR}}"
if [ "${NGPU}" -gt 1 ]; then LAUNCH="torchrun --standalone --nproc_per_node=${NGPU} -m"; else LAUNCH="python -m"; fi
