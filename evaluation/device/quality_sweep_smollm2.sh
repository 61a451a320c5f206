# The quality sweep on the GPU machine: SmolLM2-135M-Instruct (Q4_1 GGUF, real weights, the
# offline quality stand-in; Llama architecture, not Pythia), fp32, with 95% bootstrap intervals.
#   context:   WikiText-2 test, 32 windows of 1536 prefilled + 512 scored tokens, 75/50/25% kept
#   streaming: both PG-19-style books, their first 12289 tokens (past SmolLM2's 8192 training
#              length) in chunks of 128, budgets 512 and 1024 tokens per layer
#   chunk:     Frankenstein's first 1537 tokens, budget 512, chunks of 1 token (the papers'
#              setting) and of 128, the main streaming methods (InfLLM's pair runs on the CPU:
#              on the GPU its CPU-held block memory makes it slower than there)
#   lm_infinite: LM-Infinite's streaming runs on both books (as in streaming)
#   chunk_long: chunks of 1 against 128 on 6144 scored tokens (StreamingLLM, LM-Infinite, TreeKV, InfLLM)
#   levels:    the attention-level and cross-layer presses at 32 windows of WikiText-2 test
#   kv_quant:  quanto int4 / int2 caches, alone and after SnapKV / H2O, 32 windows
#   budgets:   budget 2048 for the main streaming methods and InfLLM at 1024, both books
# Each part is its own process, up to MAX_JOBS (default 8) side by side: one small model is
# launch-bound, so one GPU serves several. With all 24 at once (2026-12-01, H200) every process
# slowed to a crawl (token-by-token streaming at 5 tokens/s, InfLLM at 4 s per 128-token chunk)
# and InfLLM and the chunk-1 runs did not finish in a call; they were run on the CPU instead.
# Every process writes its JSON when done and runs its own dense row on the same windows / text
# (the paired intervals use that row); logs in logs/.
# The files come back as one tarball, $OUT/quality_sweep.tgz, made on exit (also when cut short).
#
# The GGUF (98 MB) exceeds one call's 64 MiB carry, so it travels in three parts (.gguf_1, .gguf_2, .gguf_3)
# over three calls on the same warm machine; the data travels in .sweepdata (never committed).
# Call 1 (carry .whl_quality .gguf_1): WHEELS=.whl_quality source evaluation/device/setup_env.sh && mkdir -p /tmp/gg && cp .gguf_1/part /tmp/gg/p1
# (.whl_quality: .whl without the torchao and optimum-quanto wheels, which the quality runs do not use)
# Call 2 (carry .gguf_2 .whl_ao): python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_ao/*.whl && cp .gguf_2/part /tmp/gg/p2
# Call 3 (carry .gguf_3 .sweepdata): export KVPRESS_NEOX_COMMIT=<hash> PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
#                                    bash evaluation/device/quality_sweep_smollm2.sh [PART...]   (default: context streaming chunk)
# Then, here: tar xzf quality_sweep.tgz -C results/smollm2-135m_quality_h200, and evaluation/report.py per part.
sweep=quality_sweep program=evaluation/perplexity.py
source evaluation/device/smollm2_sweep.sh
parts=${*:-context streaming chunk}
date
for part in $parts; do
  case "$part" in
    context)
      i=0
      for group in "h2o observed_attention" "scissorhands tova" "treekv streaming_llm sliding_window" \
                   "lm_infinite snapkv pyramidkv" "expected_attention lagkv keydiff" "knorm random" "infllm"; do
        i=$((i + 1))
        run context_$i --dataset wikitext --press $group --compression_ratio 0.25 0.5 0.75 \
          --context_tokens 1536 --eval_tokens 512 --num_windows 32
      done ;;
    streaming)
      for book in 0 1; do
        i=0
        for group in "streaming_llm sliding_window knorm" "snapkv tova h2o" "scissorhands treekv" \
                     "lm_infinite infllm" "expected_attention observed_attention" "pyramidkv random keydiff lagkv"; do
          i=$((i + 1))
          run streaming_book${book}_$i --dataset pg19 --sample_idx $book --protocol streaming --chunk_tokens 128 \
            --max_tokens 12289 --budget 512 1024 --press $group
        done
      done ;;
    chunk)  # one process per method: each runs its own dense row first (the streams are launch-bound)
      for method in "streaming_llm lm_infinite" h2o tova scissorhands treekv; do
        run "chunk1_${method// /_}" --dataset pg19 --sample_idx 1 --protocol streaming --chunk_tokens 1 \
          --max_tokens 1537 --budget 512 --press $method
      done
      run chunk128 --dataset pg19 --sample_idx 1 --protocol streaming --chunk_tokens 128 --max_tokens 1537 \
        --budget 512 --press streaming_llm lm_infinite h2o tova scissorhands treekv ;;
    lm_infinite)  # the streaming runs of LM-Infinite (cut short in the first H200 call)
      for book in 0 1; do
        run streaming_book${book}_lm_infinite --dataset pg19 --sample_idx $book --protocol streaming \
          --chunk_tokens 128 --max_tokens 12289 --budget 512 1024 --press lm_infinite
      done ;;
    chunk_long)  # token by token (the papers' setting) against chunks of 128 on 6144 scored tokens of Pride
                 # and Prejudice: six 1024-token stretches for the block bootstrap, within one call's 10 minutes
      for method in streaming_llm lm_infinite treekv infllm; do
        run "chunk1_long_$method" --dataset pg19 --sample_idx 1 --protocol streaming --chunk_tokens 1 \
          --max_tokens 6145 --budget 512 --press $method
      done
      run chunk128_long --dataset pg19 --sample_idx 1 --protocol streaming --chunk_tokens 128 --max_tokens 6145 \
        --budget 512 --press streaming_llm lm_infinite treekv infllm ;;
    levels)  # the attention-level and cross-layer presses at 32 windows (their first runs had 2-8, on the CPU)
      w="--dataset wikitext --context_tokens 1536 --eval_tokens 512 --num_windows 32"
      run levels_lowrank $w --press lowrank --compression_ratio 0.125 0.25 0.375
      run levels_lowrank_svd $w --press lowrank_svd --compression_ratio 0.125 0.25
      run levels_head_merge $w --press head_merge --compression_ratio 0.333 0.5 0.667
      run levels_minicache $w --press minicache --compression_ratio 0.1 0.25 0.4
      run levels_kvsharer $w --press kvsharer kvsharer_similar --compression_ratio 0.1 0.25 0.4
      run levels_combos $w --press kvsharer_snapkv snapkv streaming_llm_minicache streaming_llm snapkv_lowrank \
        --compression_ratio 0.5 ;;
    kv_quant)  # quanto int4 / int2 caches (the dense row of each file is the quantized cache alone)
      for bits in int4 int2; do
        run kv_quant_$bits --dataset wikitext --context_tokens 1536 --eval_tokens 512 --num_windows 32 \
          --kv_quant $bits --press snapkv h2o --compression_ratio 0.5 0.75
      done ;;
    budgets)  # budget 2048 for the main methods, and InfLLM at 1024, on both books
      for book in 0 1; do
        run budget2048_book${book}_a --dataset pg19 --sample_idx $book --protocol streaming --chunk_tokens 128 \
          --max_tokens 12289 --budget 2048 --press streaming_llm lm_infinite tova h2o
        run budget2048_book${book}_b --dataset pg19 --sample_idx $book --protocol streaming --chunk_tokens 128 \
          --max_tokens 12289 --budget 2048 --press scissorhands treekv snapkv
        run budget1024_book${book}_infllm --dataset pg19 --sample_idx $book --protocol streaming --chunk_tokens 128 \
          --max_tokens 12289 --budget 1024 --press infllm
      done ;;
    *) echo "usage: quality_sweep_smollm2.sh [context] [streaming] [chunk] [lm_infinite] [chunk_long] [levels] [kv_quant] [budgets]" >&2
       exit 2 ;;
  esac
done
wait
date
cat "$work/logs/failed" 2>/dev/null || echo "no part failed"
