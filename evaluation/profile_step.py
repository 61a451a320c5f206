"""Where a decode step's time goes: the GPU kernels of the GPT-NeoX step (decoding/neox_decode.py).

  python evaluation/profile_step.py --model EleutherAI/pythia-2.8b --random-init --prompt_tokens 2000
  python evaluation/profile_step.py --random-init --compile_mode two-stream --cell folded:int8_torchao

The step is compiled without CUDA graphs (so the profiler sees each kernel), run ``--steps``
times under torch.profiler after warm-up, and the kernels are summed by name: total GPU time
per step, the share of each kernel, and how many launches a step makes. Then the same step is
compiled into a CUDA graph (``--compile_mode``: whole, or the hand-captured graph on two streams
or one) and ``--graph_steps`` replays are timed: what a decode step costs in generation. With
``two-stream`` or ``one-stream`` the profiled kernels are that step's own, launched without its graph;
otherwise those of the step compiled whole. ``--cell``: the step and weights
(evaluation/speed_frontier.py's STEP:WEIGHTS: the folded step, quantized weights).

The kernels are also grouped by what their names say they are (``kernel_category``: cuBLAS /
CUTLASS matmuls and Triton kernels of an ``mm``, attention, the rest), each group against the
bytes its operators read (evaluation/roofline.py: the weights for the matmuls, the KV cache for
attention) over the copy bandwidth measured after the timing: its time over that floor, and the
bandwidth it reached. The result is printed and written as JSON (``--output``). Launch overhead
is what CUDA graphs remove; the kernel time is what remains, to hold against the roofline floor.
"""

from pathlib import Path

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

from decoding import fused_projections, neox_cuda_graphs, neox_decode, weight_quant
from evaluation import cli, roofline, speed_frontier
from evaluation.ceilings import machine_ceilings
from evaluation.results import write_json_atomic
from evaluation.speed import prompt_ids
from presses import make_press

# kernel name fragments (lower case) by group; a Triton kernel of an mm (inductor names its kernels
# after the aten ops they fuse: mm, addmm) is a matmul too
ATTENTION_NAMES = ("fmha", "flash", "attention", "attn", "cudnn", "sdpa", "flex")
MATMUL_NAMES = ("gemv", "gemm", "cutlass", "xmma", "nvjet", "splitk", "cublas")
MATMUL_OPERATORS = ("qkv_proj", "out_proj", "mlp_up", "mlp_down", "lm_head")


