# Issue 17 (parts 1 and 3) on nvidia-h200-x2: a sweep spread over the host's two GPUs with
# accelerate launch (one process per GPU, NCCL) against the same sweep in one process, compared;
# then one model split over both GPUs with device_map against the same model on one GPU.
#   quality:   a random-weights Pythia-410m (its exact config) saved as a local folder, fp16,
#              WikiText-2 test, 8 windows of 1536 prefilled + 512 scored tokens, dense and SnapKV /
#              PyramidKV / KnormPress / StreamingLLM at 50% and 25% kept (9 cells). Random weights:
#              the perplexities mean nothing; the check is that 2 processes give the 1-process rows
#              bit for bit.
#   speed:     random-init Pythia-1b fp16 (speed_grid.py), the kvpress and neox decoders, dense and
#              SnapKV at 50%, batch 1 and 8, prompt 1024, 64 forced new tokens (4 families of 2
#              cells). Times differ by nature and each process measures its own GPU's ceilings;
#              the cells, tokens (digest), kept tokens, KV bytes and FLOPs must be equal.
#   split:     the Pythia-410m folder with a device_map putting layers 0-11 on cuda:0 and the rest
#              on cuda:1, against it whole on cuda:0: SnapKV at 50% through kvpress's pipeline (32
#              greedy tokens) and the context protocol (2 windows): same tokens and NLL expected.
# (The streaming protocol's cells are split the same way; tests/test_sweep.py covers them on the CPU.)
# Each stage has its own time limit and the tarball is remade after each, so a call cut short
# still brings back what ran. About 4 minutes; at most 9.
# Writes $OUT/multi_gpu_sweep.tgz (every result file and log) and $OUT/compare.txt (the verdicts).
#
# Needs the tokenizer and WikiText-2 in .sweepdata (never committed); here, once:
#   mkdir -p .sweepdata && cp -r ../shared/data/{tokenizer,wikitext-2-raw-v1} .sweepdata/
# Call (kind nvidia-h200-x2, carry [".whl", ".sweepdata"]):
#   export KVPRESS_NEOX_COMMIT=<hash>; source evaluation/device/setup_env.sh && bash evaluation/device/multi_gpu_sweep.sh
set -e
# NVLink multicast stays off (the host's GPUs are shared; KINDS.md); the launched processes inherit these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-results}
work=/tmp/multi_gpu_sweep
data=$PWD/.sweepdata
mkdir -p "$work/logs"
trap 'tar czf "$out/multi_gpu_sweep.tgz" -C "$work" .' EXIT
[ -f "$data/tokenizer/tokenizer.json" ] || { echo "no $data/tokenizer/tokenizer.json: copy ../shared/data/tokenizer into .sweepdata" >&2; exit 1; }
python3 -c "import torch; assert torch.cuda.device_count() >= 2, 'needs 2 GPUs'; print(torch.cuda.device_count(), 'GPUs')"
two="python3 -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"

# stage NAME LIMIT_S COMMAND...: the command's output in logs/NAME.log; a failure or a timeout (exit 124)
# is noted and the script goes on; the tarball is remade.
stage() {
  name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$work/logs/$name.log" 2>&1 || echo "$name: exit $?" | tee -a "$out/compare.txt"
  tar czf "$out/multi_gpu_sweep.tgz" -C "$work" .
}

model=/tmp/pythia-410m-random
python3 -c "
from evaluation.models import load_model
load_model('EleutherAI/pythia-410m', random_init=True, dtype='float16', device='cuda').model.save_pretrained('$model')"

quality="--model $model --dtype float16 --data-dir $data --dataset wikitext --context_tokens 1536 --eval_tokens 512
  --num_windows 8 --press snapkv pyramidkv knorm streaming_llm --compression_ratio 0.5 0.75"
stage quality_one 100 python3 evaluation/perplexity.py $quality --output "$work/quality_one.json"
stage quality_two 100 $two evaluation/perplexity.py $quality --output "$work/quality_two.json"

speed="--model EleutherAI/pythia-1b --random-init --dtype float16 --decoder kvpress neox --press snapkv
  --compression_ratio 0.5 --batch_size 1 8 --prompt_tokens 1024 --new_tokens 64 --repeats 2"
stage speed_one 130 python3 evaluation/speed_grid.py $speed --output_dir "$work/speed_one"
stage speed_two 130 $two evaluation/speed_grid.py $speed --output_dir "$work/speed_two"

