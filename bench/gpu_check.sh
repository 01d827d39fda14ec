#!/usr/bin/env bash
# The prepared GPU check: on one H100/H200 whose image has torch (cu130), triton, transformers, peft and accelerate
# but no registry (`make gpu-bundle` brings the rest), in 8 minutes. Each step runs under a cap:
#   install          the bundle's wheels: pip --no-index --no-deps --target, ours first on the path
#   stage_imports    tests/test_stage_imports.py: every stage module and `python -m ezoforge train` import here
#   gpu_tests        pytest -m gpu tests/test_gpu.py: TRL's Triton fused LM head against the plain loss, Liger's
#                    kernels, packed rows through SDPA with their mask, QLoRA, offloaded checkpointing, and `ezo run`'s
#                    stage processes giving CUDA memory back
#   make_model       a random model with Llama-3.1-8B's widths and 2 of its 32 layers (3 GB in bf16, 1 GB shards)
#   ezo_train        QLoRA, 4 steps of packed rows; its stats.json records what computed it (attention, the fused
#                    LM head, Liger's modules, the 4-bit layers, the Triton kernels launched)
#   ezo_merge        streamed shard by shard, its peak RSS recorded
#   nf4_generate     the merged model loaded as nf4 as `ezo generate` loads it: its Linear4bit layers, one reply
#   ezo_eval_nf4     `ezo eval --quantize nf4` on held-out perplexity: the eval stage scoring from 4-bit weights
#   generate_bench   bench/generate_bench.py at one batch size
# then one JSON summary on stdout and in $OUT/gpu_check.json: each step's rc, seconds and cap, and for each path
# above the evidence that it ran (bench/gpu_assets.py summary), not only exit codes.
#
#   make gpu-bundle                  # here: .whl-bundle/ (wheels, the converted tokenizer, prompts), carried there
#   bash bench/gpu_check.sh          # there, from the checkout root
#   bash bench/gpu_check.sh --tiny   # CPU, .venv's dev install, tiny shapes: checks the script, measures nothing; the
#                                    # CUDA tests and paths report "skipped: no CUDA" (caps and budget x
#                                    # CHECK_CPU_SCALE, default 4: a CPU is slower at everything)
#
# The caps add up to the budget (CHECK_BUDGET_S, default 470 s; the version probe and the summary take the rest of
# the 8 minutes) and a step never runs past what is left of it. A step that reaches its cap gets SIGINT (then SIGKILL
# 15 s later), reports rc 124 and keeps what it finished: the tests write each result as it comes
# ($OUT/gpu_tests.jsonl), generate_bench its JSON after each measurement. A step that fails skips only the ones that
# need its output (make_model -> ezo_train -> ezo_merge -> the nf4 steps). The caps of the steps that compile Triton
# kernels on a cold cache (the CUDA tests and training: TRL's fused LM head and Liger's kernels; generate_bench's
# compiled static-cache decode) hold that compile. Logs: $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1
PY=${PYTHON:-python3}  # there: the image's Python, which holds torch
((TINY)) && PY=${PYTHON:-.venv/bin/python}
BUNDLE=${BUNDLE:-.whl-bundle}
BUDGET=${CHECK_BUDGET_S:-470}
declare -A CAP=([install]=20 [stage_imports]=25 [gpu_tests]=120 [make_model]=20 [ezo_train]=75 [ezo_merge]=30
                [nf4_generate]=35 [ezo_eval_nf4]=35 [generate_bench]=110)
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
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 HF_HOME=$WORK/hf TOKENIZERS_PARALLELISM=false \
  EZO_CACHE_DIR=$WORK/cache PYTEST_JSONL=$RES/gpu_tests.jsonl

