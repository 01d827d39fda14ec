#!/usr/bin/env bash
# The prepared GPU check: on one H100/H200 with a stock CUDA PyTorch image (torch, transformers, peft, accelerate,
# triton) and no package registry, in at most 8 minutes:
#   the wheels of `make gpu-bundle` -> pytest -m gpu -> ezo train -> ezo merge -> ezo generate on a random-weight
#   Llama-3.1-8B-shaped model -> bench/train_bench.py (8B 4x2048 with the sweep, 70B 1x4096, each against HF+peft
#   QLoRA) -> bench/generate_bench.py -> one JSON summary on stdout (and in $OUT/gpu_check.json when OUT is set).
#
#   make gpu-bundle                  # here: .whl-bundle/ (wheels + bench assets), then carry it to the GPU machine
#   bash bench/gpu_check.sh          # there, from the checkout root
#   bash bench/gpu_check.sh --tiny   # CPU, this checkout's Python env, tiny shapes: checks the script, measures nothing
#
# Each step has a time cap and the whole check a budget (CHECK_BUDGET_S, default 470 s): a step that would run past
# it is cut and reported as a timeout (rc 124), and the later steps still report. Logs: $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1
PY=${PYTHON:-python3}
BUNDLE=${BUNDLE:-.whl-bundle}
BUDGET=${CHECK_BUDGET_S:-470}
WORK=$(mktemp -d /tmp/ezo-check.XXXXXX)
RES=${OUT:-$WORK/out}
mkdir -p "$RES"
LOG=$RES/gpu_check.log
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 HF_HOME=$WORK/hf TOKENIZERS_PARALLELISM=false
STEPS=""

step() {  # step NAME CAP_S CMD...: run with the smaller of its cap and the budget left; log; record rc and seconds
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - SECONDS)) t0=$SECONDS rc
  ((cap > left)) && cap=$left
  if ((cap < 5)); then
    rc=124; echo "=== $name: skipped, the budget is spent" | tee -a "$LOG"
  else
    echo "=== $name (cap ${cap} s): $*" | tee -a "$LOG"
    timeout -k 10 "$cap" "$@" >>"$LOG" 2>&1; rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
    ((rc != 0)) && tail -n 25 "$LOG"
  fi
  STEPS+="${STEPS:+, }\"$name\": {\"rc\": $rc, \"seconds\": $((SECONDS - t0))}"
  return $rc
}

if ((TINY)); then
  export PYTHONPATH=$PWD/src
  ASSETS=$WORK/assets
  "$PY" bench/gpu_assets.py pack "$ASSETS" >>"$LOG" 2>&1 || { echo "no assets (needs llama-models and ../shared)"; exit 1; }
  LAYERS="--tiny --layers 2"; TRAIN_FLAGS="--tiny --no-sweep --steps 1"; GEN_FLAGS="--tiny"; ROWS=1; LEN=128
else
  ASSETS=$BUNDLE/assets
  # --target keeps the image's packages; ours come first on the path. No registry: --no-index, and no deps resolved.
  step install 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$BUNDLE"/*.whl || exit 1
  export PYTHONPATH=$WORK/site
  LAYERS="--layers 2"; TRAIN_FLAGS="--steps 2"; GEN_FLAGS="--sweep="; ROWS=2; LEN=1024
fi

# Versions and the card, for the summary.
ENV_JSON=$("$PY" - <<'EOF'
import json, torch
from importlib.metadata import version, PackageNotFoundError
def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None
print(json.dumps({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  "cuda": torch.version.cuda, **{n: v(n) for n in ("torch", "transformers", "peft", "trl", "accelerate",
                  "bitsandbytes", "liger-kernel", "triton", "datasets", "ezoforge")}}))
EOF
)
echo "env: $ENV_JSON" | tee -a "$LOG"

step gpu_tests 100 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py

# ezo train -> merge -> generate on a random model with Llama-3.1-8B's widths (hidden 4,096, MLP 14,336, vocabulary
# 128,256, GQA 32/8) and 2 of its 32 layers, so saving, quantizing, merging and reloading fit the budget.
MODEL=$WORK/model-8b-shape
"$PY" bench/gpu_assets.py pairs "$WORK/pairs.jsonl" >>"$LOG" 2>&1
if step make_model 60 "$PY" bench/gpu_assets.py model "$ASSETS" "$MODEL" $LAYERS \
  && step ezo_train 90 "$PY" -m ezoforge train "$WORK/pairs.jsonl" -o "$WORK/train" -m "$MODEL" --max-steps 4 \
       --save-every 4 --set train.batch_size=$ROWS --set train.max_length=$LEN --set train.eval_fraction=0.1 \
  && step ezo_merge 60 "$PY" -m ezoforge merge "$WORK/train" -o "$WORK/merged" \
  && step ezo_generate 45 "$PY" -m ezoforge generate -m "$WORK/merged" -p "日本の首都はどこですか？" --max-new-tokens 16
then
  cp "$WORK/train/stats.json" "$RES/train_stats.json" 2>/dev/null
fi
rm -rf "$MODEL" "$WORK/merged"  # disk: the 70B shape is built next

step train_bench_8b 150 "$PY" bench/train_bench.py --only 8b $TRAIN_FLAGS --out "$WORK/tb8"
step train_bench_70b 170 "$PY" bench/train_bench.py --only 70b $TRAIN_FLAGS --out "$WORK/tb70"
step generate_bench 100 "$PY" bench/generate_bench.py --assets "$ASSETS" $GEN_FLAGS --json "$WORK/generate_bench.json"

SUMMARY=$("$PY" - "$WORK" "$ENV_JSON" "{$STEPS}" "$SECONDS" <<'EOF'
import json, sys
from pathlib import Path
work, env, steps, seconds = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
def load(path):
    return json.loads(path.read_text()) if path.exists() else None
train = [r for d in ("tb8", "tb70") for r in (load(work / d / "train_bench.json") or [])]
print(json.dumps({"env": env, "seconds": seconds, "steps": steps, "ok": all(s["rc"] == 0 for s in steps.values()),
                  "ezo_train": load(work / "train" / "stats.json"),
                  "train_bench": [r for r in train if r.get("bench") != "env"],
                  "generate_bench": load(work / "generate_bench.json")}, ensure_ascii=False))
EOF
)
echo "$SUMMARY"
[[ -n "${OUT:-}" ]] && echo "$SUMMARY" >"$OUT/gpu_check.json"
rm -rf "$WORK/site" "$WORK/train" "$WORK/hf"
