# Issue 16, item 4: generation past 2048 positions at a constant cost. Random-init Pythia-2.8B, fp16,
# batch 1, a 1024-token prompt: StreamingLLM (4 sinks, in-cache positions) on the ring buffer
# (decoding/ring_cache.py) at budgets 1024 and 2047 generating 16384 new tokens each, and dense up
# to Pythia's 2048 positions (1024 new tokens), every run as the two-stream CUDA graph; TPOT per
# 512-token bin, memory per bin and the floor from the copy bandwidth measured at the start. Then the
# ring's greedy tokens against the slow decode-time path (BudgetPress) for 600 tokens at budget 256
# (the ring wraps twice). The JSON is rewritten after every run; the plot is drawn from it. About 4-5
# minutes on a fresh machine.
#   export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/long_generation.sh
# Writes $OUT/long_generation.json and $OUT/long_generation.png (here again, if needed:
# python evaluation/long_generation_plot.py FILE.json).
out=${OUT:-results/tmp}
mkdir -p "$out"
timeout 330 python3 evaluation/long_generation.py --model EleutherAI/pythia-2.8b --random-init --dtype float16 \
  --prompt_tokens 1024 --new_tokens 16384 --budget 1024 2047 --bin_tokens 512 --check_tokens 600 \
  --check_budget 256 --output "$out/long_generation.json" 2>&1 | grep -vE "Warning|warn"
python3 evaluation/long_generation_plot.py "$out/long_generation.json"
