"""Tensor-parallel fast decoding against one GPU, in one call: TPOT and tokens.

  torchrun --nproc_per_node 2 evaluation/tensor_parallel.py --model EleutherAI/pythia-12b --random-init \\
      --batch_size 1 64 --press snapkv tova --press_batch_size 1 --output results/tmp/tensor_parallel.json

Started by torchrun on N ranks, one GPU each (on a CPU: gloo, uncompiled steps). Every rank builds
the model and takes rank 0's weights, so that random init gives every rank the same. Then:
1. TP1, on rank 0 alone while the others wait: each cell (batch size x method) on the whole
   model, measured by evaluation/speed.py's ``measure`` with its ``neox`` decoder (the project's
   fast path; on CUDA the two-stream CUDA graph): warm-up runs, then the median of the timed runs'
   TTFT and decode time, TPOT = decode time / (new tokens - 1); then once with the uncompiled
   step, recording the gap between its two largest logits at every step: the reference of the
   token check. A cell that fails here (a batch that does not fit one GPU) is recorded with its
   error and left out of phase 2.
2. TPN, on every rank: the model split by decoding/neox_tensor_parallel.py, the same cells measured
   the same way with its step and ``ShardedPress`` (rank 0's clock; the ranks meet at every
   layer's all-reduce). KV bytes are the rank's own; the floors, in both rows, are the whole
   model's on one GPU (over the bandwidth measured on each rank's GPU at the start).
Each row holds both timings, ``tpot_ratio`` (TPN / TP1), whether every rank decoded the same tokens
(``ranks_agree``), and the tokens compared as evaluation/check_decoders.py compares them: TP1 and
TPN each against the reference (identical or not, the first step where a row differs, the share of
equal steps, and the reference's top-two logit gap there, ``reference_margin_there``: a gap near
fp16 rounding is a tie that another order of summation may flip), and TPN against TP1 directly.
The result file is written after phase 1 and after every TPN cell, so a run cut short keeps what it
measured; a TPN cell that fails on every rank is recorded with its error. Random weights: timings only.
"""

import gc
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from decoding import neox_decode, neox_tensor_parallel
from evaluation import cli, speed
from evaluation.ceilings import machine_ceilings
from evaluation.check_decoders import agreement, at_first_differences, margin_recording_step
from evaluation.results import table, token_digest, write_json_atomic
from presses import make_press

# NVLink multicast stays off (the GPU host's rule: it can take the shared GPUs down), in this
# process and in any it starts.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def parse_args(argv=None):
    parser = cli.Parser(__file__, __doc__)
    cli.add_model_options(parser)
    parser.add_argument("--batch_size", type=int, nargs="+", default=[1])
    parser.add_argument("--press", nargs="*", default=[], help="methods besides dense (presses/registry.py names)")
    parser.add_argument("--press_batch_size", type=int, nargs="*",
                        help="the batch sizes the presses run at (default: every --batch_size); dense runs at all")
    parser.add_argument("--compression_ratio", type=float, default=0.5)
    parser.add_argument("--prompt_tokens", type=int, default=2000)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep_buffer_max_batch", type=int, default=1,
                        help="the two-stream step keeps its buffer between generations up to this batch size "
                             "(above: captured again for each generation, so that two buffers never coexist)")
    parser.add_argument("--output", type=Path, default=Path("results/tmp/tensor_parallel.json"))
    return parser.parse_args(argv)


def cells(args) -> list[tuple[int, str | None]]:
    """(batch size, method; None: dense) of every cell, in the order they run."""
    press_batches = args.batch_size if args.press_batch_size is None else args.press_batch_size
    return [(batch, name) for batch in args.batch_size
            for name in [None] + (args.press if batch in press_batches else [])]


