#!/bin/bash
# Per-stage conversion time of a checkout: runs `quick` on the default model with a fixed calibration text and
# stops when block 6 begins, so two commits can be compared on one host (bench/results/quick-block-times-*.json).
# usage: bench/probes/block_times.sh TREE CALIB_TEXT LOG
# TREE: a checkout (e.g. `git worktree add /tmp/old d3992a9`); run on an idle machine, one tree after the other.
set -euo pipefail
TREE=$1; CALIB=$2; LOG=$3
OUT=$(mktemp -d)/probe.nq
uptime > "$LOG"
(cd "$TREE" && PYTHONPATH="$TREE" exec python -c "from converter.cli import main; main()" smollm2-135m "$OUT" \
    --preset quick --calib "$CALIB" >> "$LOG" 2>&1) &
until grep -q "block 6/30" "$LOG" 2>/dev/null || ! kill -0 $! 2>/dev/null; do sleep 2; done
pkill -9 -f "$OUT" || true
uptime >> "$LOG"
