# Issue 6: why a decode step over a compressed cache is not faster than dense on the fast path
# (PyramidKV at 50% kept measured 10% slower, SnapKV at 50% 1-3%). The neox step's kernels
# (compiled without CUDA graphs so the profiler sees each one) for dense, SnapKV and PyramidKV at
# 50% kept, random-init Pythia-2.8B, fp16, SDPA, prompt 2000, batch 1; one JSON each, to compare
# the attention kernels' names, launches and time (a mask-padding copy or another kernel choice
# at unaligned cache lengths would show there).
#   export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/profile_presses.sh
# The committed result (H100): results/pythia-2.8b_random_profile_presses_h100/ (as dense.json, snapkv.json, pyramidkv.json), with its README.md (command, commit).
out=${OUT:-results}
for press in dense snapkv pyramidkv; do
  option=$([ "$press" = dense ] || echo "--press $press --compression_ratio 0.5")
  timeout 180 python3 evaluation/profile_step.py --model EleutherAI/pythia-2.8b --random-init $option \
    --output "$out/pythia-2.8b_random_profile_step_${press}_h100.json" 2>&1 | grep -vE "Warning|warn" | tail -8
done
