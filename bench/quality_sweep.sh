#!/usr/bin/env bash
# The quality measurement queue of issue 8 (clarifications §6): one bench/quality.py run after another, each
# writing its own JSON; runs whose JSON exists are skipped, so re-running this script resumes the sweep.
# Run it alone on the machine (2 torch jobs at once slow each ~5x):
#   nohup nice bash bench/quality_sweep.sh > /tmp/quality_sweep.log 2>&1 &
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD"
run() { python bench/quality.py "$@" || echo "run failed: $*"; }
run --preset quick                                                    # the bar: 1.0 bpw target
run --preset quick --no-error-mitigation --no-refine --no-model-recon # ablation: ADMM only
run --preset quick --no-refine --no-model-recon                       # + error mitigation
run --preset quick --no-model-recon                                   # + refinement (then + model recon = the bar run)
run --preset quick --bits 0.8
run --preset quick --bits 0.55
run --preset standard
