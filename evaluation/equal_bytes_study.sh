#!/usr/bin/env bash
# The equal-bytes study in one command, for a model you can load (Pythia-2.8B from the hub by default):
#   bash evaluation/equal_bytes_study.sh [OUTPUT_DIR]          # default results/tmp/equal_bytes_study
# Both protocols, every byte counted as stored (evaluation/equal_bytes.py, equal_bytes_streaming.py):
#   context:   WikiText-2 test, NUM_WINDOWS windows of CONTEXT_TOKENS prefilled + EVAL_TOKENS scored;
#              uniform quantization, eviction presses, eviction then quantization (H2O, SnapKV), and
#              RD-KV at each byte target with the setting chosen on SmolLM2's tuning windows
#              (results/smollm2-135m_equal_bytes_h200/README.md, call13's selection); table.md and
#              equal_bytes.png from evaluation/equal_bytes_report.py
#   streaming: both PG-19-style books (sample_idx 0 and 1), the first MAX_TOKENS tokens in chunks of
#              128, a budget of BUDGET_TOKENS tokens' fp16 bytes: each eviction rule in fp16 and
#              holding the tokens 2 / 4 / 8 bits pay for, then RD-KV paired with the best of them
# The settings were tuned on the SmolLM2 stand-in, not on this model: to tune here, run
# `equal_bytes.py --part rdkv --first_window 32 --num_windows 8 --rdkv ...` and `--part selected`.
# Environment (defaults for Pythia-2.8B on one GPU): MODEL=EleutherAI/pythia-2.8b DTYPE=float16
# DEVICE=cuda CONTEXT_TOKENS=1536 EVAL_TOKENS=512 NUM_WINDOWS=32 BUDGET_TOKENS=512 MAX_TOKENS=8193
# (Pythia holds 2048 positions: past them the streaming rows measure positions it never saw),
# DATA_DIR (default: $KVPRESS_NEOX_DATA, else the hub's datasets).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/tmp/equal_bytes_study}
mkdir -p "$out"
python=${PYTHON:-python3}
model_args=(--model "${MODEL:-EleutherAI/pythia-2.8b}" --dtype "${DTYPE:-float16}" --device "${DEVICE:-cuda}")
[ -n "${DATA_DIR:-}" ] && model_args+=(--data-dir "$DATA_DIR")
context=(--dataset wikitext --context_tokens "${CONTEXT_TOKENS:-1536}" --eval_tokens "${EVAL_TOKENS:-512}"
         --num_windows "${NUM_WINDOWS:-32}")
streaming=(--dataset pg19 --budget_tokens "${BUDGET_TOKENS:-512}" --max_tokens "${MAX_TOKENS:-8193}" --chunk_tokens 128)
context_run() { "$python" evaluation/equal_bytes.py "${model_args[@]}" "${context[@]}" "$@"; }

context_run --part uniform --output "$out/uniform.json"
context_run --part eviction --output "$out/eviction.json"
context_run --part composites --output "$out/composites.json"
# target: setting (the pooled best of call11-call13 on SmolLM2's windows 32-39; the compositions run
# with RD-KV's own accumulated evidence off, evaluation/equal_bytes.py's default after H2O)
context_run --part rdkv --targets 0.25 --rdkv "rotate=1 key_layout=channel" --output "$out/rdkv_0.25.json"
context_run --part rdkv --targets 0.125 --rdkv "after_h2o=0.6 evict_weight=16 rotate=1 key_layout=token" --output "$out/rdkv_0.125.json"
context_run --part rdkv --targets 0.0625 --rdkv "after_h2o=0.3 evict_weight=16" --output "$out/rdkv_0.0625.json"
"$python" evaluation/equal_bytes_report.py "$out"/uniform.json "$out"/eviction.json "$out"/composites.json \
  "$out"/rdkv_*.json --output "$out/equal_bytes" > "$out/table.md"

for book in 0 1; do
  "$python" evaluation/equal_bytes_streaming.py "${model_args[@]}" "${streaming[@]}" --sample_idx $book \
    --part baselines --bits 2 4 8 --output "$out/streaming_book${book}_baselines.json"
  "$python" evaluation/equal_bytes_streaming.py "${model_args[@]}" "${streaming[@]}" --sample_idx $book \
    --part rdkv --rdkv "" --versus "$out/streaming_book${book}_baselines.json" --output "$out/streaming_book${book}_rdkv.json"
done
echo "wrote $out (context: table.md, equal_bytes.png; streaming: streaming_book*_rdkv.json, paired with the best baseline)" >&2
