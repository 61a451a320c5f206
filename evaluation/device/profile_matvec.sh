# Issue 6: can the batch-1 decode step get nearer the roofline floor by writing its projections
# as multiply-and-sum reductions (inductor's own kernels, bias and element-wise work fused) rather
# than cuBLAS GEMV calls? evaluation/profile_step.py on the dense step (random-init Pythia-2.8B,
# fp16, SDPA, prompt 2000, batch 1): kernels and CUDA-graph step time with --matvec linear, with
# --matvec reduction, and with reduction plus inductor's coordinate-descent tuning of the kernels'
# launch shapes (as gpt-fast sets). About 8 minutes on a fresh machine.
#   export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/profile_matvec.sh
out=${OUT:-results}
profile() {
  timeout 200 python3 evaluation/profile_step.py --model EleutherAI/pythia-2.8b --random-init "$@" 2>&1 \
    | grep -E "kernel time|rror" | tail -3
}
profile --matvec linear --output "$out/pythia-2.8b_random_profile_step_linear_h100.json"
profile --matvec reduction --output "$out/pythia-2.8b_random_profile_step_reduction_h100.json"
TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 profile --matvec reduction \
  --output "$out/pythia-2.8b_random_profile_step_reduction_tuned_h100.json"
