#!/usr/bin/env bash
# The GPU ladder of miniature candidates (docs/training-notes.md, "The GPU ladder, fixed now"), as one
# prepared command for a lent GPU machine (the device tool's nvidia-h200: torch, timm, transformers are
# there; captum, open_clip_torch and ftfy travel as wheels).
#
# Here, once per session, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       captum open_clip_torch ftfy wcwidth
# Then with the device tool:
#   run(command="bash benchmarks/gpu_ladder.sh", carry=[".whl", "runs/ladder/ladder.json"], timeout_s=600)
# It trains the full candidates in the pre-registered order until BUDGET seconds are spent (no candidate
# starts after that), and leaves ladder.json, ladder.md and the log under $OUT; the pilots' ladder.json
# (runs/ladder/ladder.json, from the CPU) gives the order.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-ladder-out}
WORK=${WORK:-/tmp/gpu-ladder}
BUDGET=${BUDGET:-240}
mkdir -p "$OUT" "$WORK"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/device.txt"
start=$(date +%s)
python3 -m captum_iclip.zoo.ladder --gpu runs/ladder/ladder.json --device cuda --budget "$BUDGET" \
    --work-dir "$WORK" --render-workers 14 --data-workers 4 --no-progress 2>&1 | tee "$OUT/ladder.log"
echo "wall seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/device.txt"
cp "$WORK/ladder.json" "$WORK/ladder.md" "$OUT/"
