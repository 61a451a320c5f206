# Sourced by the single-call speed runs on the kvpress loop (foundation_speed.sh,
# attention_level_speed.sh, cross_layer_speed.sh): the setting they share, so each names only its
# presses, repeats and folder. Random-init Pythia-2.8B, fp16, SDPA, a 2000-token prompt, 256 forced
# new tokens, batch 1, the kvpress decoder (HF forward + DynamicCache per token), dense beside.
kvpress_loop_speed() {  # kvpress_loop_speed ARGS...: speed_grid.py's other options (--press, --output_dir, ...)
  python3 evaluation/speed_grid.py --model EleutherAI/pythia-2.8b --random-init --dtype float16 \
    --attn_implementation sdpa --decoder kvpress --prompt_tokens 2000 --new_tokens 256 --batch_size 1 "$@"
}
