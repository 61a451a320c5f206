# Issue 6, KV quantization on the GPU: random-init Pythia-2.8B, fp16, SDPA, prompt 2000, 256 forced
# tokens, batch 1, kvpress decoder (QuantizedCache needs it); dense and SnapKV 25% kept, with the
# cache in fp16, int4 and int2 (optimum-quanto 0.2.7 carried in .whl/). One folder per setting.
#   export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/kv_quant_speed.sh
# quanto compiles its CUDA extension (unpack, AWQ and Marlin kernels) with nvcc on first use, which
# took longer than one run's time limit once. Build it first, timed on its own; it is rebuilt after
# every fresh install into /tmp/site. Another script may run on the GPU meanwhile:
#   bash evaluation/device/kv_quant_speed.sh build & bash evaluation/device/check_decoders.sh; wait
#   bash evaluation/device/kv_quant_speed.sh
# The committed result (H100): results/pythia-2.8b_random_kv_quant_h100/ (int2/, int4/: one call each), with its README.md (command, commit).
out=${OUT:-results}
if [ "$1" = build ]; then
  start=$SECONDS
  timeout 420 python3 -c "from optimum.quanto.library.extensions import get_extension; get_extension('quanto_cuda').lib"
  echo "quanto CUDA extension build: exit $?, $((SECONDS - start)) s"
  exit
fi
for quant in none int4 int2; do
  timeout 170 python3 evaluation/speed_grid.py --model EleutherAI/pythia-2.8b --random-init --dtype float16 \
    --attn_implementation sdpa --decoder kvpress --kv_quant $quant --press snapkv --compression_ratio 0.75 \
    --prompt_tokens 2000 --new_tokens 256 --repeats 2 --output_dir "$out/pythia-2.8b_random_kv_quant_h100/$quant" 2>&1 \
    | grep -E "kvpress|rror" | tail -3
done
