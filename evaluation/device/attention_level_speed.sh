# Issue 4's GPU run for the attention-level methods: random-init Pythia-2.8B, fp16, SDPA, prompt 2000,
# 256 forced new tokens, batch 1, kvpress decode path (HF forward + DynamicCache per token), dense vs
# low-rank KV (lowrank), KV head merging (head_merge) and SnapKV + low-rank (snapkv_lowrank), each at
# 50% and 75% of the KV bytes removed, in one run. lowrank and head_merge calibrate on 2048 random token
# ids first (random weights: the ranks and groups mean nothing, their sizes set memory and time).
# Run from the repo root on the GPU machine (pass the commit: the machine gets no .git):
#   export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/attention_level_speed.sh
# The committed result (H100): results/pythia-2.8b_random_attention_level_h100/, with its README.md (command, commit).
set -e
out=${OUT:-results}
source evaluation/device/kvpress_loop_speed.sh
kvpress_loop_speed --press lowrank head_merge snapkv_lowrank --compression_ratio 0.5 0.75 --repeats 3 \
  --output_dir "$out/pythia-2.8b_random_attention_level_h100"
