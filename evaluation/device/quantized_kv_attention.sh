# The quantized-KV decode attention (decoding/quantized_kv_attention.py, Triton) on the H200: one
# layer's attention at Pythia-2.8B's shapes (32 heads of 80), SDPA and split_kv over fp16 and the
# quantized kernel over 8-bit and 4-bit keys and values, each against its bytes over the copy
# bandwidth of the process, in one device call of about 3 minutes (a budget of 4), an estimate, never timed:
#   export KVPRESS_NEOX_COMMIT=<commit>; source evaluation/device/setup_env.sh && bash evaluation/device/quantized_kv_attention.sh
# Needs only the .whl/ of setup_env.sh (Triton comes with the machine's CUDA torch).
#   kernels: evaluation/quantized_kv_speed.py at batch 1 and 64 over 2000 tokens, then batch 1 over 8000,
#            7 launch configurations each for split_kv and the quantized kernel; "best" names the
#            fastest agreeing one per shape and format. Its stderr is kept as log.txt beside its JSON,
#            under $OUT/quantized_kv_attention/.
set -u
out=${OUT:-results/tmp}/quantized_kv_attention
mkdir -p "$out"
budget=${QUANTIZED_KV_BUDGET_S:-240}  # seconds for all stages, the environment's setup not counted
stage_root=$out
source evaluation/device/budget_stages.sh
python3 -c "import triton; print('triton', triton.__version__)" >&2 || echo "== no triton: the kernels will fail" >&2
# Measuring stops at 180 s (the batch-1 2000-token shape first), leaving time to write the JSON.
stage 230 kernels evaluation/quantized_kv_speed.py --shapes 1x32x80x2000 64x32x80x2000 1x32x80x8000 \
  --bits 8x8 4x4 --time_limit_s 180 --output "$out/kernels/kernels.json"
echo "== done at $((SECONDS - start))s" >&2
