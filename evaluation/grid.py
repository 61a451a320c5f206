"""The speed grid (evaluation/speed_grid.py): its cells (decoder x method x batch size x prompt
length x new tokens), one cell's measurement (evaluation/speed.py's ``measure``), the rule that a
method out of GPU memory at one batch size skips the larger ones, and merging the cell files of
several calls into one summary (evaluation/grid_summary.py)."""

import json
import sys
from pathlib import Path

import torch

from decoding.registry import DECODER_NAMES, HF_BASELINES
from evaluation import ceilings as ceilings_module
from evaluation.calibration import calibration_facts
from evaluation.ceilings import Ceilings, datasheet_for, machine_ceilings
from evaluation.methods import DENSE, press_settings, ready
from evaluation.models import LoadedModel
from evaluation.results import token_digest, write_json_atomic
from evaluation.speed import measure, neox_settings, prompt_ids
from presses import make_press

RANDOM_PROMPT = "random token ids"
OUT_OF_MEMORY = "CUDA out of memory"
NOT_RUN = "not run: a smaller batch was already out of memory"
# What a cell prints when it is done (and summary.md's columns, evaluation/grid_summary.py).
COLUMNS = ["decoder", "decode_attention", "compile_mode", "keep_buffer", "method", "compression_ratio", "batch_size", "prompt_tokens",
           "new_tokens", "kept_tokens_mean", "ttft_ms", "tpot_ms", "tpot_floor_ms", "tpot_over_floor",
           "tpot_floor_gemv_ms", "tpot_floor_datasheet_ms", "tpot_speedup", "decode_tokens_per_s",
           "end_to_end_tokens_per_s", "first_call_s", "compile_s", "peak_memory_gib", "kv_mib_after_prefill",
           "kv_mib_final", "error"]


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


def family(cell: dict) -> tuple:
    """What a cell shares with the cells of other batch sizes that the out-of-memory rule skips."""
    return tuple(cell[k] for k in ("decoder", "backend", "method", "compression_ratio", "prompt_tokens", "new_tokens"))


def families(grid: list[dict]) -> list[list[dict]]:
    """The grid's cells by family, each family's batch sizes ascending (the unit a sweep over
    several processes gives one process: evaluation/sweep.py)."""
    grouped = {}
    for cell in grid:
        grouped.setdefault(family(cell), []).append(cell)
    return list(grouped.values())


def measured(row: dict) -> bool:
    """Whether a row is a result: measured, or out of memory (at its batch size or a smaller one)."""
    return row.get("error") in (None, OUT_OF_MEMORY, NOT_RUN)


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


def prompt_for(cell: dict, text_ids: torch.Tensor | None, vocab_size: int, seed: int) -> torch.Tensor:
    """The cell's prompt (batch, tokens): the text's first tokens in every row when the weights are
    real (``text_ids``), else random token ids (the work is the same for any content)."""
    if text_ids is None:
        return prompt_ids(vocab_size, cell["batch_size"], cell["prompt_tokens"], seed)
    return text_ids[: cell["prompt_tokens"]].expand(cell["batch_size"], -1)


def run_cell(loaded: LoadedModel, cell: dict, args, ceilings: Ceilings, text_ids: torch.Tensor | None,
             source: str) -> dict:
    """One cell's row: the method ready on the model (evaluation/methods.py), then ``measure``; a
    failure is the row's ``error``. ``source``: where the prompt came from."""
    model = loaded.model
    prompt = prompt_for(cell, text_ids, model.config.vocab_size, args.seed).to(model.device)
    row = {"method": cell["method"], "compression_ratio": cell["compression_ratio"]}
    try:
        press = (None if cell["method"] == DENSE else
                 make_press(cell["method"], cell["compression_ratio"], press_settings(args)))
        press, attn = ready(loaded, cell["method"], press, args)  # prefill attention; hf_eager switches itself
        row |= {"attn_implementation": attn, "prompt": source} | calibration_facts(press)
        row |= measure(model, prompt, press, cell["new_tokens"], repeats=args.repeats, decoder=cell["decoder"],
                       kv_quant=args.kv_quant, backend=cell["backend"] or "sdpa", compile_mode=args.compile_mode,
                       keep_buffer=args.keep_buffer, ceilings=ceilings)
    except Exception as error:  # noqa: BLE001 -- one failing cell (e.g. a compiler error) must not lose the grid
        # Out of memory is a result too (this batch does not fit this method); cuDNN reports it
        # as a generic accelerator error.
        out_of_memory = "out of memory" in str(error).lower()
        torch.cuda.empty_cache()
        row |= failed(cell, args,
                      OUT_OF_MEMORY if out_of_memory else f"{type(error).__name__}: {str(error)[:500]}")
    if "tokens" in row:
        row |= token_digest(row.pop("tokens"))
    return row


