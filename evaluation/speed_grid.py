"""The speed benchmark as one call: decoder x method x batch size x prompt length x new tokens.

  python evaluation/speed_grid.py --model EleutherAI/pythia-2.8b --random-init \\
      --decoder hf_eager hf_static kvpress neox --press snapkv --compression_ratio 0.5 0.75 \\
      --batch_size 1 8 --prompt_tokens 2000 --new_tokens 256 --output_dir results/grid

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
is the last one measured.
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from decoding import registry  # noqa: E402
from decoding.neox_decode import ATTENTION_BACKENDS, COMPILE_MODES  # noqa: E402
from decoding.registry import DECODER_NAMES, HF_BASELINES  # noqa: E402
from evaluation import ceilings as ceilings_module  # noqa: E402
from evaluation.ceilings import Ceilings, datasheet_for, machine_ceilings  # noqa: E402
from evaluation.cli import one_line_errors  # noqa: E402
from evaluation.models import DTYPES, load_model  # noqa: E402
from evaluation.results import environment, markdown_table, save_figure_atomic, write_json_atomic, write_text_atomic  # noqa: E402
from evaluation.speed import measure, neox_settings, prompt_ids  # noqa: E402
from presses import PressConfigError, make_press  # noqa: E402
from presses.registry import check_compression_ratio  # noqa: E402

DENSE = "dense"
COLUMNS = ["decoder", "decode_attention", "compile_mode", "keep_buffer", "method", "compression_ratio", "batch_size", "prompt_tokens",
           "new_tokens", "kept_tokens_mean", "ttft_ms", "tpot_ms", "tpot_floor_ms", "tpot_over_floor",
           "tpot_floor_gemv_ms", "tpot_floor_datasheet_ms", "tpot_speedup", "decode_tokens_per_s",
           "end_to_end_tokens_per_s", "first_call_s", "compile_s", "peak_memory_gib", "kv_mib_after_prefill",
           "kv_mib_final", "error"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="evaluation/speed_grid.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="EleutherAI/pythia-2.8b")
    parser.add_argument("--random-init", action="store_true", help="exact config, random weights (speed stand-in)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--data-dir", dest="data_dir", help="offline data folder (prompts from text, tokenizer)")
    parser.add_argument("--dataset", default="wikitext", help="prompt text when the weights are real")
    parser.add_argument("--decoder", nargs="+", default=["hf_eager", "hf_static", "kvpress", "neox"], choices=DECODER_NAMES,
                        help=registry.help_text())
    parser.add_argument("--decode_attention", nargs="+", default=["sdpa"], choices=ATTENTION_BACKENDS,
                        help="attention back ends of the neox decoder, its prefill included (one cell each)")
    parser.add_argument("--compile_mode", default="two-stream", choices=COMPILE_MODES,
                        help="how the neox decoder's step is compiled: two-stream (the MLP beside the attention "
                             "in one graph), or whole, by torch.compile's mode (both capture CUDA graphs)")
    parser.add_argument("--keep_buffer", action=argparse.BooleanOptionalAction, default=True,
                        help="two-stream: keep the KV buffer (and so the graph) from one generation to the next "
                             "of the same shape; --no-keep_buffer where the next prefill needs that memory")
    parser.add_argument("--press", nargs="*", default=["snapkv"], help="methods beside dense (registry names)")
    parser.add_argument("--compression_ratio", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                        help="a dense cell beside the presses (--no-dense: the presses alone, e.g. at batch sizes "
                             "where dense does not fit)")
    parser.add_argument("--batch_size", type=int, nargs="+", default=[1])
    parser.add_argument("--prompt_tokens", type=int, nargs="+", default=[2000])
    parser.add_argument("--new_tokens", type=int, nargs="+", default=[256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bandwidth", type=float,
                        help="TB/s the floors divide by, instead of measuring it (needs --peak_tflops)")
    parser.add_argument("--gemv_bandwidth", type=float, help="with --bandwidth: TB/s of the second (GEMV) floor")
    parser.add_argument("--peak_tflops", type=float, help="with --bandwidth: the matmul rate, TFLOP/s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", help="decoder whose dense cells the speed-ups divide (default: the first)")
    parser.add_argument("--merge", type=Path, nargs="+",
                        help="measure nothing: merge the cell files under these folders (several calls' parts) "
                             "into one summary in --output_dir")
    parser.add_argument("--output_dir", type=Path, required=True)
    return parser.parse_args(argv)


def cells(args) -> list[dict]:
    """Every cell of the grid, in the order it runs (batch sizes ascending, for the OOM rule)."""
    methods = [(DENSE, 0.0)] if args.dense else []
    methods += [(name, ratio) for name in args.press for ratio in args.compression_ratio]
    grid = []
    for prompt in args.prompt_tokens:
        for new in args.new_tokens:
            for decoder in args.decoder:
                backends = args.decode_attention if decoder == "neox" else [None]
                for backend in backends:
                    for name, ratio in methods:
                        if decoder in HF_BASELINES and name != DENSE:
                            continue
                        for batch in sorted(args.batch_size):
                            grid.append(dict(decoder=decoder, backend=backend, method=name, compression_ratio=ratio,
                                             batch_size=batch, prompt_tokens=prompt, new_tokens=new))
    return grid


def cell_name(cell: dict) -> str:
    backend = f"_{cell['backend']}" if cell["backend"] else ""
    return (f"{cell['decoder']}{backend}_{cell['method']}_r{cell['compression_ratio']:g}_b{cell['batch_size']}"
            f"_p{cell['prompt_tokens']}_n{cell['new_tokens']}.json")


def run_ceilings(args, device) -> Ceilings:
    """The ceilings every cell's floor divides by: measured on ``device`` now, or given."""
    if args.bandwidth is None:
        return machine_ceilings(device)
    gemv = args.gemv_bandwidth * 1e12 if args.gemv_bandwidth else None
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None
    return ceilings_module.given(args.bandwidth * 1e12, args.peak_tflops * 1e12, gemv, datasheet_for(name))


