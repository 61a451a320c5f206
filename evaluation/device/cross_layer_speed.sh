# Issue 4's GPU run for the cross-layer methods: random-init Pythia-2.8B, fp16, SDPA, prompt 2000,
# 256 forced new tokens, batch 1, kvpress decode path (HF forward + DynamicCache per token), in one run:
# dense; MiniCache (minicache) at 0.25 (layers 16-31 merged in pairs, from the middle) and 0.5 (all 32
# layers); KVSharer (kvsharer) at 0.25 and 0.5 (8 and 16 layers read another layer's cache); and the
# combinations kvsharer_snapkv and streaming_llm_minicache at the same totals. Median of 2 after a warm-up
# (9 settings: about 5 minutes on an H100).
# KVSharer calibrates on 2048 random token ids first: on random weights the layers it picks mean
# nothing, but memory and time depend only on how many layers share (the row records which).
# Run from the repo root on the GPU machine (pass the commit: the machine gets no .git):
#   export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/cross_layer_speed.sh
# The committed result (H100): results/pythia-2.8b_random_cross_layer_h100/, with its README.md (command, commit).
set -e
out=${OUT:-results}
source evaluation/device/kvpress_loop_speed.sh
kvpress_loop_speed --press minicache kvsharer kvsharer_snapkv streaming_llm_minicache --compression_ratio 0.25 0.5 \
  --repeats 2 --output_dir "$out/pythia-2.8b_random_cross_layer_h100"