def free_memory() -> None:
    gc.collect()  # the last cell's step, with its CUDA graph and its buffer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def one_gpu_cell(args, model, prompts, ceilings, batch: int, name: str | None) -> dict:
    """A phase-1 cell: TP1's timed runs (evaluation/speed.py's neox decoder), then the reference
    with its margins."""
    press = make_press(name, args.compression_ratio) if name else None
    run = speed.measure(model, prompts[batch], press, args.new_tokens, args.repeats, args.warmup, decoder="neox",
                        keep_buffer=batch <= args.keep_buffer_max_batch, ceilings=ceilings)
    free_memory()
    margins = []
    reference = neox_decode.generate(model, list(prompts[batch].split(1)), press, args.new_tokens,
                                     step=margin_recording_step(margins, [])).tokens.cpu()
    # (batch, steps); the first token comes from the prefill, whose margin is not recorded
    margins = torch.stack([torch.full_like(margins[0], float("nan"))] + margins, dim=1).cpu()
    return {"method": name or "dense", "batch_size": batch, "tp1": run, "reference": reference,
            "reference_margins": margins}


def one_gpu_cells(args, model, prompts, ceilings) -> list[dict]:
    """Phase 1 (see the module docstring), on rank 0."""
    rows = []
    for batch, name in cells(args):
        try:
            rows.append(one_gpu_cell(args, model, prompts, ceilings, batch, name))
        except Exception as error:  # out of memory, say: recorded (rank 0 alone here: no rank waits on it)
            traceback.print_exc()
            rows.append({"method": name or "dense", "batch_size": batch,
                         "tp1": {"error": f"{type(error).__name__}: {error}"}})
        free_memory()
        tp1 = rows[-1]["tp1"]
        outcome = tp1["error"] if "error" in tp1 else f"TPOT {tp1['tpot_ms']:.3f} ms"
        print(f"TP1 {name or 'dense'} batch {batch}: {outcome}", file=sys.stderr, flush=True)
    return rows


def tensor_parallel_run(args, model, prompts, ceilings, group, waiting, batch: int, name: str | None) -> dict:
    """A phase-2 cell on every rank: the timed runs, and whether every rank decoded the same tokens."""
    press = make_press(name, args.compression_ratio) if name else None
    keep_buffer = batch <= args.keep_buffer_max_batch
    step = neox_tensor_parallel.tensor_parallel_step(group, model.device.type == "cuda", keep_buffer)
    run = speed.measure(model, prompts[batch], neox_tensor_parallel.ShardedPress(press, group), args.new_tokens,
                        args.repeats, args.warmup, decoder="neox", keep_buffer=keep_buffer, ceilings=ceilings,
                        step=step)
    del step
    free_memory()
    every_rank = [None] * dist.get_world_size(group)
    dist.all_gather_object(every_rank, run["tokens"], group=waiting)
    return run | {"ranks_agree": all(tokens == run["tokens"] for tokens in every_rank)}


def with_tensor_parallel(row: dict, run: dict, world_size: int) -> None:
    """Add a cell's TPN run (or its error) to its TP1 row, with the ratio and the token comparisons."""
    tpn = f"tp{world_size}"
    row[tpn] = run
    if "error" in run:
        print(f"TP{world_size} {row['method']} batch {row['batch_size']}: {run['error']}", file=sys.stderr, flush=True)
        return
    row["tpot_ratio"] = run["tpot_ms"] / row["tp1"]["tpot_ms"]
    tp1_tokens, tpn_tokens = torch.tensor(row["tp1"]["tokens"]), torch.tensor(run["tokens"])
    row["tp1_vs_reference"] = compared(tp1_tokens, row["reference"], row["reference_margins"])
    row[f"{tpn}_vs_reference"] = compared(tpn_tokens, row["reference"], row["reference_margins"])
    row[f"{tpn}_vs_tp1"] = agreement(tpn_tokens, tp1_tokens)
    print(f"TP{world_size} {row['method']} batch {row['batch_size']}: TPOT {run['tpot_ms']:.3f} ms "
          f"({row['tpot_ratio']:.3f} x TP1), tokens identical to TP1: {row[f'{tpn}_vs_tp1']['identical']}",
          file=sys.stderr, flush=True)


def compared(tokens: torch.Tensor, reference: torch.Tensor, margins: torch.Tensor) -> dict:
    row = agreement(tokens, reference)
    return row | {"reference_margin_there": at_first_differences(margins, row["first_difference"])}


