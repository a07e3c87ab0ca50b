#!/bin/sh
# Train one SemLA LoRA adapter (the original's run_lora.sh, runnable from any directory).
#
#   sh run_lora.sh CONFIG NUM_GPUS OUTPUT_DIR [KEY VALUE ...]
#   sh catseg/run_lora.sh catseg/configs/acdc/rain/lora-rain-acdc.yaml 1 output/acdc-rain MODEL.LORA.NAME acdc-rain
#
# The adapter is written to MODEL.LORA.DB_PATH/MODEL.LORA.NAME (default catseg/loradb/<name>/); checkpoints,
# logs and metrics to OUTPUT_DIR. --resume is always passed: a run whose OUTPUT_DIR holds a last_checkpoint
# continues from it. KEY VALUE overrides come last, so they win (e.g. MODEL.WEIGHTS /abs/base.pth).
#
# Environment: PYTHON (interpreter, default: python on PATH), OVERWRITE=1 (replace an existing adapter folder),
# TRAIN_NET_ARGS (more train_net.py flags, e.g. "--device cpu --no-progress").
if [ "$#" -lt 3 ]; then
    echo "usage: sh run_lora.sh CONFIG NUM_GPUS OUTPUT_DIR [KEY VALUE ...]" >&2
    echo "  env: PYTHON=python  OVERWRITE=1 (replace an existing adapter)  TRAIN_NET_ARGS='--device cpu'" >&2
    exit 1
fi
config=$1
num_gpus=$2
output=$3
shift 3
here=$(dirname "$0")
overwrite=""
if [ "${OVERWRITE:-0}" = "1" ]; then
    overwrite="--overwrite"
fi
# $overwrite and $TRAIN_NET_ARGS are left unquoted on purpose: they hold zero or more flags.
# shellcheck disable=SC2086
exec "${PYTHON:-python}" "$here/train_net.py" --config-file "$config" --num-gpus "$num_gpus" --dist-url auto \
    --resume $overwrite ${TRAIN_NET_ARGS:-} \
    OUTPUT_DIR "$output" \
    TEST.SLIDING_WINDOW True \
    MODEL.SEM_SEG_HEAD.POOLING_SIZES "[1,1]" \
    MODEL.WEIGHTS models/model_final.pth \
    MODEL.LORA.ENABLED True \
    "$@"
