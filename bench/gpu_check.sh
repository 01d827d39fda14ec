#!/usr/bin/env bash
# The prepared GPU check: on one H100/H200 with a stock CUDA PyTorch image (torch, transformers, peft, accelerate,
# triton) and no package registry, in at most 8 minutes:
#   the wheels of `make gpu-bundle` -> pytest -m gpu (CUDA QLoRA training, offloaded checkpointing, stage processes
#   giving CUDA memory back) -> ezo train (QLoRA) -> ezo merge (streaming, shard by shard, its peak RSS recorded)
#   -> ezo generate with nf4 weights, on a random-weight model with Llama-3.1-8B's widths and 2 of its layers
#   -> bench/generate_bench.py at one batch size -> one JSON summary on stdout (and in $OUT/gpu_check.json).
#
#   make gpu-bundle                  # here: .whl-bundle/ (wheels, the converted tokenizer, prompts), carried there
#   bash bench/gpu_check.sh          # there, from the checkout root
#   bash bench/gpu_check.sh --tiny   # CPU, this checkout's Python env, tiny shapes: checks the script, measures nothing
#                                    # (caps and budget x CHECK_CPU_SCALE, default 4: a CPU is slower at everything)
#
# Every step has a cap; the caps add up to at most the budget (CHECK_BUDGET_S, default 470 s, leaving ~10 s of the
# 8 minutes for the version probe and the summary), and a step never runs past what is left of it: one cut short
# reports rc 124 and the later steps still run. The caps of the steps that may compile Triton kernels on a cold
# cache (the CUDA tests' Liger/bitsandbytes paths, training, the compiled static-cache decode of generate_bench)
# hold that compile. The training benchmark (bench/train_bench.py, minutes per shape) is not part of this check.
# Logs: $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1
PY=${PYTHON:-python3}
BUNDLE=${BUNDLE:-.whl-bundle}
BUDGET=${CHECK_BUDGET_S:-470}
declare -A CAP=([install]=30 [gpu_tests]=130 [make_model]=30 [ezo_train]=80 [ezo_merge]=40 [ezo_generate_nf4]=40
                [generate_bench]=110)
total=0
for name in "${!CAP[@]}"; do ((total += CAP[$name])); done
((total <= BUDGET)) || { echo "step caps add up to $total s, over the $BUDGET s budget"; exit 2; }
SCALE=1
((TINY)) && SCALE=${CHECK_CPU_SCALE:-4}
BUDGET=$((BUDGET * SCALE))
WORK=$(mktemp -d /tmp/ezo-check.XXXXXX)
RES=${OUT:-$WORK/out}
mkdir -p "$RES"
LOG=$RES/gpu_check.log
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 HF_HOME=$WORK/hf TOKENIZERS_PARALLELISM=false
STEPS=""

step() {  # step NAME CMD...: run with the smaller of its cap and the budget left; log; record rc and seconds
  local name=$1 cap=$((CAP[$1] * SCALE)); shift
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
  STEPS+="${STEPS:+, }\"$name\": {\"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"cap\": ${CAP[$name]}}"
  return $rc
}

if ((TINY)); then
  export PYTHONPATH=$PWD/src
  ASSETS=$WORK/assets
  "$PY" bench/gpu_assets.py pack "$ASSETS" >>"$LOG" 2>&1 || { echo "no assets (needs llama-models and ../shared)"; exit 1; }
  LAYERS="--tiny --layers 2"; GEN_FLAGS="--tiny"; ROWS=1; LEN=128
else
  ASSETS=$BUNDLE/assets
  # --target keeps the image's packages; ours come first on the path. No registry: --no-index, and no deps resolved.
  step install "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$BUNDLE"/*.whl || exit 1
  export PYTHONPATH=$WORK/site
  LAYERS="--layers 2"; GEN_FLAGS="--prompts 64 --new-tokens 128 --batch 64 --sweep="; ROWS=2; LEN=1024
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

step gpu_tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py

# ezo train -> merge -> generate on a random model with Llama-3.1-8B's widths (hidden 4,096, MLP 14,336, vocabulary
# 128,256, GQA 32/8) and 2 of its 32 layers (3 GB in bf16, saved as 1 GB shards), so it fits the budget.
MODEL=$WORK/model-8b-shape
"$PY" bench/gpu_assets.py pairs "$WORK/pairs.jsonl" >>"$LOG" 2>&1
if step make_model "$PY" bench/gpu_assets.py model "$ASSETS" "$MODEL" $LAYERS \
  && step ezo_train "$PY" -m ezoforge train "$WORK/pairs.jsonl" -o "$WORK/train" -m "$MODEL" --max-steps 4 \
       --save-every 4 --set train.batch_size=$ROWS --set train.max_length=$LEN --set train.eval_fraction=0.1 \
  && step ezo_merge "$PY" bench/gpu_assets.py peak "$RES/merge_peak.json" -- \
       "$PY" -m ezoforge merge "$WORK/train" -o "$WORK/merged" \
  && step ezo_generate_nf4 "$PY" -m ezoforge generate -m "$WORK/merged" --quantize nf4 -p "日本の首都はどこですか？" \
       --max-new-tokens 16
then
  cp "$WORK/train/stats.json" "$RES/train_stats.json" 2>/dev/null
fi
MODEL_GB=$(du -sb "$MODEL" 2>/dev/null | awk '{printf "%.2f", $1 / 1e9}')
SHARD_GB=$(find "$MODEL" -name '*.safetensors' -printf '%s\n' 2>/dev/null | sort -n | tail -1 | awk '{printf "%.2f", $1 / 1e9}')
rm -rf "$MODEL" "$WORK/merged"

step generate_bench "$PY" bench/generate_bench.py --assets "$ASSETS" $GEN_FLAGS --json "$WORK/generate_bench.json"

SUMMARY=$("$PY" - "$WORK" "$RES" "$ENV_JSON" "{$STEPS}" "$SECONDS" "${MODEL_GB:-0}" "${SHARD_GB:-0}" <<'EOF'
import json, sys
from pathlib import Path
work, res, env, steps, seconds = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
def load(path):
    return json.loads(path.read_text()) if path.exists() else None
merge = load(res / "merge_peak.json")
print(json.dumps({"env": env, "seconds": seconds, "steps": steps, "ok": all(s["rc"] == 0 for s in steps.values()),
                  "ezo_train": load(work / "train" / "stats.json"),
                  "ezo_merge": merge and {"peak_rss_gib": merge["peak_rss_gib"], "model_gb": float(sys.argv[6]),
                                          "largest_shard_gb": float(sys.argv[7])},
                  "generate_bench": load(work / "generate_bench.json")}, ensure_ascii=False))
EOF
)
echo "$SUMMARY"
[[ -n "${OUT:-}" ]] && echo "$SUMMARY" >"$OUT/gpu_check.json"
rm -rf "$WORK/site" "$WORK/train" "$WORK/hf"
