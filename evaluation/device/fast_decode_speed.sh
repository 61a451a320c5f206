# Issue 6, first GPU run of the static-cache path: random-init Pythia-2.8B, fp16, SDPA, prompt 2000,
# 256 forced new tokens, batch 1; dense and SnapKV at 50% / 25% kept, with the kvpress loop
# (the HF baseline) and the StaticCache + torch.compile(mode="reduce-overhead") path, in one run.
#   export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/fast_decode_speed.sh
# The committed result (H100): results/pythia-2.8b_random_speed_static_h100/, with its README.md (command, commit).
set -e
out=${OUT:-results}
python3 evaluation/speed_grid.py --model EleutherAI/pythia-2.8b --random-init --dtype float16 \
  --attn_implementation sdpa --press snapkv --compression_ratio 0.5 0.75 --decoder kvpress static \
  --prompt_tokens 2000 --new_tokens 256 --batch_size 1 --repeats 3 \
  --output_dir "$out/pythia-2.8b_random_speed_static_h100"
python3 evaluation/step_floor.py --model EleutherAI/pythia-2.8b --batch 1 --cache 2128 --measure | tail -1
