# Issue 2's GPU run: random-init Pythia-2.8B, fp16, prompt 2000, 256 forced new tokens, batch 1,
# dense vs SnapKV, Knorm and StreamingLLM at 50% and 25% kept, on the kvpress decode path
# (HF forward + DynamicCache per token).
# Run from the repo root on the GPU machine (pass the commit: the machine gets no .git):
#   export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/foundation_speed.sh
# The committed result (H100): results/pythia-2.8b_random_speed_h100/, with its README.md (command, commit).
set -e
out=${OUT:-results}
source evaluation/device/kvpress_loop_speed.sh
kvpress_loop_speed --press snapkv knorm streaming_llm --compression_ratio 0.5 0.75 --repeats 3 \
  --output_dir "$out/pythia-2.8b_random_speed_h100"
