# KV compression at equal bytes on the GPU machine (evaluation/equal_bytes.py): SmolLM2-135M-Instruct
# (Q4_1 GGUF, real weights; the offline quality stand-in, Llama architecture, not Pythia), fp32,
# WikiText-2 test, windows of 1536 prefilled + 512 scored tokens, byte targets 25 / 12.5 / 6.25%
# of the fp16 cache.
#   1. RD-KV's settings are tuned on windows 32-39 (never reported); the baselines run on windows
#      0-31 (the reported ones; choosing the best baseline there favours the baselines).
#   2. At each target, the tuning setting of lowest PPL runs on windows 0-31 (selected.json).
# Each part is its own process (one small model is launch-bound: one GPU serves several); each
# runs its own dense row on its windows. Logs in logs/; the files come back as
# $OUT/equal_bytes.tgz, made on exit (also when cut short).
# Same two calls as quality_sweep_smollm2.sh (the GGUF in two halves, evaluation/device/smollm2_sweep.sh):
# Call 2 (carry .gguf_b .sweepdata): export KVPRESS_NEOX_COMMIT=<hash> PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
#                                    bash evaluation/device/equal_bytes_smollm2.sh [tune] [uniform] [eviction] [composites] [selected]
sweep=equal_bytes program=evaluation/equal_bytes.py MAX_JOBS=${MAX_JOBS:-16}
source evaluation/device/smollm2_sweep.sh
tune="--first_window 32 --num_windows 8"  # windows 32-39: never reported
report="--first_window 0 --num_windows 32"
parts=" ${*:-tune uniform eviction composites selected} "
date
if [[ $parts == *" tune "* ]]; then
  # window_size=1536: every query of the 1536-token prefill (H2O's evidence); recent_tokens: fp16 newest
  for prior in 1 2 4; do
    for window in "window_size=16" "window_size=1536 recent_tokens=16"; do
      run "tune_prior${prior}_${window%% *}" $tune --part rdkv --rdkv \
        "prior=$prior bits=2,3,4,8 key_layout=channel $window" "prior=$prior bits=3,4,8 key_layout=channel $window" \
        "prior=$prior bits=2,3,4,8 $window"
    done
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
if [[ $parts == *" selected "* ]]; then
  run selected $report --part selected --select_from "$work"/tune_*.json
  wait
fi
date
cat "$work/logs/failed" 2>/dev/null || echo "no part failed"
