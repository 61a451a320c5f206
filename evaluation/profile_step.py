"""Where a decode step's time goes: the GPU kernels of the plain GPT-NeoX step (decoding/neox_decode.py).

  python evaluation/profile_step.py --model EleutherAI/pythia-2.8b --random-init --prompt_tokens 2000

The step is compiled without CUDA graphs (so the profiler sees each kernel), run ``--steps``
times under torch.profiler after warm-up, and the kernels are summed by name: total GPU time
per step, the share of each kernel, and how many launches a step makes. Then the same step is
compiled into a CUDA graph (``--compile_mode``: whole, or the two-stream graph) and
``--graph_steps`` replays are timed: what a decode step costs in generation. The result is
printed and written as JSON (``--output``). Launch overhead is what CUDA graphs remove; the
kernel time is what remains, to hold against the roofline floor.
"""

from pathlib import Path

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

from decoding import neox_cuda_graphs, neox_decode
from evaluation import cli, roofline
from evaluation.ceilings import machine_ceilings
from evaluation.results import write_json_atomic
from evaluation.speed import prompt_ids
from presses import make_press


def kernel_table(events, steps: int) -> pd.DataFrame:
    rows = [{"kernel": e.key, "launches_per_step": e.count / steps, "us_per_step": e.device_time_total / steps}
            for e in events if e.device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
    frame = pd.DataFrame(rows).sort_values("us_per_step", ascending=False)
    frame["share"] = frame.us_per_step / frame.us_per_step.sum()
    return frame


def main(argv=None) -> None:
    parser = cli.Parser(__file__, __doc__)
    cli.add_model_options(parser, default_device="cuda")
    parser.add_argument("--press", help="a registry press applied at prefill (default: dense)")
    parser.add_argument("--compression_ratio", type=float, default=0.5)
    parser.add_argument("--prompt_tokens", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--backend", default="sdpa", choices=neox_decode.ATTENTION_BACKENDS)
    parser.add_argument("--compile_mode", default="reduce-overhead", choices=neox_cuda_graphs.COMPILE_MODES,
                        help="how the timed CUDA-graph step is compiled (the profiled kernels: always whole)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--graph_steps", type=int, default=100)
    parser.add_argument("--output", type=Path, default=Path("results/profile_step.json"))
    args = parser.parse_args(argv)
    if not (args.device.startswith("cuda") and torch.cuda.is_available()):
        cli.fail("profiling kernels needs a CUDA device")
    with cli.one_line_errors():  # an unknown press or model: one line, before the weights load
        press = make_press(args.press, args.compression_ratio) if args.press else None
        loaded = cli.load(args)
    model = loaded.model
    torch.cuda.set_device(model.device)  # "cuda" below (tensors, events, ceilings) is the model's GPU
    prompts = list(prompt_ids(model.config.vocab_size, args.batch_size, args.prompt_tokens, 0).cuda().split(1))
    _, groups = neox_decode.prefill(model, prompts, press)
    buffer = neox_decode.load_buffer(groups, 8 + args.steps + 8 + args.graph_steps)
    token = torch.full((args.batch_size, 1), 2, device="cuda")
    position = torch.full((args.batch_size, 1), args.prompt_tokens, device="cuda")

    def run(step, index: int):
        new_index = torch.full((1,), index, device="cuda")
        return step(model, neox_decode.StepState(buffer, token, position + index, new_index, backend=args.backend))

    kernels_step = neox_cuda_graphs.compiled_step(True, "default")  # no CUDA graphs: the profiler sees kernels
    graph_step = neox_cuda_graphs.compiled_step(True, args.compile_mode)
    with torch.no_grad():
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
    floor = roofline.step_floor_ms(model.config, args.batch_size, 1, cache, measured)
    total_ms = frame.us_per_step.sum() / 1e3
    print(frame.head(25).to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    print(f"kernel time per step {total_ms:.3f} ms over {frame.launches_per_step.sum():.0f} launches; "
          f"CUDA-graph step {graph_ms:.3f} ms; roofline floor {floor:.3f} ms "
          f"(kernels {total_ms / floor:.2f}x, graph step {graph_ms / floor:.2f}x)")
    write_json_atomic(args.output, cli.result_header(
        args, loaded, press=args.press, compression_ratio=args.compression_ratio if args.press else 0.0,
        batch_size=args.batch_size, prompt_tokens=args.prompt_tokens, backend=args.backend,
        compile_mode=args.compile_mode, kernel_ms_per_step=total_ms,
        launches_per_step=frame.launches_per_step.sum(), graph_step_ms=graph_ms, graph_steps=args.graph_steps,
        floor_ms=floor, ceilings=measured.to_json(),
        # set by TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1
        coordinate_descent_tuning=torch._inductor.config.coordinate_descent_tuning,
    ) | {"kernels": frame.to_dict("records")})

if __name__ == "__main__":
    main()