def failed(cell: dict, args, error: str) -> dict:
    return {key: cell[key] for key in ("decoder", "batch_size", "prompt_tokens", "new_tokens")} | {
        "decode_attention": cell["backend"], **neox_settings(cell["decoder"], args.compile_mode, args.keep_buffer),
        "error": error}


def measure_cells(args, loaded: LoadedModel, header: dict, ceilings: Ceilings, text_ids: torch.Tensor | None,
                  source: str, grid: list[dict]) -> list[dict]:
    """The ``grid``'s cells in order (whole families), each written to its own file in
    --output_dir (``header`` and its row) as soon as it is done, so a grid cut short keeps what it
    measured."""
    rows, out_of_memory = [], set()
    for cell in grid:
        if family(cell) in out_of_memory:
            row = {"method": cell["method"], "compression_ratio": cell["compression_ratio"]}
            row |= failed(cell, args, NOT_RUN)
        else:
            row = run_cell(loaded, cell, args, ceilings, text_ids, source)
            if row.get("error") == OUT_OF_MEMORY:
                out_of_memory.add(family(cell))
        rows.append(row)
        write_json_atomic(args.output_dir / cell_name(cell), header | {"rows": [row]})
        print(" ".join(f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}"
                       for k in COLUMNS if row.get(k) is not None), file=sys.stderr, flush=True)
    return rows


def add_speedups(rows: list[dict], baseline_decoder: str) -> None:
    """TPOT speed-up of every cell against ``baseline_decoder``'s dense cell of the same shape."""
    shape = ("batch_size", "prompt_tokens", "new_tokens")
    baselines = {tuple(r[k] for k in shape): r for r in rows
                 if r["decoder"] == baseline_decoder and r["method"] == DENSE and "tpot_ms" in r}
    for row in rows:
        baseline = baselines.get(tuple(row[k] for k in shape))
        if baseline is not None and "tpot_ms" in row:
            row["tpot_speedup"] = baseline["tpot_ms"] / row["tpot_ms"]


def merge(folders: list[Path]) -> tuple[dict, list[dict]]:
    files = sorted(p for folder in folders for p in folder.rglob("*.json") if p.name != "summary.json")
    if not files:
        raise SystemExit(f"error: no cell files under {', '.join(map(str, folders))}")
    payloads = [json.loads(path.read_text()) for path in files]
    rows = [payload["rows"][0] for payload in payloads]
    rows.sort(key=lambda r: (DECODER_NAMES.index(r["decoder"]), str(r.get("decode_attention")), r["method"] != DENSE,
                             r["method"], r["compression_ratio"], r["prompt_tokens"], r["new_tokens"], r["batch_size"]))
    return merged_header(payloads), rows


def merged_header(payloads: list[dict]) -> dict:
    """One header for cell files of several calls (or of the processes of one sweep): the first
    file's, with every command, and the ceilings each call measured on each of its devices."""
    header = {k: v for k, v in payloads[0].items() if k != "rows"}
    header["command"] = sorted({payload["command"] for payload in payloads})
    # Files of one call on one device share their ceilings: keep one per (command, device), naming both.
    measured = {(payload["command"], payload["environment"]["device"]): payload["ceilings"]
                for payload in payloads if payload.get("ceilings")}
    header.pop("ceilings", None)
    if measured:
        header["ceilings"] = [{"command": command, "device": device} | measured[command, device]
                              for command, device in sorted(measured)]
    return header
