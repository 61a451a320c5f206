"""The speed frontier of GPT-NeoX decoding in one process: the fp16 step against the floor, the
folded step (decoding/fused_projections.py) and weight-only int8 / fp8 / int4 (decoding/weight_quant.py)
through torchao and optimum-quanto, dense and with a press, each cell's tokens checked.

  python evaluation/speed_frontier.py --model EleutherAI/pythia-2.8b --random-init \\
      --cells plain:fp16 folded:fp16 folded:int8_torchao --press snapkv --compression_ratio 0.75

A cell is STEP:WEIGHTS. STEP: ``plain`` (decoding/neox_cuda_graphs.py's two-stream graph),
``split`` (the same with each MLP compiled in two parts, its GELU written out between the two
GEMVs: ``TwoStreamStep(split_mlp=True)``) or ``folded`` (each layer's LayerNorms folded into one
QKV + MLP-in GEMM, two-stream). WEIGHTS:
``fp16`` (the model's own), ``fp16_triton`` (the same, each Linear as matmul + bias compiled with
inductor's coordinate-descent tuning: Triton GEMVs with tuned reductions instead of cuBLAS's;
decoding/weight_quant.py's ``as_matmuls``), ``int8_torchao``, ``int8_quanto``,
``fp8_torchao``, ``fp8_quanto``, ``int4_torchao`` (bf16 tinygemm GEMVs, CUDA only).

Every cell runs dense and, with ``--press``, the press: TPOT, TTFT and the floors from
evaluation/speed.py's ``measure``, over ceilings measured once at the start (evaluation/ceilings.py),
the floor's weights at their quantized bytes; ``tpot_over_fp16_floor`` holds TPOT against the floor
of fp16 weights. ``--backend``: the decode step's attention in every cell (``split_kv``: the Triton
split-KV kernel, decoding/split_kv_attention.py); the references keep their own attention, so the
check covers it. ``--split_kv_config BLOCKxWARPSxSTAGES[xCHUNKS]``: the kernel's launch in the step
(default: its ``DEFAULT_CONFIG``), e.g. the best of evaluation/split_kv_speed.py's sweep. Greedy
tokens: the first ``--check_tokens`` of the last timed run against a reference on the same weights,
uncompiled: the kvpress loop (decoding/reference.py) for plain and split cells and for folded fp16 ones
(whose weights differ from the model's by rounding only), the folded step for folded quantized
ones (the loop has no folded matrix). Where they part, the reference's gap
between its two best logits there (near 0: a tie that rounding decides, as in
evaluation/check_decoders.py). A cell that fails (a library that does not run here, out of
memory) records its error and the next runs; past ``--time_limit_s`` the rest are recorded as
skipped. The JSON is rewritten after every cell.
"""

import copy
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from decoding import fused_projections, neox_cuda_graphs, neox_decode, weight_quant
from decoding.reference import kvpress_generate
from evaluation import cli, roofline, speed
from evaluation.ceilings import machine_ceilings
from evaluation.check_decoders import agreement, at_first_differences, margin_recording_step
from evaluation.results import table, write_json_atomic
from presses import make_press

STEPS = ("plain", "split", "folded")
# name: (weight_quant scheme, library, inductor GEMVs for fp16 weights)
WEIGHTS = {
    "fp16": ("none", None, False),
    "fp16_triton": ("none", None, True),
    "int8_torchao": ("int8", "torchao", False),
    "int8_quanto": ("int8", "quanto", False),
    "fp8_torchao": ("fp8", "torchao", False),
    "fp8_quanto": ("fp8", "quanto", False),
    "int4_torchao": ("int4", "torchao", False),  # GPU only (tinygemm)
}
COLUMNS = ["cell", "method", "tpot_ms", "tpot_floor_ms", "tpot_over_floor", "tpot_over_fp16_floor", "ttft_ms",
           "compile_s", "identical", "first_difference", "reference_margin_there", "error"]


