# Issue 6 speed grid on the H100 (issue 13: the parts h200_smoke and h200 on the H200): random-init Pythia-2.8B, fp16, prompt 2000, 256 forced new tokens.
# One part per device call (10-minute limit). The device tool brings back at most 8 files, so the
# cells come back as one tarball, $OUT/grid_PART.tgz, made on exit (also when a run fails midway).
#   export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/speed_grid.sh PART
# The neox decoder's default step is the two-stream graph keeping its buffer between generations;
# the parts that reproduce earlier committed files name the whole-step graph (reduce-overhead).
#   baselines: transformers eager / SDPA / static+compile, the kvpress loop, the HF StaticCache path (batch 1, dense)
#   fast:      the whole-step neox graph, three attention back ends (dense), and SnapKV / StreamingLLM /
#              PyramidKV at 50% and 25% kept (SDPA), batch 1
#   backends:  the whole-step neox graph's attention back ends (sdpa, flex, eager; each runs prefill and
#              decode), dense
#   presses:   the default (two-stream) neox step, dense and SnapKV / StreamingLLM / PyramidKV at 50% and
#              25% kept, batch 1; then dense with the graph captured again for each generation (--no-keep_buffer)
#   batch:     largest batch at 2k context, dense vs SnapKV at 25% kept, whole-step neox graph
#   same_run:  every decoder's dense cell at batch 1 in one call (the baselines and this project's path,
#              two-stream, and the whole-step graph, side by side on one machine; median of 2; about 8 minutes)
#   pyramidkv: PyramidKV at 50% and 25% kept on the whole-step neox graph (re-measured after each layer's
#              buffer was sized to its own kept tokens)
#   two_stream: the neox step compiled whole vs as a two-stream graph (each layer's MLP beside its
#              attention; captured again for each generation), dense and SnapKV at 25% kept, batch 1 and 64
#   two_stream_batch: the two-stream step alone at batch 64 (dense and SnapKV at 25% kept)
#   h200_smoke: the ceilings measurement and two dense batch-1 cells (neox, hf_static) on the H200 (~2 minutes)
#   h200:      the headline grid again on the H200 in ONE call (about 9 minutes; each stage has its own time
#              limit, so the tarball is made even when one runs long): every decoder dense at batch 1
#              (same_run/, median of 2), the presses at 50% and 25% kept on the neox step (presses/), the
#              largest batch at 2k for dense (64, 128) and for SnapKV at 25% kept (256, 384; the H100 reached 192)
#              (batch/, two-stream with --no-keep_buffer, 1 timed run)
# Then, here: python evaluation/speed_grid.py --merge DIR... --output_dir results/pythia-2.8b_random_grid_h100
# (H200: --output_dir results/pythia-2.8b_random_grid_h200). Every file's header holds the bandwidth measured at
# its call's start (evaluation/ceilings.py); the floors divide by it.
set -e
part=$1
work=/tmp/grid_$part
mkdir -p "$work"
trap 'tar czf "${OUT:-results}/grid_$part.tgz" -C "$work" .' EXIT
common="--model EleutherAI/pythia-2.8b --random-init --dtype float16 --prompt_tokens 2000 --new_tokens 256"
whole="--compile_mode reduce-overhead"
case "$part" in
  baselines)
    python3 evaluation/speed_grid.py $common --decoder hf_eager hf_sdpa hf_static kvpress static --press \
      --batch_size 1 --output_dir "$work" ;;
  fast)
    python3 evaluation/speed_grid.py $common --decoder neox --decode_attention sdpa flex eager --press \
      --batch_size 1 $whole --output_dir "$work/backends"
    python3 evaluation/speed_grid.py $common --decoder neox --press snapkv streaming_llm pyramidkv \
      --compression_ratio 0.5 0.75 --batch_size 1 $whole --output_dir "$work/presses" ;;
  backends)
    python3 evaluation/speed_grid.py $common --decoder neox --decode_attention sdpa flex eager --press \
      --batch_size 1 $whole --output_dir "$work" ;;
  presses)
    python3 evaluation/speed_grid.py $common --decoder neox --press snapkv streaming_llm pyramidkv \
      --compression_ratio 0.5 0.75 --batch_size 1 --output_dir "$work"
    python3 evaluation/speed_grid.py $common --decoder neox --press --batch_size 1 \
      --no-keep_buffer --output_dir "$work/no-keep" ;;
  batch)
    python3 evaluation/speed_grid.py $common --decoder neox --press snapkv --compression_ratio 0.75 \
      --batch_size 64 96 128 192 --repeats 1 $whole --output_dir "$work" ;;
  pyramidkv)
    python3 evaluation/speed_grid.py $common --decoder neox --press pyramidkv --compression_ratio 0.5 0.75 \
      --batch_size 1 $whole --output_dir "$work" ;;
  same_run)
    python3 evaluation/speed_grid.py $common --decoder hf_eager hf_sdpa hf_static kvpress static neox --press \
      --batch_size 1 --repeats 2 --output_dir "$work"
    python3 evaluation/speed_grid.py $common --decoder neox --press --batch_size 1 --repeats 2 \
      $whole --output_dir "$work/reduce-overhead" ;;
  two_stream)
    for mode in reduce-overhead two-stream; do
      python3 evaluation/speed_grid.py $common --decoder neox --press snapkv --compression_ratio 0.75 \
        --batch_size 1 64 --repeats 2 --compile_mode $mode --no-keep_buffer --output_dir "$work/$mode"
    done ;;
  two_stream_batch)
    python3 evaluation/speed_grid.py $common --decoder neox --press snapkv --compression_ratio 0.75 \
      --batch_size 64 --repeats 1 --no-keep_buffer --output_dir "$work" ;;
  h200_smoke)
    python3 evaluation/step_floor.py --measure
    python3 evaluation/speed_grid.py $common --decoder neox hf_static --press --batch_size 1 --repeats 2 \
      --output_dir "$work" ;;
  h200)
    stage() {  # stage SECONDS NAME ARGS...: one speed_grid run under its own time limit, its log kept
      local limit=$1 name=$2; shift 2
      mkdir -p "$work/$name"
      echo "== $name (limit ${limit}s) at ${SECONDS}s" >&2
      timeout "$limit" python3 evaluation/speed_grid.py $common "$@" --output_dir "$work/$name" \
        2> >(tee "$work/$name/log.txt" >&2) || echo "== $name ended with status $? at ${SECONDS}s" >&2
    }
    # the fast paths first, so a stage cut short loses a slow baseline rather than them
    stage 240 same_run --decoder neox static hf_static kvpress hf_sdpa hf_eager --baseline hf_eager --press \
      --batch_size 1 --repeats 2
    stage 115 presses --decoder neox --press snapkv streaming_llm pyramidkv --compression_ratio 0.5 0.75 \
      --batch_size 1
    stage 85 batch/dense --decoder neox --press --batch_size 64 128 --repeats 1 --no-keep_buffer
    stage 115 batch/snapkv --decoder neox --press snapkv --compression_ratio 0.75 --batch_size 256 384 \
      --no-dense --repeats 1 --no-keep_buffer
    echo "== done at ${SECONDS}s" >&2 ;;
  *) echo "usage: speed_grid.sh baselines|fast|backends|presses|batch|same_run|pyramidkv|two_stream|two_stream_batch|h200_smoke|h200" >&2
     exit 2 ;;
esac