def run_cell(model, cell: dict, args, ceilings: Ceilings) -> dict:
    press = None if cell["method"] == DENSE else make_press(cell["method"], cell["compression_ratio"])
    prompt = prompt_ids(model.config.vocab_size, cell["batch_size"], cell["prompt_tokens"], args.seed)
    prompt = prompt.to(model.device)
    row = {"method": cell["method"], "compression_ratio": cell["compression_ratio"]}
    try:
        row |= measure(model, prompt, press, cell["new_tokens"], repeats=args.repeats, decoder=cell["decoder"],
                       backend=cell["backend"] or "sdpa", compile_mode=args.compile_mode, keep_buffer=args.keep_buffer,
                       ceilings=ceilings)
    except Exception as error:  # noqa: BLE001 -- one failing cell (e.g. a compiler error) must not lose the grid
        # Out of memory is a result too (this batch does not fit this method); cuDNN reports it
        # as a generic accelerator error.
        out_of_memory = "out of memory" in str(error).lower()
        torch.cuda.empty_cache()
        row |= _failed(cell, args,
                       "CUDA out of memory" if out_of_memory else f"{type(error).__name__}: {str(error)[:500]}")
    row.pop("tokens", None)
    return row


def _failed(cell: dict, args, error: str) -> dict:
    return {key: cell[key] for key in ("decoder", "batch_size", "prompt_tokens", "new_tokens")} | {
        "decode_attention": cell["backend"], **neox_settings(cell["decoder"], args.compile_mode, args.keep_buffer),
        "error": error}