@dataclass(frozen=True)
class Cell:
    step: str
    weights: str

    @property
    def name(self) -> str:
        return f"{self.step}:{self.weights}"

    @property
    def scheme(self) -> str:
        return WEIGHTS[self.weights][0]

    @property
    def library(self) -> str | None:
        return WEIGHTS[self.weights][1]

    @property
    def inductor_gemv(self) -> bool:
        return WEIGHTS[self.weights][2]


def parse_cell(text: str) -> Cell:
    step, _, weights = text.partition(":")
    if step not in STEPS or weights not in WEIGHTS:
        raise ValueError(f"bad cell {text!r}: STEP:WEIGHTS, STEP one of {', '.join(STEPS)}, "
                         f"WEIGHTS one of {', '.join(WEIGHTS)}")
    return Cell(step, weights)


def cell_model(model, cell: Cell):
    """The model ``cell`` decodes: a folded view, then a quantized copy (``model`` stays as it is)."""
    if cell.scheme != "none" or cell.inductor_gemv:
        model = copy.deepcopy(model)
    if cell.step == "folded":
        model = fused_projections.fold_projections(model)
    if cell.inductor_gemv:
        return weight_quant.as_matmuls(model)
    return weight_quant.quantize_weights(model, cell.scheme, cell.library or "torchao")


def cell_step(cell: Cell, compile: bool, mode: str = "two-stream"):
    """The cell's decode step (a hand-captured CUDA graph on a GPU, ``mode`` two-stream or one-stream,
    keeping its buffer; as is on a CPU)."""
    if cell.step == "folded":
        return fused_projections.compiled_step(compile)
    return neox_cuda_graphs.compiled_step(compile, mode, split_mlp=cell.step == "split")


def reference(cell: Cell, model, decoded, prompt: torch.Tensor, press, tokens: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Greedy tokens (batch, tokens) of the cell's reference (see the module docstring), the
    reference's gap between its two best logits at each step, and what the reference was."""
    margins = []
    if cell.step != "folded" or cell.scheme == "none":
        expected = kvpress_generate(decoded if cell.step != "folded" else model, prompt, press, tokens,
                                    margins=margins).tokens
        return expected, torch.stack(margins, dim=1), "the kvpress loop" + (
            ", unfolded weights" if cell.step == "folded" else ", same weights")
    step = margin_recording_step(margins, [], fused_projections.forward_logits)
    expected = neox_decode.generate(decoded, list(prompt.split(1)), press, tokens, step=step).tokens
    # the first token comes from the prefill: no gap recorded there
    first = torch.full_like(margins[0], float("nan"))
    return expected, torch.stack([first] + margins, dim=1), "the uncompiled folded step, same weights"


def measure_cell(args, model, cell: Cell, prompt: torch.Tensor, presses: list, ceilings, rows: list) -> None:
    """Append the cell's rows to ``rows``, one per press, as each is measured."""
    compile = model.device.type == "cuda"
    torch._dynamo.reset()  # compiled code is not guarded by inductor's settings: each cell compiles its own
    decoded = cell_model(model, cell)
    for name, press in presses:
        with weight_quant.compile_settings(cell.scheme, cell.inductor_gemv):
            row = speed.measure(decoded, prompt, press, args.new_tokens, args.repeats, decoder="neox",
                                backend=args.backend, ceilings=ceilings, step=cell_step(cell, compile),
                                weight_quant=cell.scheme)
        fp16_floor = roofline.decode_floors(model.config, prompt.shape[0], row["kept_tokens_per_layer"],
                                            args.new_tokens, ceilings)["tpot_floor_ms"]
        tokens = torch.tensor(row.pop("tokens"))[:, : args.check_tokens]
        expected, margins, what = reference(cell, model, decoded, prompt, press, tokens.shape[1])
        check = agreement(tokens, expected.cpu())
        check["reference_margin_there"] = at_first_differences(margins.cpu(), check["first_difference"])
        rows.append({"cell": cell.name, "step": cell.step, "weights": cell.weights, "library": cell.library,
                     "inductor_gemv": cell.inductor_gemv, "method": name, **row, "fp16_floor_ms": fp16_floor,
                     "tpot_over_fp16_floor": row["tpot_ms"] / fp16_floor, "reference": what,
                     "checked_tokens": tokens.shape[1], **check})
        print(table(rows[-1:], COLUMNS), file=sys.stderr, flush=True)


def parse_args(argv=None):
    parser = cli.Parser(__file__, __doc__)
    cli.add_model_options(parser)
    parser.add_argument("--cells", nargs="+", default=["plain:fp16", "folded:fp16"], help="STEP:WEIGHTS, see above")
    parser.add_argument("--press", help="a registry press run in every cell after dense (default: dense only)")
    parser.add_argument("--compression_ratio", type=float, default=0.75)
    parser.add_argument("--prompt_tokens", type=int, default=2000)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--backend", default="sdpa", choices=neox_decode.ATTENTION_BACKENDS,
                        help="the decode step's attention in every cell (decoding/neox_decode.py)")
    parser.add_argument("--split_kv_config", help="BLOCKxWARPSxSTAGES[xCHUNKS] of --backend split_kv")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check_tokens", type=int, default=64, help="greedy tokens checked against the reference")
    parser.add_argument("--time_limit_s", type=float, default=float("inf"),
                        help="start no cell past this many seconds (the rest are recorded as skipped)")
    parser.add_argument("--output", type=Path, default=Path("results/speed_frontier.json"))
    args = parser.parse_args(argv)
    with cli.one_line_errors(ValueError):  # a bad cell or press: one line, before the weights load
        args.parsed_cells = [parse_cell(text) for text in args.cells]
        make_press(args.press, args.compression_ratio) if args.press else None
        if args.split_kv_config:
            if args.backend != "split_kv":
                raise ValueError(f"--split_kv_config is for --backend split_kv, not {args.backend}")
            # Imported here: it needs Triton, which an sdpa run does not.
            from decoding.split_kv_attention import parse_config
            args.split_kv_config = parse_config(args.split_kv_config)
    return args


