"""Speed as one call: TTFT, TPOT, throughput, peak memory, KV bytes and FLOPs of decoder x method
x batch size x prompt length x new tokens, always with the dense baseline measured in the same
run. This is the project's one speed command line (perplexity: evaluation/perplexity.py).

Examples that run offline (the exact Pythia configs of configs/models/, random weights):
  python evaluation/speed_grid.py --model EleutherAI/pythia-70m --random-init --decoder kvpress \\
      --press snapkv --compression_ratio 0.5 --prompt_tokens 512 --new_tokens 32 --output_dir results/tmp/speed
  python evaluation/speed_grid.py --model EleutherAI/pythia-2.8b --random-init \\
      --decoder hf_eager hf_static kvpress neox --press snapkv --compression_ratio 0.5 0.75 \\
      --batch_size 1 8 --prompt_tokens 2000 --new_tokens 256 --output_dir results/tmp/grid
With real weights (the hub, a local folder, or smollm2-135m) the prompts are the text's first tokens
(--dataset); with --random-init they are random token ids, which give the same work.

Every cell is measured by ``evaluation/speed.py`` (warm-up, median of repeats) and written to its
own JSON file as soon as it is done, so a grid cut short keeps what it measured. At the end:
``summary.json`` (all cells), ``summary.md`` (the table, with TPOT against the roofline floor of
``evaluation/roofline.py`` and the speed-up against the first decoder's dense cell of the same
shape), ``tpot.png`` and ``throughput.png`` (against batch size) and ``tpot_smallest_batch.png``
(every cell of the smallest batch as a bar, the floor marked). The Hugging Face baselines (``hf_*``) are dense only.
The floor: weights and KV at every layer's own mean cache length, over the bandwidth and matmul
rate measured on the GPU that runs at the grid's start (evaluation/ceilings.py: a device-to-device
copy, the one ratios use; a weight-sized GEMV, a second floor; the datasheet's, a third column).
The measurement is in the header of every file and its figures in every row; ``--bandwidth``
(with ``--peak_tflops``) gives them instead, measuring nothing. Each cell also reports what its
first call cost (``first_call_s``, ``compile_s``: evaluation/speed.py's ``measure``).
Once a (decoder, method, ratio, prompt, new tokens) runs out of GPU memory at some batch size,
its larger batch sizes are recorded as out of memory without trying: the largest batch that fits
is the last one measured. ``--batch_size max`` searches for it instead (evaluation/grid.py's
``largest_batch``): from an estimate of what the free memory holds (or ``--max_batch_start``) up or
down until one batch fits and another does not, then bisection to ``--max_batch_step``; every tried
batch is a row (the ones out of memory with their error and ``oom_detail``: what could not be
allocated, where), the largest that fit marked ``largest_fit``. ``--prefill_batch N``: the neox
decoder prefills N sequences at a time (large batches: the prefill's activations, not the KV
cache, are then what is left to fit). ``--kv_bits 8x4``: the neox decoder's KV buffer quantized (keys
8-bit, values 4-bit) for every cell of the call, its bytes in the floors; cell file names do not say
so, so time it against fp16 in another --output_dir (a --merge of both does not tell them apart in the
speed-ups or plots). Errors in the arguments exit with code 2 and one line, writing no file.

Over the GPUs of a host (evaluation/sweep.py): ``accelerate launch --num_processes N
evaluation/speed_grid.py ...`` gives each process whole families of cells (one method's batch
sizes); the main process writes the summary once all are done (every process's ceilings in its
header), and a rerun of the same command measures only the cells it has no result for.
"""

import argparse
import sys
from pathlib import Path

from decoding import registry
from decoding.neox_cuda_graphs import COMPILE_MODES, PREFIX_BUCKET
from decoding.neox_decode import ATTENTION_BACKENDS, check_kv_bits
from decoding.registry import DECODER_NAMES
from evaluation import cli, sweep
from evaluation.grid import (MAX_BATCH, RANDOM_PROMPT, batch_size_arg, cell_name, cells, families, measure_cells,
                             measured, merge, merged_header, run_ceilings)
from evaluation.grid_summary import summarize
from evaluation.methods import press_settings
from evaluation.models import TokenizedText, check_attn_implementation, data_dir, tokenized_text
from evaluation.protocols import ProtocolError
from presses import PressConfigError, make_press
from presses.registry import check_compression_ratio


