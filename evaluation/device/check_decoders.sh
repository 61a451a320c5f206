# Issue 6: do the fast decode paths, compiled into CUDA graphs, give the kvpress loop's greedy tokens
# on the H100? Random-init Pythia-2.8B, fp16, prompt 2000, 64 new tokens, batch 2; dense, SnapKV,
# StreamingLLM and PyramidKV at 50% kept (PyramidKV: neox paths only), the neox step as one graph
# and as the two-stream graph; then sampled. About 8 minutes on a fresh machine.
#   export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/check_decoders.sh
# The committed result (H100): results/pythia-2.8b_random_check_decoders_h100/, with its README.md (command, commit).
out=${OUT:-results}
python3 evaluation/check_decoders.py --model EleutherAI/pythia-2.8b --random-init \
  --output "$out/pythia-2.8b_random_check_decoders_h100.json" 2>&1 | grep -vE "Warning|warn" | tail -12
# Sampled (temperature 0.8, top-k 50): both neox graphs against the uncompiled neox step, same noise.
python3 evaluation/check_decoders.py --model EleutherAI/pythia-2.8b --random-init --press snapkv pyramidkv \
  --temperature 0.8 --top_k 50 --output "$out/pythia-2.8b_random_check_decoders_sampled_h100.json" 2>&1 \
  | grep -vE "Warning|warn" | tail -8
