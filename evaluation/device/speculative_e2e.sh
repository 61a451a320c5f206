# Issue 5, speculative decoding end to end on the H100, on the CUDA-graph decoders: random-init
# Pythia-2.8B target, random-init Pythia-160m draft, fp16, one WikiText-2 prompt of 2000 tokens,
# 256 new tokens, greedy, k = 4. Random weights make acceptance meaningless (a random draft almost
# never agrees), so this run checks that speculation runs and stays lossless with CUDA graphs, and
# times an iteration; speedups on real weights are predicted from the step costs instead. The JSON is
# rewritten after each draft spec, so a run cut short by its time limit keeps the specs it finished.
# The prompt needs the Pythia tokenizer and WikiText-2: copy them from ../shared/data into .sweepdata/
# (ignored by git) and carry it: carry [".whl", ".sweepdata"].
#   export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/speculative_e2e.sh
# The committed result (H100): results/pythia-2.8b_random_speculative_h100/, with its README.md (command, commit).
out=${OUT:-results}
common="--model EleutherAI/pythia-2.8b --random-init --dtype float16 --attn_implementation sdpa --data-dir .sweepdata
  --dataset wikitext --num_prompts 1 --prompt_tokens 2000 --new_tokens 256 --warmup 1"
timeout 400 python3 evaluation/speculative.py $common --decoder neox \
  --speculative draft=EleutherAI/pythia-160m,k=4 self=layer_skip,skip=8,k=4 self=streaming_llm,budget=256,k=4 \
  --output "$out/pythia-2.8b_random_speculative_e2e_neox_h100.json" 2>&1 | grep -vE "Warning|warn\(|^ *$" | tail -8
timeout 170 python3 evaluation/speculative.py $common --decoder static --speculative draft=EleutherAI/pythia-160m,k=4 \
  --output "$out/pythia-2.8b_random_speculative_e2e_static_h100.json" 2>&1 | grep -vE "Warning|warn\(|^ *$" | tail -6