def add_speedups(rows: list[dict], baseline_decoder: str) -> None:
    """TPOT speed-up of every cell against ``baseline_decoder``'s dense cell of the same shape."""
    shape = ("batch_size", "prompt_tokens", "new_tokens")
    baselines = {tuple(r[k] for k in shape): r for r in rows
                 if r["decoder"] == baseline_decoder and r["method"] == DENSE and "tpot_ms" in r}
    for row in rows:
        baseline = baselines.get(tuple(row[k] for k in shape))
        if baseline is not None and "tpot_ms" in row:
            row["tpot_speedup"] = baseline["tpot_ms"] / row["tpot_ms"]


def plot(frame: pd.DataFrame, value: str, label: str, path: Path) -> None:
    """``value`` against batch size, one line per decoder / method / ratio."""
    measured = frame[frame[value].notna()] if value in frame else frame.iloc[0:0]
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    axis.set_prop_cycle(color=plt.cm.tab20.colors)
    for key, group in measured.groupby(["decoder", "decode_attention", "method", "compression_ratio"], dropna=False):
        decoder, backend, method, ratio = key
        name = f"{decoder}/{backend} {method}" + (f" {1 - ratio:.0%} kept" if method != DENSE else "")
        group = group.sort_values("batch_size")
        axis.plot(group.batch_size, group[value], marker="o", markersize=3, label=name)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("batch size")
    axis.set_ylabel(label)
    axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    save_figure_atomic(figure, path)
    plt.close(figure)