def kernel_table(events, steps: int) -> pd.DataFrame:
    rows = [{"kernel": e.key, "launches_per_step": e.count / steps, "us_per_step": e.device_time_total / steps}
            for e in events if e.device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
    frame = pd.DataFrame(rows).sort_values("us_per_step", ascending=False)
    frame["share"] = frame.us_per_step / frame.us_per_step.sum()
    frame["category"] = frame.kernel.map(kernel_category)
    return frame


def kernel_category(name: str) -> str:
    """``matmul``, ``attention`` or ``other``, by the kernel's name (see the module docstring)."""
    lower = name.lower()
    if any(part in lower for part in ATTENTION_NAMES):
        return "attention"
    if any(part in lower for part in MATMUL_NAMES):
        return "matmul"
    if lower.startswith("triton") and any(part.endswith("mm") for part in lower.split("_")):
        return "matmul"
    return "other"


def category_table(frame: pd.DataFrame, operators: list, bandwidth: float) -> list[dict]:
    """Per kernel group: launches and GPU time per step; for matmuls and attention, the bytes of
    their operators, the time those bytes take at ``bandwidth`` (their floor), the time over it
    and the bandwidth reached."""
    read = {"matmul": sum(op.bytes for op in operators if op.name in MATMUL_OPERATORS),
            "attention": sum(op.bytes for op in operators if op.name == "attention")}
    rows = []
    for category, group in frame.groupby("category"):
        us = float(group.us_per_step.sum())
        row = {"category": category, "kernels": len(group), "launches_per_step": float(group.launches_per_step.sum()),
               "us_per_step": us, "share": float(group.share.sum())}
        if category in read:
            floor_us = 1e6 * read[category] / bandwidth
            row |= {"bytes": read[category], "floor_us": floor_us, "over_floor": us / floor_us,
                    "tb_per_s": read[category] / us / 1e6}
        rows.append(row)
    return rows


def steps_for(cell: speed_frontier.Cell, compile_mode: str):
    """(the step whose kernels are profiled, the step timed as a CUDA graph) for ``cell``."""
    if compile_mode in neox_cuda_graphs.HAND_CAPTURED:
        graph_step = speed_frontier.cell_step(cell, True, compile_mode)
        return graph_step.uncaptured, graph_step
    # no CUDA graphs for the profiled one: the profiler sees kernels
    return neox_cuda_graphs.compiled_step(True, "default"), neox_cuda_graphs.compiled_step(True, compile_mode)


def main(argv=None) -> None:
    parser = cli.Parser(__file__, __doc__)
    cli.add_model_options(parser, default_device="cuda")
    parser.add_argument("--press", help="a registry press applied at prefill (default: dense)")
    parser.add_argument("--compression_ratio", type=float, default=0.5)
    parser.add_argument("--prompt_tokens", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--prefill_batch", type=int,
                        help="prefill in micro-batches of this many sequences (default: at once; large batches)")
    parser.add_argument("--backend", default="sdpa", choices=neox_decode.ATTENTION_BACKENDS)
    parser.add_argument("--compile_mode", default="reduce-overhead", choices=neox_cuda_graphs.COMPILE_MODES,
                        help="how the timed CUDA-graph step is compiled (the profiled kernels: the hand-captured "
                             "step's own (two-stream, one-stream), else the step compiled whole)")
    parser.add_argument("--cell", default="plain:fp16", help="STEP:WEIGHTS (evaluation/speed_frontier.py)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--graph_steps", type=int, default=100)
    parser.add_argument("--output", type=Path, default=Path("results/profile_step.json"))
    args = parser.parse_args(argv)
    if not (args.device.startswith("cuda") and torch.cuda.is_available()):
        cli.fail("profiling kernels needs a CUDA device")
    with cli.one_line_errors(ValueError):  # an unknown press, cell or model: one line, before the weights load
        press = make_press(args.press, args.compression_ratio) if args.press else None
        cell = speed_frontier.parse_cell(args.cell)
        if cell.step == "folded" and args.compile_mode != "two-stream":
            raise ValueError("the folded step is compiled as a two-stream graph: --compile_mode two-stream")
        loaded = cli.load(args)
    model = speed_frontier.cell_model(loaded.model, cell)
    torch.cuda.set_device(model.device)  # "cuda" below (tensors, events, ceilings) is the model's GPU
    prompts = list(prompt_ids(model.config.vocab_size, args.batch_size, args.prompt_tokens, 0).cuda().split(1))
    _, groups = neox_decode.prefill(model, prompts, press, args.prefill_batch)
    buffer = neox_decode.load_buffer(groups, 8 + args.steps + 8 + args.graph_steps)
    token = torch.full((args.batch_size, 1), 2, device="cuda")
    position = torch.full((args.batch_size, 1), args.prompt_tokens, device="cuda")

    def run(step, index: int):
        new_index = torch.full((1,), index, device="cuda")
        return step(model, neox_decode.StepState(buffer, token, position + index, new_index, backend=args.backend))

    kernels_step, graph_step = steps_for(cell, args.compile_mode)
    with torch.no_grad(), weight_quant.compile_settings(cell.scheme, cell.inductor_gemv):
        for index in range(4):  # compile and warm up
            run(kernels_step, index)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            for index in range(4, 4 + args.steps):
                run(kernels_step, index)
            torch.cuda.synchronize()
        first = 4 + args.steps
        for index in range(first, first + 4):  # compile and record the graph
            run(graph_step, index)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for index in range(first + 4, first + 4 + args.graph_steps):
            run(graph_step, index)
        end.record()
        torch.cuda.synchronize()
    graph_ms = start.elapsed_time(end) / args.graph_steps
    frame = kernel_table(profiler.key_averages(), args.steps)
    measured = machine_ceilings("cuda")  # the GPU that ran (evaluation/ceilings.py), measured after the timing
    cache = [int(kept) + 8 for kept in buffer.kept.tolist()]  # every layer's own length
    floor = roofline.step_floor_ms(model.config, args.batch_size, 1, cache, measured, weight_quant=cell.scheme)
    categories = category_table(frame, roofline.operators(model.config, args.batch_size, 1, cache,
                                                          weight_quant=cell.scheme), measured.bandwidth)
    total_ms = frame.us_per_step.sum() / 1e3
    print(frame.head(25).to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    print(pd.DataFrame(categories).to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    print(f"kernel time per step {total_ms:.3f} ms over {frame.launches_per_step.sum():.0f} launches; "
          f"CUDA-graph step {graph_ms:.3f} ms; roofline floor {floor:.3f} ms "
          f"(kernels {total_ms / floor:.2f}x, graph step {graph_ms / floor:.2f}x)")
    write_json_atomic(args.output, cli.result_header(
        args, loaded, press=args.press, compression_ratio=args.compression_ratio if args.press else 0.0,
        batch_size=args.batch_size, prompt_tokens=args.prompt_tokens, backend=args.backend,
        compile_mode=args.compile_mode, cell=cell.name, weight_quant=cell.scheme,
        weight_quant_library=cell.library, kernel_ms_per_step=total_ms,
        launches_per_step=frame.launches_per_step.sum(), graph_step_ms=graph_ms, graph_steps=args.graph_steps,
        floor_ms=floor, ceilings=measured.to_json(),
        # set by TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1, or for the cell (weight_quant.compile_settings)
        coordinate_descent_tuning=bool(torch._inductor.config.coordinate_descent_tuning or cell.scheme != "none"
                                       or cell.inductor_gemv),
    ) | {"categories": categories, "kernels": frame.to_dict("records")})

if __name__ == "__main__":
    main()
