# Issue 6, KV quantization on the GPU: random-init Pythia-2.8B, fp16, SDPA, prompt 2000, 256 forced
# tokens, batch 1, kvpress decoder (QuantizedCache needs it); dense and SnapKV 25% kept, with the
# cache in fp16, int4 and int2 (optimum-quanto 0.2.7 carried in .whl/). One file per setting.
#   export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/kv_quant_speed.sh
# The first int4 run of this script hit its time limit with no output: quanto builds its CUDA
# extension on first use. Time that build on its own first, so a slow build is seen as such.
out=${OUT:-results}
start=$SECONDS
timeout 240 python3 evaluation/perplexity.py --model EleutherAI/pythia-70m --random-init --speed --kv_quant int4 \
  --press snapkv --prompt_tokens 300 --new_tokens 4 --repeats 1 --output /tmp/int4_warmup.json > /dev/null 2>&1
echo "int4 warm-up (pythia-70m, exit $?): $((SECONDS - start)) s"
for quant in none int4 int2; do
  timeout 170 python3 evaluation/perplexity.py --model EleutherAI/pythia-2.8b --random-init --speed --dtype float16 \
    --attn_implementation sdpa --decoder kvpress --kv_quant $quant --press snapkv --compression_ratio 0.75 \
    --prompt_tokens 2000 --new_tokens 256 --repeats 2 --output "$out/pythia-2.8b_random_kv_${quant}_h100.json" 2>&1 \
    | grep -E "kvpress|rror" | tail -3
done