def plot_smallest_batch(frame: pd.DataFrame, path: Path) -> None:
    """TPOT of every cell at the smallest batch size, as bars, with the roofline floor marked."""
    measured = frame[frame["tpot_ms"].notna()] if "tpot_ms" in frame else frame.iloc[0:0]
    cells = measured[measured.batch_size == measured.batch_size.min()]
    labels = [f"{r.decoder}/{r.decode_attention} {r.method}" + (f" {1 - r.compression_ratio:.0%} kept"
              if r.method != DENSE else "") for r in cells.itertuples()]
    figure, axis = plt.subplots(figsize=(6.4, 0.28 * len(cells) + 1.2))
    axis.barh(range(len(cells)), cells.tpot_ms, color="tab:blue")
    axis.scatter(cells.tpot_floor_ms, range(len(cells)), color="black", marker="|", s=120, label="roofline floor")
    axis.set_yticks(range(len(cells)), labels, fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel(f"time per output token (ms), batch {cells.batch_size.min()}")
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure_atomic(figure, path)
    plt.close(figure)


def summarize(header: dict, rows: list[dict], output_dir: Path, baseline: str) -> str:
    """summary.json, summary.md, tpot.png and throughput.png in ``output_dir``; returns the table."""
    add_speedups(rows, baseline)
    write_json_atomic(output_dir / "summary.json", header | {"rows": rows})
    frame = pd.DataFrame(rows)
    table = markdown_table(frame[[c for c in COLUMNS if c in frame.columns]])
    device = header["environment"].get("gpu", header["environment"]["device"])
    write_text_atomic(output_dir / "summary.md",
                      f"{header['model']} ({header['model_tier']}), {header['dtype']}, {device}; speed-up: TPOT of "
                      f"{baseline} dense / TPOT of the cell; floor: roofline of evaluation/roofline.py at every "
                      f"layer's own cache length{ceilings_line(header)}\n\n{table}\n")
    plot(frame, "tpot_ms", "time per output token (ms)", output_dir / "tpot.png")
    plot(frame, "decode_tokens_per_s", "decode throughput (tokens/s)", output_dir / "throughput.png")
    plot_smallest_batch(frame, output_dir / "tpot_smallest_batch.png")
    return table


def ceilings_line(header: dict) -> str:
    """What the floors divided by, from a header (one measurement per call), for summary.md."""
    measured = header.get("ceilings")
    if not measured:
        return ""
    calls = measured if isinstance(measured, list) else [measured]
    parts = [(f"{c['command'].split('--output_dir')[-1].strip()}: " if "--output_dir" in c.get("command", "") else "")
             + f"copy {c['bandwidth'] / 1e12:.3f} TB/s (the floor), GEMV "
             + (f"{c['gemv_bandwidth'] / 1e12:.3f} TB/s" if c.get("gemv_bandwidth") else "not measured")
             + f", matmul {c['peak_flops'] / 1e12:.0f} TFLOP/s ({c['source']})" for c in calls]
    return "; ceilings " + "; ".join(parts)


def merge(folders: list[Path]) -> tuple[dict, list[dict]]:
    files = sorted(p for folder in folders for p in folder.rglob("*.json") if p.name != "summary.json")
    if not files:
        raise SystemExit(f"error: no cell files under {', '.join(map(str, folders))}")
    payloads = [json.loads(path.read_text()) for path in files]
    header = {k: v for k, v in payloads[0].items() if k != "rows"}
    header["command"] = sorted({payload["command"] for payload in payloads})
    # Each call measured its own ceilings: keep one per command (files of one call share it), with its command.
    measured = {payload["command"]: payload["ceilings"] for payload in payloads if payload.get("ceilings")}
    header.pop("ceilings", None)
    if measured:
        header["ceilings"] = [{"command": command} | measured[command] for command in sorted(measured)]
    rows = [payload["rows"][0] for payload in payloads]
    rows.sort(key=lambda r: (DECODER_NAMES.index(r["decoder"]), str(r.get("decode_attention")), r["method"] != DENSE,
                             r["method"], r["compression_ratio"], r["prompt_tokens"], r["new_tokens"], r["batch_size"]))
    return header, rows


def measure_grid(args, argv: list[str]) -> tuple[dict, list[dict]]:
    with one_line_errors():
        for name in args.press:
            make_press(name, 0.0)  # unknown names fail here, before the model loads
        for ratio in args.compression_ratio:
            check_compression_ratio(ratio)
        if min(args.new_tokens) < 2:
            raise PressConfigError("--new_tokens must be at least 2 to time decode steps")
        if args.bandwidth is not None and args.peak_tflops is None:
            raise PressConfigError("--bandwidth needs --peak_tflops")
        dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
        loaded = load_model(args.model, args.random_init, dtype, args.device, "sdpa", args.data_dir)
    ceilings = run_ceilings(args, loaded.model.device)  # before any cell: the GPU as the grid finds it
    print(f"ceilings ({ceilings.source}): copy {ceilings.bandwidth / 1e12:.3f} TB/s, GEMV "
          f"{(ceilings.gemv_bandwidth or 0) / 1e12:.3f} TB/s, matmul {ceilings.peak_flops / 1e12:.0f} TFLOP/s",
          file=sys.stderr, flush=True)
    header = {"command": "python evaluation/speed_grid.py " + " ".join(argv), "model": args.model,
              "model_tier": loaded.tier, "dtype": dtype, "protocol": "speed", "environment": environment(args.device),
              "ceilings": ceilings.to_json()}
    rows, out_of_memory = [], set()
    for cell in cells(args):
        family = tuple(cell[k] for k in ("decoder", "backend", "method", "compression_ratio", "prompt_tokens",
                                         "new_tokens"))
        if family in out_of_memory:
            row = {"method": cell["method"], "compression_ratio": cell["compression_ratio"]}
            row |= _failed(cell, args, "not run: a smaller batch was already out of memory")
        else:
            loaded.model.set_attn_implementation("sdpa")  # prefill attention; hf_eager switches to eager itself
            row = run_cell(loaded.model, cell, args, ceilings)
            if row.get("error") == "CUDA out of memory":
                out_of_memory.add(family)
        rows.append(row)
        write_json_atomic(args.output_dir / cell_name(cell), header | {"rows": [row]})
        print(" ".join(f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}"
                       for k in COLUMNS if row.get(k) is not None), file=sys.stderr, flush=True)
    return header, rows


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    header, rows = merge(args.merge) if args.merge else measure_grid(args, argv)
    print(summarize(header, rows, args.output_dir, args.baseline or args.decoder[0]))


if __name__ == "__main__":
    main()
