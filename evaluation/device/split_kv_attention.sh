# Issue 16 item 1 on the H200: the split-KV decode attention (decoding/split_kv_attention.py, Triton)
# against SDPA, random-init Pythia-2.8B fp16, in one device call of about 5 minutes (a budget of 6):
#   export KVPRESS_NEOX_COMMIT=<commit>; source evaluation/device/setup_env.sh && bash evaluation/device/split_kv_attention.sh
# Needs only the .whl/ of setup_env.sh (Triton comes with the machine's CUDA torch).
#   kernels:        evaluation/split_kv_speed.py: one layer's attention, SDPA (as the step calls it) and
#                   split_kv over its sweep of launch configurations (block x warps x stages x chunks),
#                   batch 1 over 2000 and 8000 tokens and batch 64 over 2000, against its bytes over the
#                   copy bandwidth of the process; "best" names the fastest configuration per shape
#   frontier_sdpa, frontier_split_kv:
#                   evaluation/speed_frontier.py, the plain two-stream step (plain:fp16), dense, prompt
#                   2000, 256 forced new tokens, --backend sdpa, then split_kv at the sweep's best
#                   configuration for batch 1 over 2000 tokens (the step's shape but for its 256 new
#                   slots; the kernel's default where the sweep named none); each process measures the
#                   copy bandwidth at its start and checks its first 128 greedy tokens against the
#                   kvpress loop (rows' "identical"); compared.json puts the two side by side
# Every stage under its own time limit and a shared budget (a stage cut short or failing loses itself,
# not the rest), its stderr kept as log.txt beside its JSON, everything under $OUT/split_kv_attention/.
# No profile stage: evaluation/profile_step.py runs the kernel's default configuration, not the best.
set -u
out=${OUT:-results/tmp}/split_kv_attention
mkdir -p "$out"
common="--model EleutherAI/pythia-2.8b --random-init --dtype float16 --prompt_tokens 2000"
budget=${SPLIT_KV_BUDGET_S:-360}  # seconds for all stages, the environment's setup not counted
stage_root=$out
source evaluation/device/budget_stages.sh
python3 -c "import triton; print('triton', triton.__version__)" >&2 || echo "== no triton: split_kv will fail" >&2
# The sweep stops measuring at 130 s (the step's shape comes first), leaving time to write its JSON.
stage 160 kernels evaluation/split_kv_speed.py --time_limit_s 130 --output "$out/kernels/kernels.json"
best=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['best']['1x32x80x2000']['config'])" \
  "$out/kernels/kernels.json" 2>/dev/null)
if [[ -n $best ]]; then
  config_option="--split_kv_config $best"
  echo "== split_kv in the step at the sweep's best for 1x32x80x2000: $best" >&2
else
  config_option=""
  echo "== the sweep named no best for 1x32x80x2000: split_kv in the step at the kernel's default" >&2
fi
stage 100 frontier_sdpa evaluation/speed_frontier.py $common --new_tokens 256 --repeats 3 --check_tokens 128 \
  --cells plain:fp16 --backend sdpa --output "$out/frontier_sdpa/frontier.json"
stage 100 frontier_split_kv evaluation/speed_frontier.py $common --new_tokens 256 --repeats 3 --check_tokens 128 \
  --cells plain:fp16 --backend split_kv $config_option --output "$out/frontier_split_kv/frontier.json"
# Both back ends check against the same reference (the kvpress loop, same weights and prompt): both
# identical means split_kv's tokens are sdpa's.
python3 - "$out" <<'PYTHON' || echo "== the comparison failed" >&2
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
keys = ("tpot_ms", "tpot_floor_ms", "tpot_over_floor", "checked_tokens", "identical", "first_difference",
        "reference_margin_there", "copy_tb_per_s", "error")
compared = {}
for backend in ("sdpa", "split_kv"):
    path = out / f"frontier_{backend}" / "frontier.json"
    result = json.loads(path.read_text()) if path.exists() else {"rows": []}
    for row in result["rows"]:
        compared.setdefault(str(row.get("method")), {})[backend] = {key: row.get(key) for key in keys} | {
            "split_kv_config": result.get("split_kv_config")}
for pair in compared.values():
    if pair.get("sdpa", {}).get("tpot_ms") and pair.get("split_kv", {}).get("tpot_ms"):
        pair["split_kv_over_sdpa_tpot"] = pair["split_kv"]["tpot_ms"] / pair["sdpa"]["tpot_ms"]
        pair["both_identical_to_the_reference"] = bool(pair["sdpa"]["identical"] and pair["split_kv"]["identical"])
kernels = out / "kernels" / "kernels.json"
compared["kernel_best"] = json.loads(kernels.read_text()).get("best") if kernels.exists() else None
(out / "compared.json").write_text(json.dumps(compared, indent=1))
print(json.dumps(compared, indent=1), file=sys.stderr)
PYTHON
echo "== done at $((SECONDS - start))s" >&2
