# Issue 17 (part 2): tensor-parallel fast decoding on two H200s (machine kind nvidia-h200-x2), against
# one GPU in the same call. Random-init Pythia-12B, then Pythia-2.8B, fp16, SDPA, prompt 2000, 256
# forced new tokens, dense at batch 1 and at the largest batch one GPU holds (64 for 12B, 128 for
# 2.8B; the buffer captured again for each generation there), and for 12B at batch 1 also SnapKV
# (scores each head on its own) and TOVA (scores by the mean over all heads) at 50% kept. One torchrun
# per model (evaluation/tensor_parallel.py): TP1, the two-stream step on GPU 0, then TP2, the model
# split over both GPUs; tokens compared with TP1 and with the uncompiled reference (fp16 ties named by
# its logit margins). Target: TP2 TPOT at most 0.6x TP1 for Pythia-12B. About 7 minutes.
#   export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/tensor_parallel_speed.sh
# carry [".whl"]. Writes $OUT/tensor_parallel_pythia-12b.json and _pythia-2.8b.json (rewritten after each
# cell, so a stage cut short by its time limit keeps what it measured), their logs, and topology.txt
# (how the GPUs are linked). Commit them under results/pythia_random_tensor_parallel_h200x2/.
# NVLink multicast stays off (the host's GPUs are shared; KINDS.md), also in the processes torchrun starts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-results}
mkdir -p "$out"
{ nvidia-smi topo -m; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } > "$out/topology.txt" 2>&1
run() {  # time limit (s), model, largest batch, more options
  timeout "$1" python3 -m torch.distributed.run --standalone --nproc_per_node 2 evaluation/tensor_parallel.py \
    --model "EleutherAI/$2" --random-init --dtype float16 --batch_size 1 "$3" $4 --prompt_tokens 2000 \
    --new_tokens 256 --warmup 1 --repeats 2 --output "$out/tensor_parallel_$2.json" 2>&1 \
    | grep -vE "Warning|warn\(|^ *$" > "$out/tensor_parallel_$2.log"
  tail -16 "$out/tensor_parallel_$2.log"
}
run 300 pythia-12b 64 "--press snapkv tova --press_batch_size 1 --compression_ratio 0.5"
run 190 pythia-2.8b 128
