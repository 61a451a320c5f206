# Issue 6: prefill (TTFT) of a 2000-token prompt with each transformers attention back end, on the
# H100: random-init Pythia-2.8B, fp16, batch 1, dense and SnapKV at 25% kept, kvpress decoder,
# one decode step (only TTFT counts here), median of 3 after a warm-up (flex compiles in it).
# FlexAttention runs through patches/flex_attention.py. One folder per back end.
#   export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/prefill_attention.sh
# The committed result (H100): results/pythia-2.8b_random_prefill_h100/, with its README.md (command, commit).
out=${OUT:-results}
for attention in sdpa eager flex_attention; do
  timeout 150 python3 evaluation/speed_grid.py --model EleutherAI/pythia-2.8b --random-init --dtype float16 \
    --attn_implementation $attention --decoder kvpress --press snapkv --compression_ratio 0.75 \
    --prompt_tokens 2000 --new_tokens 2 --repeats 3 --output_dir "$out/pythia-2.8b_random_prefill_h100/$attention" 2>&1 \
    | grep -E "^decoder=kvpress|rror" | tail -3
done