def kv_bits_arg(text: str) -> tuple[int, int]:
    """A --kv_bits value: KEYxVALUE, e.g. 8x4, each bits the quantized-KV kernel reads."""
    try:
        key_bits, value_bits = map(int, text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"KEYxVALUE bits, e.g. 8x4, not {text!r}") from None
    try:
        check_kv_bits((key_bits, value_bits))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return key_bits, value_bits


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.Parser(__file__, __doc__)
    model = cli.add_model_options(parser, attention=cli.ATTENTION)
    model.add_argument("--seed", type=int, default=0, help="of the random prompts and random calibration ids")
    cli.add_data_options(parser, what="prompt text when the weights are real")
    parser.add_argument("--decoder", nargs="+", default=["hf_eager", "hf_static", "kvpress", "neox"], choices=DECODER_NAMES,
                        help=registry.help_text())
    parser.add_argument("--decode_attention", nargs="+", default=["sdpa"], choices=ATTENTION_BACKENDS,
                        help="attention back ends of the neox decoder, its prefill included (one cell each)")
    parser.add_argument("--compile_mode", default="two-stream", choices=COMPILE_MODES,
                        help="how the neox decoder's step is compiled: two-stream (the MLP beside the attention "
                             "in one graph), one-stream (the same graph, the MLP after the attention), or whole, "
                             "by torch.compile's mode (all capture CUDA graphs)")
    parser.add_argument("--keep_buffer", action=argparse.BooleanOptionalAction, default=True,
                        help="two-stream and one-stream: keep the KV buffer (and so the graph) from one generation to the next "
                             "of the same shape; --no-keep_buffer where the next prefill needs that memory")
    parser.add_argument("--prefix_bucket", type=int, default=PREFIX_BUCKET,
                        help="two-stream: one CUDA graph per this many new slots, each reading the buffer only up "
                             "to its bucket's end (decoding/neox_cuda_graphs.py); 0: one graph over the whole buffer")
    cli.add_kv_quant(parser, "the kvpress decoder only")
    parser.add_argument("--kv_bits", type=kv_bits_arg,
                        help="neox decoder: its KV buffer quantized per (token, head), KEYxVALUE bits, 8 or 4 each "
                             "(8x8, 4x4, 8x4), read by the quantized-KV kernel (decode attention then ignores "
                             "--decode_attention, which still picks the prefill's); every cell of the call")
    press = parser.add_argument_group("press")
    press.add_argument("--press", nargs="*", default=["snapkv"], help="methods beside dense (registry names)")
    press.add_argument("--compression_ratio", type=float, nargs="+", default=[0.5, 0.75])
    cli.add_press_settings(press)
    parser.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                        help="a dense cell beside the presses (--no-dense: the presses alone, e.g. at batch sizes "
                             "where dense does not fit)")
    parser.add_argument("--batch_size", type=batch_size_arg, nargs="+", default=[1],
                        help="batch sizes, or max: search for the largest that fits (--max_batch_*)")
    search = parser.add_argument_group("largest batch (--batch_size max)")
    search.add_argument("--max_batch_start", type=int,
                        help="first batch tried (default: on a GPU the estimate of evaluation/grid.py's "
                             "estimated_largest_batch from the free memory, rounded up to the step; else the step)")
    search.add_argument("--max_batch_step", type=int, default=8,
                        help="resolution: the search ends when a batch that fits and one that does not are this close")
    search.add_argument("--max_batch_tries", type=int, help="at most this many batches tried per method")
    search.add_argument("--max_batch_time_s", type=float,
                        help="no new batch tried once the search of a method has run this long")
    parser.add_argument("--prefill_batch", type=int,
                        help="neox decoder: prefill in micro-batches of this many sequences (default: the whole "
                             "batch at once); bounds the prefill's activations at large batches")
    parser.add_argument("--prompt_tokens", type=int, nargs="+", default=[2000])
    parser.add_argument("--new_tokens", type=int, nargs="+", default=[256], help="forced generation length (no early EOS)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median), after one warm-up")
    parser.add_argument("--bandwidth", type=float,
                        help="TB/s the floors divide by, instead of measuring it (needs --peak_tflops)")
    parser.add_argument("--gemv_bandwidth", type=float, help="with --bandwidth: TB/s of the second (GEMV) floor")
    parser.add_argument("--peak_tflops", type=float, help="with --bandwidth: the matmul rate, TFLOP/s")
    parser.add_argument("--baseline", help="decoder whose dense cells the speed-ups divide (default: the first)")
    parser.add_argument("--merge", type=Path, nargs="+",
                        help="measure nothing: merge the cell files under these folders (several calls' parts) "
                             "into one summary in --output_dir")
    parser.add_argument("--output_dir", type=Path, required=True)
    return parser.parse_args(argv)


