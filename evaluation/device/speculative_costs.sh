# Issue 5, speculative decoding on the GPU: what one iteration costs on the fast GPT-NeoX CUDA-graph
# path (decoding/neox_decode.py). Random-init Pythia-2.8B (target) and Pythia-160m (draft), fp16, SDPA, a cached prompt of 2000
# random tokens, batch 1 and 8: the target's forward of k+1 tokens (one verify pass) against its
# single-token decode step for k = 1..8; the draft's step on its own 2000-token cache; the self-drafts'
# steps (the target on a 256- or 512-token cache; the target skipping 20% or 40% of its layers).
# Median of 20 forwards after 3 compiling/recording calls; the JSON is rewritten after every
# measurement and new ones stop after 360 s, so the run ends within about 7 minutes.
#   export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/speculative_costs.sh
# Then, on any machine (matplotlib), the predicted speedup curves from these costs and measured acceptance:
#   python evaluation/speculative_speedup.py results/pythia-2.8b_random_speculative_h100/pythia-2.8b_random_speculative_costs_h100.json \
#     --acceptance results/smollm2-135m_speculative_cpu/smollm2-135m_speculative_self_wikitext.json results/smollm2-135m_speculative_cpu/smollm2-135m_speculative_self_pg19.json \
#     --output results/pythia-2.8b_random_speculative_h100/pythia-2.8b_random_speculative_predicted_h100
# `speculative_costs.sh drafts`: k = 4 only and a second file, for the draft and self-draft rows at
# batch 1 and 8 (the first full run spent its time limit on the target's verify curve; this one spent
# it compiling and reached the Pythia-160m rows). `speculative_costs.sh selfdrafts`: batch 1 only,
# one layer-skip fraction (8 of 32 layers), so the self-draft rows come within one call.
# The committed result (H100): results/pythia-2.8b_random_speculative_h100/, with its README.md (command, commit).
out=${OUT:-results}
k_values="1 2 3 4 5 6 7 8"; name=costs; limit=360
batches="1 8"; skips="0.2 0.4"
if [ "$1" = drafts ]; then k_values=4; name=costs_drafts; limit=470; fi
if [ "$1" = selfdrafts ]; then k_values=4; name=costs_selfdrafts; limit=230; batches=1; skips=0.25; fi
timeout $((limit + 90)) python3 evaluation/speculative.py --model EleutherAI/pythia-2.8b --random-init --verify_costs \
  --draft_model EleutherAI/pythia-160m --dtype float16 --attn_implementation sdpa --prompt_tokens 2000 \
  --new_tokens 256 --batch_size $batches --k_values $k_values --self_budget 256 512 --skip_fraction $skips \
  --repeats 20 --time_limit_s $limit --output "$out/pythia-2.8b_random_speculative_${name}_h100.json" 2>&1 \
  | grep -vE "Warning|warn\(" | tail -45