stage split 70 python3 - "$model" "$data" <<'EOF'
import json, sys
from pathlib import Path
import torch
import presses  # noqa: F401  -- the GPT-NeoX patches
from kvpress import SnapKVPress
from transformers import AutoConfig, AutoModelForCausalLM, pipeline
from evaluation.data import load_text
from evaluation.models import offline_tokenizer
from evaluation.protocols import context_nll

folder, data = sys.argv[1], Path(sys.argv[2])
tokenizer = offline_tokenizer(data)
text, _ = load_text("wikitext", data)
ids = tokenizer(text[:200_000], return_tensors="pt").input_ids[0]
layers = AutoConfig.from_pretrained(folder).num_hidden_layers
split = {"gpt_neox.embed_in": 0, "gpt_neox.emb_dropout": 0, "gpt_neox.rotary_emb": 0, "gpt_neox.final_layer_norm": 1,
         "embed_out": 1} | {f"gpt_neox.layers.{i}": int(i >= layers // 2) for i in range(layers)}
found = {}
for name, placement in (("one GPU", "cuda:0"), ("split", split)):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16, device_map=placement).eval()
    answer = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)(
        tokenizer.decode(ids[:1500]), question=" Summary:", press=SnapKVPress(0.5), max_new_tokens=32)["answer"]
    result = context_nll(model, ids, SnapKVPress(0.5), 1536, 511, num_windows=2)
    found[name] = {"devices": sorted({str(p.device) for p in model.parameters()}), "answer": answer,
                   "unit_nll": result.unit_nll}
    del model
    torch.cuda.empty_cache()
print(json.dumps(found, indent=1))
same = found["split"]["answer"] == found["one GPU"]["answer"] and found["split"]["unit_nll"] == found["one GPU"]["unit_nll"]
print("split across 2 GPUs:", "same tokens and NLL as on one GPU" if same else "DIFFERENT from one GPU",
      "| devices:", found["split"]["devices"])
EOF
tail -1 "$work/logs/split.log" | tee -a "$out/compare.txt"

python3 - "$work" <<'EOF' | tee -a "$out/compare.txt"
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
# What a speed cell must repeat on any GPU of the same kind; times, and the floors from each GPU's own ceilings, may not.
SAME = ("decoder", "decode_attention", "compile_mode", "keep_buffer", "method", "compression_ratio", "batch_size",
        "prompt_tokens", "new_tokens", "kept_tokens_per_layer", "kv_mib_after_prefill", "kv_mib_final",
        "prefill_gflops", "decode_gflops_per_token", "tokens_sha256", "tokens_shape", "error")


def rows(path):
    return json.loads(path.read_text())["rows"] if path.is_file() else None


one, two = rows(work / "quality_one.json"), rows(work / "quality_two.json")
if one is None or two is None:
    print("quality: a result file is missing")
else:  # json: NaN is never equal to itself, its text is
    print(f"quality: {len(one)} cells, 2 processes vs 1:", "rows identical" if json.dumps(one) == json.dumps(two)
          else "ROWS DIFFER")
    for a, b in zip(one, two):
        if json.dumps(a) != json.dumps(b):
            print(f"  {a['method']} {a['compression_ratio']}: ppl {a.get('ppl')} vs {b.get('ppl')}, {b.get('error')}")
one, two = rows(work / "speed_one" / "summary.json"), rows(work / "speed_two" / "summary.json")
if one is None or two is None:
    print("speed: a summary is missing")
else:
    differ = [(a["decoder"], a["method"], a["batch_size"], k) for a, b in zip(one, two) for k in SAME if a.get(k) != b.get(k)]
    print(f"speed: {len(one)} vs {len(two)} cells, 2 processes vs 1:", "same tokens, cache and FLOPs" if
          len(one) == len(two) and not differ else f"DIFFER {differ}")
    ceilings = json.loads((work / "speed_two" / "summary.json").read_text())["ceilings"]
    print("  ceilings per device:", ", ".join(f"{c['device']} {c['bandwidth'] / 1e12:.3f} TB/s" for c in ceilings))
    for a, b in zip(one, two):
        print(f"  {a['decoder']} {a['method']} batch {a['batch_size']}: TPOT {a.get('tpot_ms')} ms (1 process), "
              f"{b.get('tpot_ms')} ms (2 processes)")
EOF