step() {  # step NAME CMD...: run with the smaller of its cap and the budget left; log; record rc and seconds
  local name=$1 cap=$((CAP[$1] * SCALE)); shift
  local left=$((BUDGET - SECONDS)) t0=$SECONDS rc
  ((cap > left)) && cap=$left
  if ((cap < 5)); then
    rc=124; echo "=== $name: skipped, the budget is spent" | tee -a "$LOG"
  else
    echo "=== $name (cap ${cap} s): $*" | tee -a "$LOG"
    timeout -s INT -k 15 "$cap" "$@" >>"$LOG" 2>&1; rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
    ((rc != 0)) && tail -n 25 "$LOG"
  fi
  printf '{"step": "%s", "rc": %d, "seconds": %d, "cap": %d}\n' "$name" $rc $((SECONDS - t0)) "${CAP[$name]}" \
    >>"$WORK/steps.jsonl"
  return $rc
}

if ((TINY)); then
  export PYTHONPATH=$PWD/src:$PWD/bench
  ASSETS=$WORK/assets
  "$PY" bench/gpu_assets.py pack "$ASSETS" >>"$LOG" 2>&1 || { echo "no assets (needs llama-models and ../shared)"; exit 1; }
  LAYERS="--tiny --layers 2"; GEN_FLAGS="--tiny"; ROWS=1; LEN=512  # the pairs are 143-246 tokens: rows still pack
  ENV_OF=""
else
  ASSETS=$BUNDLE/assets
  step install "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$BUNDLE"/*.whl || exit 1
  export PYTHONPATH=$WORK/site:$PWD/bench
  LAYERS="--layers 2"; GEN_FLAGS="--prompts 64 --new-tokens 128 --batch 64 --sweep="; ROWS=2; LEN=1024
  ENV_OF=$BUNDLE
fi

# Versions, the card, and what would stop the check anyway: bitsandbytes without this torch's CUDA library.
"$PY" bench/gpu_assets.py env $ENV_OF >"$WORK/env.json" 2>>"$LOG" || { tail -n 3 "$LOG"; exit 1; }
echo "env: $(cat "$WORK/env.json")" | tee -a "$LOG"

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -p pytest_jsonl -rs)
step stage_imports "${PYTEST[@]}" tests/test_stage_imports.py
step gpu_tests "${PYTEST[@]}" -m gpu tests/test_gpu.py

# ezo train -> merge -> nf4 on a random model with Llama-3.1-8B's widths (hidden 4,096, MLP 14,336, vocabulary
# 128,256, GQA 32/8) and 2 of its 32 layers, so it fits the budget.
MODEL=$WORK/model-8b-shape
"$PY" bench/gpu_assets.py pairs "$WORK/pairs.jsonl" >>"$LOG" 2>&1
step make_model "$PY" bench/gpu_assets.py model "$ASSETS" "$MODEL" $LAYERS \
  && step ezo_train "$PY" -m ezoforge train "$WORK/pairs.jsonl" -o "$WORK/train" -m "$MODEL" --max-steps 4 \
       --save-every 4 --set train.batch_size=$ROWS --set train.max_length=$LEN --set train.eval_fraction=0.1 \
  && step ezo_merge "$PY" bench/gpu_assets.py peak "$RES/merge_peak.json" -- \
       "$PY" -m ezoforge merge "$WORK/train" -o "$WORK/merged" \
  && { step nf4_generate "$PY" bench/gpu_assets.py nf4 "$WORK/merged" "$RES/nf4.json"
       step ezo_eval_nf4 "$PY" -m ezoforge eval -m "$WORK/merged" --quantize nf4 --set eval.backend=transformers \
         --tasks "ppl:src/ezoforge/data/heldout/heldout-ja.jsonl" --limit 8 -o "$WORK/eval-nf4"; }
cp "$WORK/train/stats.json" "$RES/train_stats.json" 2>/dev/null
rm -rf "$WORK/merged"

step generate_bench "$PY" bench/generate_bench.py --assets "$ASSETS" $GEN_FLAGS --json "$WORK/generate_bench.json"

"$PY" bench/gpu_assets.py summary "$WORK" "$RES" "$MODEL"
rm -rf "$MODEL" "$WORK/site" "$WORK/train" "$WORK/hf" "$WORK/cache"
