#!/bin/sh
# Evaluate the base CAT-Seg model with one SemLA LoRA adapter attached (the original's eval_lora.sh).
#
#   sh eval_lora.sh CONFIG NUM_GPUS OUTPUT_DIR [KEY VALUE ...]
#   sh catseg/eval_lora.sh catseg/configs/acdc/rain/lora-rain-acdc.yaml 1 output/acdc-rain MODEL.LORA.NAME acdc-rain
#
# Loads MODEL.LORA.DB_PATH/MODEL.LORA.NAME (default catseg/loradb/<name>/) on top of MODEL.WEIGHTS and
# evaluates DATASETS.TEST; results go to OUTPUT_DIR/eval (log.txt, metrics.jsonl,
# inference/<dataset>/metrics.json) and a table is printed.
#
# Environment: PYTHON (interpreter, default: python on PATH), TRAIN_NET_ARGS (more train_net.py flags).
if [ "$#" -lt 3 ]; then
    echo "usage: sh eval_lora.sh CONFIG NUM_GPUS OUTPUT_DIR [KEY VALUE ...]" >&2
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
    --eval-only ${TRAIN_NET_ARGS:-} \
    OUTPUT_DIR "$output/eval" \
    TEST.SLIDING_WINDOW True \
    MODEL.SEM_SEG_HEAD.POOLING_SIZES "[1,1]" \
    MODEL.WEIGHTS models/model_final.pth \
    MODEL.LORA.ENABLED True \
    "$@"
