#!/bin/sh
# SAN parity in one command: the original SAN code and this project's SAN on identical random weights.
#
#   sh tools/san_parity/run.sh [SAN_ROOT] [OUT_DIR]
#
# SAN_ROOT: a checkout of MendelXu/SAN @ e19262d (its san/ and configs/ folders; default: $SAN_ROOT). Without
# it the check is skipped (exit 0) with a message. OUT_DIR (default: /tmp/san_parity_out) receives, per preset
# (b16, l14), the original's weights, inputs and outputs (about 0.7 and 1.8 GB) and report.json.
# The original runs in .venv-san-original (created on first use with uv: open_clip 2.16.0, timm 0.6.13, as
# requirements-original.txt pins), this project's SAN in .venv. PRESETS="b16" runs one preset only.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
root=${1:-${SAN_ROOT:-}}
out=${2:-/tmp/san_parity_out}
if [ -z "$root" ] || [ ! -f "$root/san/model/san.py" ]; then
    echo "SAN parity skipped: no original SAN tree (give its path as the first argument or \$SAN_ROOT;" \
        "e.g. git clone https://github.com/MendelXu/SAN && git -C SAN checkout e19262d)"
    exit 0
fi
venv="$repo/.venv-san-original"
if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv (the original's environment)"
    uv venv --python 3.11 "$venv"
    uv pip install --python "$venv/bin/python" -r "$here/requirements-original.txt"
fi
status=0
for preset in ${PRESETS:-b16 l14}; do
    echo "== $preset: the original code"
    "$venv/bin/python" "$here/original_side.py" --san-root "$root" --preset "$preset" --out "$out/$preset" --seed 0
    echo "== $preset: this project's SAN"
    "$repo/.venv/bin/python" "$here/compare.py" "$out/$preset" --json "$out/$preset/report.json" || status=1
done
exit $status
