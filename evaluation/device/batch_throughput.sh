# Issue 6, batch throughput on the static-cache path: random-init Pythia-2.8B, fp16, SDPA, prompt
# 2000, 256 forced new tokens, dense and SnapKV with 25% kept at batch 64 and 128 (a method whose
# batch does not fit is recorded as out of memory): does compression buy throughput once the KV
# cache, not the weights, dominates the bytes read?
#   export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/batch_throughput.sh
# The committed result (H100): results/pythia-2.8b_random_batch_static_h100/, with its README.md (command, commit).
out=${OUT:-results}
run() {  # batch, press arguments, output folder; a batch that does not fit fails alone
  timeout 285 python3 evaluation/speed_grid.py --model EleutherAI/pythia-2.8b --random-init --dtype float16 \
    --attn_implementation sdpa --decoder static --prompt_tokens 2000 --new_tokens 256 --repeats 2 \
    --batch_size "$1" $2 --output_dir "$out/pythia-2.8b_random_batch_static_h100/$3" 2>&1 \
    | grep -E "static|error|Error" | tail -4
}
run 64 "--press snapkv --compression_ratio 0.75" batch64
run 128 "--press snapkv --compression_ratio 0.75" batch128
