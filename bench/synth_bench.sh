#!/usr/bin/env bash
# Synth's output tokens/s on the demo's curated data, one after the other in one run: the baseline is this project
# as it was before its llama.cpp backend (BASELINE, default 9934ebd: transformers in float32, its only CPU
# backend), ours is this checkout with the demo recipe as it ships (backend auto: llama.cpp on a CPU).
# Each gets a fresh model cache, so both convert the bundled GGUF as a new user's first run does; tokens/s counts
# generation only, wall counts everything. Then bench/synth_ceiling.py measures the bound this CPU sets on that work
# (llama.cpp's own rates, and a float32 GEMM's); the ratios to the baseline are printed last.
#   bash bench/synth_bench.sh [CURATED]     # CURATED: a curate output folder (default: the demo's, curated here first)
set -euo pipefail
cd "$(dirname "$0")/.."
BASELINE=${BASELINE:-9934ebd}
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'git worktree remove --force "$WORK/baseline" 2>/dev/null || true; rm -rf "$WORK"' EXIT
git worktree add -q --detach "$WORK/baseline" "$BASELINE"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -n "${1:-}" ]; then
    CURATED=$(realpath "$1")
else
    CURATED=$WORK/curated
    "$PY" -m ezoforge curate -c recipes/demo.yaml --out "$CURATED" >"$WORK/curate.log" 2>&1 || { cat "$WORK/curate.log"; exit 1; }
fi

synth() {  # NAME SRC: ezo synth of CURATED into $WORK/out-NAME with SRC's package and demo recipe; prints a line
    local start end
    start=$(date +%s.%N)
    EZO_CACHE_DIR="$WORK/cache-$1" PYTHONPATH="$2/src" "$PY" -m ezoforge synth "$CURATED" -c "$2/recipes/demo.yaml" \
        --out "$WORK/out-$1" >"$WORK/$1.log" 2>&1 || { cat "$WORK/$1.log" >&2; exit 1; }
    end=$(date +%s.%N)
    "$PY" - "$1" "$WORK/out-$1/stats.json" "$start" "$end" <<'EOF'
import json, sys
name, stats, start, end = sys.argv[1], json.load(open(sys.argv[2])), float(sys.argv[3]), float(sys.argv[4])
print(f"{name:9s} {stats['tokens_per_s']:6.1f} tokens/s  wall {end - start:6.1f} s  {stats['tokens_out']} tokens out, "
      f"{stats['pairs']} pairs")
EOF
}

echo "synth of $CURATED; baseline $(git rev-parse --short "$BASELINE"), ours $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes')"
synth baseline "$WORK/baseline"
synth ours "$PWD"
"$PY" -c 'import json, sys; ours, base = (json.load(open(p))["tokens_per_s"] for p in sys.argv[1:])
print(f"ratio ours / baseline: {ours / base:.2f}x")' "$WORK/out-ours/stats.json" "$WORK/out-baseline/stats.json"
EZO_CACHE_DIR="$WORK/cache-ours" "$PY" bench/synth_ceiling.py "$CURATED" "$WORK/out-ours/stats.json" \
    "$WORK/out-baseline/stats.json" 2>"$WORK/ceiling.log" || { cat "$WORK/ceiling.log" >&2; exit 1; }
