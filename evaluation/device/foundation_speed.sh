# Issue 2's GPU run: random-init Pythia-2.8B, fp16, prompt 2000, 256 forced new tokens, batch 1,
# dense vs SnapKV, Knorm and StreamingLLM at 50% and 25% kept, on the kvpress decode path
# (HF forward + DynamicCache per token).
# Run from the repo root on the GPU machine (pass the commit: the machine gets no .git):
#   export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/foundation_speed.sh
# The committed result (H100): results/pythia-2.8b_random_speed_h100/, with its README.md (command, commit).
set -e
out=${OUT:-results}
python3 evaluation/speed_grid.py --model EleutherAI/pythia-2.8b --random-init --dtype float16 \
  --attn_implementation sdpa --decoder kvpress --press snapkv knorm streaming_llm --compression_ratio 0.5 0.75 \
  --prompt_tokens 2000 --new_tokens 256 --batch_size 1 --repeats 3 \
  --output_dir "$out/pythia-2.8b_random_speed_h100"