def stored(row: dict) -> dict:
    """A row as the result file keeps it: token ids as digests (random weights: their values mean
    nothing; equal digests show equal tokens), the margins left out."""
    kept = {}
    for key, value in row.items():
        if key == "reference":
            kept["reference_tokens"] = token_digest(value.tolist())
        elif isinstance(value, dict) and "tokens" in value:
            kept[key] = {k: v for k, v in value.items() if k != "tokens"} | token_digest(value["tokens"])
        elif key != "reference_margins":
            kept[key] = value
    return kept


def start_process_group(device: str):
    """The process group torchrun describes (NCCL on CUDA, each rank on its own GPU; gloo on a
    CPU), and a gloo group, for waiting without holding a GPU busy and for exchanging results."""
    if device.startswith("cuda"):
        for name, value in MULTICAST_OFF.items():
            if os.environ.setdefault(name, value) != value:
                cli.fail(f"{name}={os.environ[name]}: NVLink multicast must stay off on this host ({name}={value})")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    return dist.group.WORLD, dist.new_group(backend="gloo")


def run(args) -> None:
    group, waiting = start_process_group(args.device)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    loaded = cli.load(args)
    model = loaded.model
    with cli.one_line_errors(ValueError):  # before anything is measured
        neox_tensor_parallel.check_shardable(model.config, world_size)
        for name in args.press:
            make_press(name, args.compression_ratio)
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0, group=group)
    prompts = {batch: speed.prompt_ids(model.config.vocab_size, batch, args.prompt_tokens, 0).to(model.device)
               for batch in args.batch_size}
    ceilings = machine_ceilings(model.device)  # this rank's GPU, before any cell
    cuda = model.device.type == "cuda"
    header = cli.result_header(
        args, loaded, world_size=world_size, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
        compression_ratio=args.compression_ratio, warmup=args.warmup, repeats=args.repeats,
        keep_buffer_max_batch=args.keep_buffer_max_batch, step="two-stream CUDA graph" if cuda else "uncompiled",
        nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        multicast_settings={name: os.environ.get(name) for name in MULTICAST_OFF})

    def write():
        write_json_atomic(args.output, header | {"rows": [stored(row) for row in rows]})

    rows = one_gpu_cells(args, model, prompts, ceilings) if rank == 0 else None
    if rank == 0:
        write()
    # The others wait here, on the CPU, while rank 0 runs phase 1; then learn which cells fitted.
    fitted = [None if rows is None else [index for index, row in enumerate(rows) if "error" not in row["tp1"]]]
    dist.broadcast_object_list(fitted, src=0, group=waiting)
    torch._dynamo.reset()  # the split model compiles afresh (static shapes, as in phase 1)
    neox_tensor_parallel.shard(model, group)
    free_memory()
    for index in fitted[0]:
        batch, name = cells(args)[index]
        try:
            measured = tensor_parallel_run(args, model, prompts, ceilings, group, waiting, batch, name)
        except Exception as error:  # recorded, the next cells tried: every rank fails alike or the run times out
            traceback.print_exc()
            measured = {"error": f"{type(error).__name__}: {error}"}
        if rank == 0:
            with_tensor_parallel(rows[index], measured, world_size)
            write()
    if rank == 0:
        tpn = f"tp{world_size}"
        print(table([{"method": row["method"], "batch_size": row["batch_size"],
                      "tp1_tpot_ms": row["tp1"].get("tpot_ms"), f"{tpn}_tpot_ms": row.get(tpn, {}).get("tpot_ms"),
                      "tpot_ratio": row.get("tpot_ratio"),
                      "identical_to_tp1": row.get(f"{tpn}_vs_tp1", {}).get("identical"),
                      "first_difference": row.get(f"{tpn}_vs_tp1", {}).get("first_difference")} for row in rows],
                    ["method", "batch_size", "tp1_tpot_ms", f"{tpn}_tpot_ms", "tpot_ratio", "identical_to_tp1",
                     "first_difference"]))
        print(f"\nwrote {args.output}")
    dist.destroy_process_group()


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
