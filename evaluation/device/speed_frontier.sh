# Issue 16, items 1-3, on the H200: random-init Pythia-2.8B, fp16, prompt 2000, 256 forced new tokens.
#   source evaluation/device/setup_env.sh && bash evaluation/device/speed_frontier.sh PART (the parts below)
# Needs torchao 0.18.0 and optimum-quanto 0.2.7 in .whl/ (the command: docs/speed.md, "Speed frontier").
# One part per device call; each under 9 minutes including compiles, each stage under its own time
# limit (a stage cut short loses itself, not the rest), every stage's stderr kept as its log.txt. The
# results come back as one tarball, $OUT/speed_frontier_PART.tgz, made on exit (also after a failure).
#   frontier: batch 1. (1) evaluation/speed_frontier.py, fp16 weights: the plain two-stream step, the
#             folded one (LayerNorms folded, one QKV + MLP-in GEMM) and the folded one with Triton GEMVs
#             (inductor's tuned reductions instead of cuBLAS), dense and SnapKV keeping 25%, the copy
#             bandwidth measured at the process's start, tokens checked; (2) evaluation/profile_step.py, the
#             plain step's two-stream kernels grouped against their bytes; (3) int8 weights: plain fp16 (paired),
#             torchao on the plain and split steps (split: the GELU written out between the MLP's GEMVs),
#             dense and SnapKV 25%; (4) the split int8 step's profile; (5) fp8 weights (torchao, plain and
#             split), dense and SnapKV 25%.
#   fp16:     (1), then the profiles of the plain, folded and folded Triton steps.
#   quant:    (3)-(5) alone (when frontier's budget cuts its last stages).
#   int4:     plain fp16 beside torchao's int4 weights (plain and split steps) in one process, then the
#             plain int4 step profiled.
#   batch:    the largest batch at a 2k context, dense and SnapKV keeping 25% (evaluation/speed_grid.py
#             --batch_size max: from the estimate of what the free memory holds, up or down until a batch
#             fits and one does not, bisected to 16; each tried batch a full 256-token row, one warm-up and
#             one timed run, out of memory recorded as such; two-stream, --no-keep_buffer, the prefill in
#             micro-batches of 16), then the SnapKV step's kernels at its largest batch, decode attention's kernels (SDPA) at the
#             largest dense batch that fit, and at batch 64 with FlexAttention's split-KV decoding kernel if the budget leaves time,
#             against the KV bytes over the copy bandwidth (profile_step.py).
#   prefix_small / prefix_large: the two-stream step's prefix buckets (decoding/neox_cuda_graphs.py: one
#             graph per 64 new slots, each reading the buffer only that far) against one graph over the
#             whole buffer (--prefix_bucket 0), each setting in its own process of the same call, 0 first:
#             small: batch 1 (dense and SnapKV keeping 25%, 3 repeats) and dense at batch 176; large: SnapKV
#             keeping 25% at batch 560 (176 and 560: the largest batches of batch_f140e83/, one warm-up and one
#             timed run, as the batch part runs them).
#   streams:  the step with the MLP on the attention's stream (--compile_mode one-stream) against two streams,
#             SnapKV keeping 25% at batch 560 and dense at 176 (as prefix_large runs them), then the one-stream
#             step's kernels at 560.
#   kv_bits:  the decode step over an fp16, an 8-bit and a 4-bit KV buffer (speed_grid.py --kv_bits, the
#             Triton quantized-KV kernel), dense and SnapKV keeping 25%, batch 1 and 64, 3 repeats each: the
#             same cells in one call (results/pythia-2.8b_random_kv_bits_decode_h200/ has the first, one run).
set -u
part=${1:-frontier}
work=/tmp/speed_frontier_$part
mkdir -p "$work"
trap 'tar czf "${OUT:-results}/speed_frontier_$part.tgz" -C "$work" .' EXIT
common="--model EleutherAI/pythia-2.8b --random-init --dtype float16 --prompt_tokens 2000"
budget=${FRONTIER_BUDGET_S:-500}  # seconds for all stages of the part, the environment's setup not counted
stage_root=$work
source evaluation/device/budget_stages.sh
frontier="evaluation/speed_frontier.py $common --new_tokens 256 --repeats 3 --check_tokens 64"
profile="evaluation/profile_step.py $common --compile_mode two-stream --steps 20 --graph_steps 100"
fp16_cells() {
  stage 200 fp16 $frontier --cells plain:fp16 folded:fp16 folded:fp16_triton --press snapkv \
    --compression_ratio 0.75 --time_limit_s 100 --output "$work/fp16/frontier_fp16.json"
}
profile_cell() {  # profile_cell NAME CELL
  stage 60 "profile_$1" $profile --cell "$2" --output "$work/profile_$1/profile.json"
}
quant_cells() {
  # plain fp16 in the int8 process, so that int8 against fp16 is paired (same process, same bandwidth);
  # quanto's int8 is left out of this part: 5x slower than torchao's in both calls that timed it
  # (11.65 ms, frontier_4e58fce/ and quant_b3755ff/), it took a third of the stage
  # split: the plain step with the GELU written out between the MLP's GEMVs (inlined into the
  # output GEMV's reduction, that kernel read its int8 weight at 1.35 TB/s, quant_f140e83/); the folded
  # int8 step is out: slower than the plain one in quant_b3755ff/ and quant_f140e83/
  stage 200 int8 $frontier --cells plain:fp16 plain:int8_torchao split:int8_torchao --press snapkv \
    --compression_ratio 0.75 --time_limit_s 140 --output "$work/int8/frontier_int8.json"
  profile_cell split_int8 split:int8_torchao
  stage 120 fp8 $frontier --cells plain:fp8_torchao split:fp8_torchao --press snapkv --compression_ratio 0.75 \
    --output "$work/fp8/frontier_fp8.json"
}
int4_cells() {
  # torchao's int4 weights (tinygemm, bf16 weights, a scale and zero per 128 inputs) paired with fp16 in
  # one process: past the fp16 floor if its GEMVs read their half bytes near the bandwidth
  stage 220 int4 $frontier --cells plain:fp16 plain:int4_torchao split:int4_torchao --press snapkv \
    --compression_ratio 0.75 --time_limit_s 160 --output "$work/int4/frontier_int4.json"
  profile_cell plain_int4 plain:int4_torchao
}
case "$part" in
  int4) int4_cells ;;
  frontier) fp16_cells; profile_cell plain plain:fp16; quant_cells ;;
  fp16) fp16_cells; profile_cell plain plain:fp16; profile_cell folded folded:fp16
        profile_cell folded_triton folded:fp16_triton ;;
  quant) quant_cells ;;
  batch)
    # The first try is the estimate rounded up to 16. One that fits costs one to one and a half
    # minutes (its compile, then two 256-token generations), one that does not about a prefill: no
    # new try is begun once a search has run --max_batch_time_s, so that it ends within its stage.
    # Expandable segments: the micro-batches' pressed caches (SnapKV: 41 MB per layer and group) are
    # carved out of the prefill's freed activation blocks; emptied one by one into the batch's buffer
    # they left 41 GiB reserved but unusable for its 1.6 GiB layers at batch 448 (b3755ff/81963b9: every
    # SnapKV try out of memory). Mapped pages instead of fixed segments let freed memory be reused.
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    grid="evaluation/speed_grid.py $common --new_tokens 256 --decoder neox --repeats 1 --no-keep_buffer
      --batch_size max --max_batch_step 16 --prefill_batch 16"
    # dense starts at the largest batch the last H200 search found (176 under expandable segments,
    # batch_b9ca22a/; 192 not tried): two tries (a fitting one takes about 45 s) leave the budget to
    # SnapKV's search
    stage 150 batch_dense $grid --press --max_batch_start 176 --max_batch_tries 2 --max_batch_time_s 60 \
      --output_dir "$work/batch_dense"
    stage 220 batch_snapkv $grid --press snapkv --compression_ratio 0.75 --no-dense --max_batch_tries 6 --max_batch_time_s 120 \
      --output_dir "$work/batch_snapkv"
    # the largest dense batch measured (every cell file, so a search cut short still names one)
    largest=$(python3 -c 'import json, sys
rows = [json.load(open(path))["rows"][0] for path in sys.argv[1:]]
print(max([row["batch_size"] for row in rows if "tpot_ms" in row] or [64]))' "$work"/batch_dense/neox_*.json 2>/dev/null || echo 64)
    largest_snapkv=$(python3 -c 'import json, sys
rows = [json.load(open(path))["rows"][0] for path in sys.argv[1:]]
print(max([row["batch_size"] for row in rows if "tpot_ms" in row] or [64]))' "$work"/batch_snapkv/neox_*.json 2>/dev/null || echo 64)
    # where SnapKV's step at its largest batch is further from its floor than dense's (1.45x against 1.24x,
    # batch_f140e83/), which is what keeps the throughput ratio under the batches' ratio
    stage 90 "snapkv_b${largest_snapkv}_sdpa" $profile --cell plain:fp16 --press snapkv --compression_ratio 0.75 \
      --batch_size $largest_snapkv --steps 10 --graph_steps 20 --prefill_batch 16 \
      --output "$work/snapkv_b${largest_snapkv}_sdpa/profile.json"
    for run in "$largest sdpa" "64 flex"; do
      set -- $run
      stage 80 "attention_b$1_$2" $profile --cell plain:fp16 --batch_size $1 --backend $2 --steps 10 \
        --graph_steps 20 --prefill_batch 16 --output "$work/attention_b$1_$2/profile.json"
    done ;;
  prefix_small)
    for bucket in 0 64; do
      stage 100 "b1_bucket$bucket" evaluation/speed_grid.py $common --new_tokens 256 --decoder neox --repeats 3 \
        --press snapkv --compression_ratio 0.75 --batch_size 1 --prefix_bucket $bucket --output_dir "$work/b1_bucket$bucket"
    done
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # as the batch part
    for bucket in 0 64; do
      stage 120 "dense_b176_bucket$bucket" evaluation/speed_grid.py $common --new_tokens 256 --decoder neox --repeats 1 \
        --no-keep_buffer --prefill_batch 16 --press --batch_size 176 --prefix_bucket $bucket \
        --output_dir "$work/dense_b176_bucket$bucket"
    done ;;
  prefix_large)
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    for bucket in 0 64; do
      stage 200 "snapkv_b560_bucket$bucket" evaluation/speed_grid.py $common --new_tokens 256 --decoder neox --repeats 1 \
        --no-keep_buffer --prefill_batch 16 --press snapkv --compression_ratio 0.75 --no-dense --batch_size 560 \
        --prefix_bucket $bucket --output_dir "$work/snapkv_b560_bucket$bucket"
    done ;;
  streams)
    # the hand-captured step on one stream against two at the largest batches (issue 16 item 3): at 560
    # sequences the GEMMs and the attention may each fill the GPU alone, so running the MLP beside the
    # attention may only stretch both; each setting its own process, pairs first, then the one-stream
    # step's kernels at 560 (no MLP beside the attention)
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    for cell in "snapkv 560" "dense 176"; do
      set -- $cell
      press="--press"
      [ $1 = snapkv ] && press="--press snapkv --compression_ratio 0.75 --no-dense"
      for mode in one-stream two-stream; do
        stage 110 "$1_b$2_$mode" evaluation/speed_grid.py $common --new_tokens 256 --decoder neox --repeats 1 \
          --no-keep_buffer --prefill_batch 16 $press --batch_size $2 --compile_mode $mode --output_dir "$work/$1_b$2_$mode"
      done
    done
    stage 90 snapkv_b560_one-stream_profile $profile --compile_mode one-stream --cell plain:fp16 --press snapkv \
      --compression_ratio 0.75 --batch_size 560 --steps 10 --graph_steps 20 --prefill_batch 16 \
      --output "$work/snapkv_b560_one-stream_profile/profile.json" ;;
  kv_bits)
    for bits in fp16 8x8 4x4; do
      option=""
      [ $bits != fp16 ] && option="--kv_bits $bits"
      stage 150 "kv_bits_$bits" evaluation/speed_grid.py $common --new_tokens 256 --decoder neox --repeats 3 \
        --press snapkv --compression_ratio 0.75 --batch_size 1 64 $option --output_dir "$work/kv_bits_$bits"
    done ;;
  *) echo "usage: speed_frontier.sh frontier|fp16|quant|int4|batch|prefix_small|prefix_large|streams|kv_bits" >&2; exit 2 ;;
esac
echo "== done at $((SECONDS - start))s" >&2
