#!/bin/sh
# Fine-tune CAT-Seg itself, without LoRA (the original's run.sh, with MODEL.LORA.ENABLED False made explicit).
#
#   sh run.sh CONFIG NUM_GPUS OUTPUT_DIR [KEY VALUE ...]
#
# Starts from MODEL.WEIGHTS (default catseg/models/model_final.pth); the result is OUTPUT_DIR/model_final.pth
# (usable as MODEL.WEIGHTS, e.g. with eval.sh). --resume is always passed: a run whose OUTPUT_DIR holds a
# last_checkpoint continues from it. KEY VALUE overrides come last, so they win.
#
# Environment: PYTHON (interpreter, default: python on PATH), TRAIN_NET_ARGS (more train_net.py flags).
if [ "$#" -lt 3 ]; then
    echo "usage: sh run.sh CONFIG NUM_GPUS OUTPUT_DIR [KEY VALUE ...]" >&2
    echo "  env: PYTHON=python  TRAIN_NET_ARGS='--device cpu'" >&2
    exit 1
fi
config=$1
num_gpus=$2
output=$3
shift 3
here=$(dirname "$0")
# shellcheck disable=SC2086
exec "${PYTHON:-python}" "$here/train_net.py" --config-file "$config" --num-gpus "$num_gpus" --dist-url auto \
    --resume ${TRAIN_NET_ARGS:-} \
    OUTPUT_DIR "$output" \
    MODEL.WEIGHTS models/model_final.pth \
    MODEL.LORA.ENABLED False \
    "$@"
