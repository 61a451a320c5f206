# KV compression at equal bytes on the GPU machine (evaluation/equal_bytes.py): SmolLM2-135M-Instruct
# (Q4_1 GGUF, real weights; the offline quality stand-in, Llama architecture, not Pythia), fp32,
# WikiText-2 test, windows of 1536 prefilled + 512 scored tokens, byte targets 25 / 12.5 / 6.25%
# of the fp16 cache.
#   1. RD-KV's settings are tuned on windows 32-39 (never reported; H2O + quantization runs there
#      too, to compare); the baselines run on windows 0-31 (the reported ones; choosing the best
#      baseline there favours the baselines).
#   2. At each target, the tuning setting of lowest PPL runs on windows 0-31 (selected.json).
# Each part is its own process (one small model is launch-bound: one GPU serves several); each
# runs its own dense row on its windows. Logs in logs/; the files come back as
# $OUT/equal_bytes.tgz, made on exit (also when cut short).
# Same two calls as quality_sweep_smollm2.sh (the GGUF in two halves, evaluation/device/smollm2_sweep.sh):
# Call 2 (carry .gguf_b .sweepdata): export KVPRESS_NEOX_COMMIT=<hash> PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
#                                    bash evaluation/device/equal_bytes_smollm2.sh [tune] [tune_baselines] [uniform] [eviction] [composites] [selected]
sweep=equal_bytes program=evaluation/equal_bytes.py MAX_JOBS=${MAX_JOBS:-16}
source evaluation/device/smollm2_sweep.sh
tune="--first_window 32 --num_windows 8"  # windows 32-39: never reported
report="--first_window 0 --num_windows 32"
parts=" ${*:-tune uniform eviction composites selected} "
date
if [[ $parts == *" tune "* ]]; then
  # call11: RD-KV's own rule with H2O's evidence inside it (accumulated=a: the expected attention is
  # a times the mean attention each token received from every prefill query), a longer fp16 recent
  # window, KIVI key groups of 128 tokens (less scale overhead per key at low bits), and the eviction
  # weight; beside them the defaults and call10's best composition at 12.5% (call10's grid: commit 1541077)
  for acc in 0.5 1; do
    for recent in 16 64; do
      for weight in 4 16; do
        setting="accumulated=$acc recent_tokens=$recent evict_weight=$weight"
        run "tune_acc${acc}_recent${recent}_evict${weight}" $tune --part rdkv --rdkv "$setting" "$setting group_tokens=128"
      done
    done
  done
  run tune_reference $tune --part rdkv --rdkv "" "group_tokens=128" "after_h2o=0.75 evict_weight=16"
fi
if [[ $parts == *" tune_baselines "* ]]; then  # the best baseline of windows 0-31 on the tuning windows (call9/)
  for target in 0.25 0.125 0.0625; do
    run tuning_h2o_$target $tune --part composites --targets $target --composed_with h2o
  done
fi
[[ $parts == *" uniform "* ]] && run uniform $report --part uniform
[[ $parts == *" eviction "* ]] && run eviction $report --part eviction
if [[ $parts == *" composites "* ]]; then
  for target in 0.25 0.125 0.0625; do
    for press in snapkv h2o; do
      run composites_${press}_$target $report --part composites --targets $target --composed_with $press
    done
  done
fi
wait
date
if [[ $parts == *" selected "* ]]; then  # one process per target (each with its own dense row), in parallel
  for target in 0.25 0.125 0.0625; do
    run selected_$target $report --part selected --targets $target --select_from "$work"/tune_*.json
  done
  wait
fi
date
cat "$work/logs/failed" 2>/dev/null || echo "no part failed"