def split_kv_config(args):
    """The split_kv kernel's launch for the whole run: ``--split_kv_config`` replaces the op's
    default (read at every call), else the default stays. None for another back end."""
    if args.backend != "split_kv":
        return None
    from decoding import split_kv_attention
    if args.split_kv_config:
        split_kv_attention.DEFAULT_CONFIG = args.split_kv_config
    return split_kv_attention.DEFAULT_CONFIG


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    kernel_config = split_kv_config(args)
    with cli.one_line_errors():
        loaded = cli.load(args)
    model = loaded.model
    ceilings = machine_ceilings(model.device)  # once, before the first cell: every ratio divides by it
    prompt = speed.prompt_ids(model.config.vocab_size, args.batch_size, args.prompt_tokens, 0).to(model.device)
    presses = [("dense", None)] + ([(args.press, make_press(args.press, args.compression_ratio))] if args.press else [])
    rows = []
    for cell in args.parsed_cells:
        if time.monotonic() - started > args.time_limit_s:
            rows.append({"cell": cell.name, "error": f"skipped: past --time_limit_s {args.time_limit_s}"})
        else:
            try:
                measure_cell(args, model, cell, prompt, presses, ceilings, rows)
            except Exception as error:  # noqa: BLE001 -- one cell's failure is its result, the next cell runs
                rows.append({"cell": cell.name, "error": f"{type(error).__name__}: {error}"[:2000]})
                print(f"{cell.name}: {rows[-1]['error']}", file=sys.stderr, flush=True)
            gc.collect()
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
        write_json_atomic(args.output, cli.result_header(
            args, loaded, press=args.press, compression_ratio=args.compression_ratio if args.press else 0.0,
            batch_size=args.batch_size, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
            backend=args.backend, split_kv_config=None if kernel_config is None else str(kernel_config),
            repeats=args.repeats, ceilings=ceilings.to_json()) | {"rows": rows})
    cli.print_summary(args, loaded, rows, COLUMNS, args.output,
                      f"copy {ceilings.bandwidth / 1e12:.3f} TB/s ({ceilings.source})")


if __name__ == "__main__":
    main()
