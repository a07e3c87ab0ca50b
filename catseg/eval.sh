#!/bin/sh
# Evaluate CAT-Seg without LoRA on Cityscapes-19 class names (the original's eval.sh, LoRA disabled explicitly).
#
#   sh eval.sh CONFIG NUM_GPUS OUTPUT_DIR [KEY VALUE ...]
#
# Results go to OUTPUT_DIR/eval; the "copypaste:" lines of its log.txt are printed at the end, as in the
# original. For other label sets override MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON (and NUM_CLASSES).
# Environment: PYTHON (interpreter), TRAIN_NET_ARGS (more train_net.py flags).
if [ "$#" -lt 3 ]; then
    echo "usage: sh eval.sh CONFIG NUM_GPUS OUTPUT_DIR [KEY VALUE ...]" >&2
    echo "  env: PYTHON=python  TRAIN_NET_ARGS='--device cpu'" >&2
    exit 1
fi
config=$1
num_gpus=$2
output=$3
shift 3
here=$(dirname "$0")
# shellcheck disable=SC2086
"${PYTHON:-python}" "$here/train_net.py" --config-file "$config" --num-gpus "$num_gpus" --dist-url auto \
    --eval-only ${TRAIN_NET_ARGS:-} \
    OUTPUT_DIR "$output/eval" \
    MODEL.SEM_SEG_HEAD.NUM_CLASSES 19 \
    MODEL.SEM_SEG_HEAD.TEST_CLASS_JSON datasets/cs19.json \
    TEST.SLIDING_WINDOW True \
    MODEL.SEM_SEG_HEAD.POOLING_SIZES "[1,1]" \
    MODEL.WEIGHTS models/model_final.pth \
    MODEL.LORA.ENABLED False \
    "$@"
status=$?
if [ "$status" -eq 0 ]; then
    grep copypaste "$output/eval/log.txt" || true
fi
exit "$status"