def check_args(args) -> None:
    """What can be checked before anything loads: names, ratios, counts and options that go together."""
    for name in args.press:
        make_press(name, 0.0, press_settings(args))  # unknown names and impossible settings fail here
    for ratio in args.compression_ratio:
        check_compression_ratio(ratio)
    if min(args.new_tokens) < 2:
        raise PressConfigError("--new_tokens must be at least 2 to time decode steps")
    if MAX_BATCH in args.batch_size and len(args.batch_size) > 1:
        raise PressConfigError("--batch_size max searches for the largest batch: give it alone")
    if MAX_BATCH in args.batch_size and args.merge:
        raise PressConfigError("--batch_size max measures: not with --merge")
    numbers = {"prompt_tokens": args.prompt_tokens, "batch_size": [b for b in args.batch_size if b != MAX_BATCH]}
    numbers |= {option: [getattr(args, option)] for option in ("max_batch_start", "max_batch_step", "max_batch_tries",
                                                                "prefill_batch") if getattr(args, option) is not None}
    for option, values in numbers.items():
        if values and min(values) < 1:
            raise PressConfigError(f"--{option} must be at least 1, got {min(values)}")
    if args.prefill_batch is not None and "neox" not in args.decoder:
        raise PressConfigError("--prefill_batch is the neox decoder's: --decoder neox")
    if args.kv_bits is not None and set(args.decoder) != {"neox"}:
        raise PressConfigError("--kv_bits quantizes the neox decoder's KV buffer: --decoder neox")
    if args.prefix_bucket < 0:
        raise PressConfigError(f"--prefix_bucket must be at least 0 (0: the whole buffer), got {args.prefix_bucket}")
    if args.repeats < 1:
        raise PressConfigError(f"--repeats must be at least 1, got {args.repeats}")
    if args.bandwidth is not None and args.peak_tflops is None:
        raise PressConfigError("--bandwidth needs --peak_tflops")
    if args.kv_quant != "none" and set(args.decoder) != {"kvpress"}:
        raise PressConfigError("--kv_quant runs on the kvpress decoder only: --decoder kvpress")
    check_attn_implementation(args.attn_implementation)


def prompt_text(args) -> TokenizedText | None:
    """With real weights, the text the prompts are cut from, checked long enough before the
    weights load; with --random-init none (random token ids)."""
    folder = data_dir(args.data_dir)  # a --data-dir that does not exist is an error, even for random prompts
    if args.random_init:
        return None
    text = tokenized_text(args.model, False, args.dataset, folder, args.sample_idx)
    if text.ids.numel() < max(args.prompt_tokens):
        raise ProtocolError(f"text has {text.ids.numel()} tokens, fewer than --prompt_tokens {max(args.prompt_tokens)}")
    print(f"{text.source}: {text.ids.numel()} tokens", file=sys.stderr)
    return text


def share(state, args, grid: list[dict]) -> list[dict]:
    """This process's cells of a sweep over several processes: whole families (the out-of-memory
    rule runs within one), leaving out the families this command already has every result of."""
    def finished(family: list[dict]) -> bool:
        return all(sweep.done(args.output_dir / cell_name(cell), args.command, measured) for cell in family)

    return [cell for family in sweep.share(state, families(grid), finished) for cell in family]


def measure_grid(args) -> tuple[dict, list[dict]] | None:
    """The header and rows of the grid; launched with several processes, this process's share,
    then on the main process every cell's (on the others None)."""
    check_args(args)
    state = sweep.launched(args)  # None: one process
    if state is not None and MAX_BATCH in args.batch_size:
        raise PressConfigError("--batch_size max runs in one process (its tries depend on each other)")
    text = prompt_text(args)
    loaded = cli.load(args, args.attn_implementation, args.data_dir)
    if text is not None:
        loaded.cached_tokenizer = text.tokenizer  # calibration reads its text with it
    ceilings = run_ceilings(args, loaded.model.device)  # before any cell: the GPU as the grid finds it
    print(f"ceilings ({ceilings.source}): copy {ceilings.bandwidth / 1e12:.3f} TB/s, GEMV "
          f"{(ceilings.gemv_bandwidth or 0) / 1e12:.3f} TB/s, matmul {ceilings.peak_flops / 1e12:.0f} TFLOP/s",
          file=sys.stderr, flush=True)
    header = cli.result_header(args, loaded, protocol="speed") | {"ceilings": ceilings.to_json()}
    ids, source = (None, RANDOM_PROMPT) if text is None else (text.ids, text.source)
    grid = cells(args)
    mine = grid if state is None else share(state, args, grid)
    rows = measure_cells(args, loaded, header, ceilings, ids, source, mine)
    if state is None:
        return header, rows
    payloads = sweep.gathered(state, [args.output_dir / cell_name(cell) for cell in grid])
    if payloads is None:
        return None
    header = merged_header(payloads)
    header["environment"] = header["environment"] | {"processes": state.num_processes}
    return header, [payload["rows"][0] for payload in payloads]


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli.one_line_errors():
        result = merge(args.merge) if args.merge else measure_grid(args)
    if result is not None:  # None: a process of a sweep that is not the main one
        header, rows = result
        print(summarize(header, rows, args.output_dir, args.baseline or args.decoder[0]))


if __name__ == "__main__":
    main()
