# Streaming at equal bytes on the GPU machine (evaluation/equal_bytes_streaming.py): SmolLM2-135M-Instruct
# (Q4_1 GGUF, real weights; the offline quality stand-in, Llama architecture, not Pythia), fp32,
# both PG-19-style books of the streaming sweep (--sample_idx 0: Pride and Prejudice, 1: Frankenstein),
# their first 8193 tokens (64 calls of 128; SmolLM2 was trained on 8192 positions, so every method
# stays inside them), byte budgets of 256 / 512 / 1024 tokens' fp16 keys and values per layer.
#   baselines: per book, budget and eviction rule, one process: the rule in fp16, and holding the
#              tokens KIVI-layout 2 / 4 / 8 bits pay for (StreamingLLM's rule: uniform quantization)
#   rdkv:      per book, budget and RD-KV setting, one process, paired (--versus) against the best
#              baseline of its book and budget: run after baselines, on the same machine
#   chunk:     chunks of 1 token against 128 on Frankenstein's first 1537 tokens at budget 256
#              (RD-KV re-allocates at every token there: the slowest part; started first)
# Each process runs its own dense row on its text; logs in logs/; the files come back as
# $OUT/equal_bytes_streaming.tgz, made on exit (also when cut short).
# Same two calls as quality_sweep_smollm2.sh (the GGUF in two halves, evaluation/device/smollm2_sweep.sh):
# Call 1 (carry .whl_quality .gguf_a): WHEELS=.whl_quality source evaluation/device/setup_env.sh && mkdir -p /tmp/gg && cp .gguf_a/part /tmp/gg/a
# Call 2 (carry .gguf_b .sweepdata): export KVPRESS_NEOX_COMMIT=<hash> PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
#                                    bash evaluation/device/equal_bytes_streaming_smollm2.sh [chunk] [baselines] [rdkv]
sweep=equal_bytes_streaming program=evaluation/equal_bytes_streaming.py MAX_JOBS=${MAX_JOBS:-16}
source evaluation/device/smollm2_sweep.sh
text="--dataset pg19 --max_tokens 8193 --chunk_tokens 128"
settings=("" "evict_weight=8" "key_layout=token" "evict_per_head=1")  # RDKVPress's defaults, then one change each
[ -n "${SETTINGS:-}" ] && IFS=';' read -r -a settings <<< "$SETTINGS"  # SETTINGS="a;b": other RD-KV settings
budgets=${BUDGETS:-256 512 1024}
parts=" ${*:-chunk baselines rdkv} "
baseline_jobs=()
date
if [[ $parts == *" chunk "* ]]; then
  for chunk in 1 128; do
    short="--dataset pg19 --sample_idx 1 --max_tokens 1537 --chunk_tokens $chunk --budget_tokens 256"
    run chunk${chunk}_rdkv $short --part rdkv --rdkv ""
    run chunk${chunk}_baselines $short --part baselines --scorers streaming_llm h2o tova treekv snapkv --bits 4
  done
fi
if [[ $parts == *" baselines "* ]]; then
  for book in 0 1; do
    for budget in $budgets; do
      for scorer in streaming_llm h2o tova scissorhands treekv snapkv; do
        run baselines_book${book}_${budget}_$scorer $text --sample_idx $book --budget_tokens $budget --part baselines \
          --scorers $scorer --bits 2 4 8
        baseline_jobs+=($!)
      done
    done
  done
fi
if [[ $parts == *" rdkv "* ]]; then
  # the pairing reads the baselines' files: this call's (or a previous call's on the same machine, in $work)
  [ ${#baseline_jobs[@]} -gt 0 ] && wait "${baseline_jobs[@]}"
  for book in 0 1; do
    for budget in $budgets; do
      i=0
      for setting in "${settings[@]}"; do
        i=$((i + 1))
        run rdkv_book${book}_${budget}_$i $text --sample_idx $book --budget_tokens $budget --part rdkv \
          --rdkv "$setting" --versus "$work"/baselines_book${book}_${budget}_*.json
      done
    done
  done
fi
wait
date
cat "$work/logs/failed" 2>/dev/null || echo "no part failed"
