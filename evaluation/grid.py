"""The speed grid (evaluation/speed_grid.py): its cells (decoder x method x batch size x prompt
length x new tokens), one cell's measurement (evaluation/speed.py's ``measure``), the rule that a
method out of GPU memory at one batch size skips the larger ones, the search for the largest batch
that fits (``--batch_size max``: ``largest_batch``), and merging the cell files of several calls
into one summary (evaluation/grid_summary.py)."""

import gc
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from decoding.kv_cache import fp16_kv_bytes
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
MAX_BATCH = "max"  # --batch_size max: search for the largest batch that fits (``largest_batch``)
# What a cell prints when it is done (and summary.md's columns, evaluation/grid_summary.py).
COLUMNS = ["decoder", "decode_attention", "compile_mode", "keep_buffer", "prefix_bucket", "kv_bits", "method", "compression_ratio", "batch_size", "prompt_tokens",
           "new_tokens", "kept_tokens_mean", "ttft_ms", "tpot_ms", "tpot_floor_ms", "tpot_over_floor",
           "tpot_floor_gemv_ms", "tpot_floor_datasheet_ms", "tpot_speedup", "decode_tokens_per_s",
           "end_to_end_tokens_per_s", "first_call_s", "compile_s", "peak_memory_gib", "kv_mib_after_prefill",
           "kv_mib_final", "largest_fit", "error"]


def batch_size_arg(text: str) -> int | str:
    """A --batch_size value: a number, or ``max`` (search for the largest batch that fits)."""
    if text == MAX_BATCH:
        return MAX_BATCH
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"a batch size is a number or {MAX_BATCH!r}, not {text!r}") from None


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
                        batches = [MAX_BATCH] if MAX_BATCH in args.batch_size else sorted(args.batch_size)
                        for batch in batches:
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
        neox = cell["decoder"] == "neox"
        prefill_batch = getattr(args, "prefill_batch", None) if neox else None
        kv_bits = getattr(args, "kv_bits", None) if neox else None
        row |= measure(model, prompt, press, cell["new_tokens"], repeats=args.repeats, decoder=cell["decoder"],
                       kv_quant=args.kv_quant, backend=cell["backend"] or "sdpa", compile_mode=args.compile_mode,
                       keep_buffer=args.keep_buffer, ceilings=ceilings, prefill_batch=prefill_batch, kv_bits=kv_bits,
                       prefix_bucket=args.prefix_bucket)
    except Exception as error:  # noqa: BLE001 -- one failing cell (e.g. a compiler error) must not lose the grid
        # Out of memory is a result too (this batch does not fit this method); cuDNN reports it
        # as a generic accelerator error, and a CUDA-graph capture that ran out ends in a capture error.
        cause = out_of_memory_in(error)
        row |= failed(cell, args,
                      OUT_OF_MEMORY if cause is not None else f"{type(error).__name__}: {str(error)[:500]}")
        if cause is not None:  # what it tried to allocate, and where: the next run knows what to shrink
            row["oom_detail"] = f"{(str(cause).splitlines() or [''])[0][:400]} at {where(cause)}"
        del error, cause  # their tracebacks hold the failed generation's tensors
    finally:
        release_memory(model.device)
    if "tokens" in row:
        row |= token_digest(row.pop("tokens"))
    return row


def out_of_memory_in(error: BaseException) -> BaseException | None:
    """The out-of-memory error that ``error`` is or was raised while handling, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def where(error: BaseException) -> str:
    """The innermost frame of ``error``'s traceback in this project's code (file:line function)."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if "site-packages" not in frame.filename and "/torch/" not in frame.filename]
    frame = frames[-1] if frames else traceback.extract_tb(error.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"


def release_memory(device) -> None:
    """Between cells: what the last one left (compiled steps' graphs, cached blocks) given back."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def failed(cell: dict, args, error: str) -> dict:
    return {key: cell[key] for key in ("decoder", "batch_size", "prompt_tokens", "new_tokens")} | {
        "decode_attention": cell["backend"], **neox_settings(cell["decoder"], args.compile_mode, args.keep_buffer, args.prefix_bucket),
        "error": error}


def measure_cells(args, loaded: LoadedModel, header: dict, ceilings: Ceilings, text_ids: torch.Tensor | None,
                  source: str, grid: list[dict]) -> list[dict]:
    """The ``grid``'s cells in order (whole families), each written to its own file in
    --output_dir (``header`` and its row) as soon as it is done, so a grid cut short keeps what it
    measured."""
    rows, out_of_memory = [], set()

    def record(cell: dict, row: dict, echo: bool = True) -> None:
        write_json_atomic(args.output_dir / cell_name(cell), header | {"rows": [row]})
        if echo:
            print(" ".join(f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}"
                      for k in COLUMNS if row.get(k) is not None), file=sys.stderr, flush=True)

    for cell in grid:
        if cell["batch_size"] == MAX_BATCH:
            rows += search_largest_batch(args, loaded, cell, lambda c: run_cell(loaded, c, args, ceilings, text_ids,
                                                                                  source), record)
            continue
        if family(cell) in out_of_memory:
            row = {"method": cell["method"], "compression_ratio": cell["compression_ratio"]}
            row |= failed(cell, args, NOT_RUN)
        else:
            row = run_cell(loaded, cell, args, ceilings, text_ids, source)
            if row.get("error") == OUT_OF_MEMORY:
                out_of_memory.add(family(cell))
        rows.append(row)
        record(cell, row)
    return rows


def largest_batch(fits: Callable[[int], bool | None], start: int, step: int, max_tries: int | None = None,
                  out_of_time: Callable[[], bool] = lambda: False) -> tuple[int | None, list[int]]:
    """The largest batch for which ``fits`` is True, to within ``step``: ``fits(batch)`` True (it
    fits), False (out of memory) or None (failed otherwise: the search stops). From ``start`` up
    by step, 2 step, 4 step, ... while it fits, or down by as much from each batch that does not,
    until a batch that fits and one that does not are found; then bisection between the two
    (the tried batches lo + multiples of ``step``) until they are ``step`` or less apart. At most
    ``max_tries`` calls, none begun once ``out_of_time()``. Returns the largest batch that fit
    (None: none did) and the batches tried, in order."""
    if start < 1 or step < 1:
        raise ValueError(f"the search needs start and step of at least 1, got {start} and {step}")
    tried, largest, smallest_out = [], None, None

    def attempt(batch: int) -> bool | None:
        if (max_tries is not None and len(tried) >= max_tries) or out_of_time():
            return None
        tried.append(batch)
        return fits(batch)

    batch, jump = start, step
    while True:  # bracket
        result = attempt(batch)
        if result is None:
            return largest, tried
        if result:
            largest = batch
            if smallest_out is not None:
                break
            batch = largest + jump
        else:
            smallest_out = batch
            if largest is not None or batch == 1:
                break
            batch = max(1, smallest_out - jump)
        jump *= 2
    while largest is not None and smallest_out - largest > step:  # bisect
        batch = largest + max(step, (smallest_out - largest) // 2 // step * step)
        result = attempt(batch)
        if result is None:
            break
        if result:
            largest = batch
        else:
            smallest_out = batch
    return largest, tried


def estimated_largest_batch(config, prompt_tokens: int, new_tokens: int, compression_ratio: float,
                            free_bytes: float, prefill_batch: int | None, bytes_per_value: int = 2,
                            reserve_bytes: float = 2 * 2**30) -> int:
    """The batch whose memory fills ``free_bytes`` (what is free with the weights loaded), by
    accounting: each sequence's KV buffer (the kept tokens, prompt x (1 - ratio) for a press, plus
    the new ones), and the prefill's activations, about 16 hidden-sized and 2 MLP-sized values a
    token at a layer (QKV, the reordered and rotated queries and keys, the residual terms, the
    MLP's inner two), for a micro-batch of ``prefill_batch`` sequences (None: for every sequence);
    ``reserve_bytes`` for workspaces, the decode graph and fragmentation. An estimate to start
    the search from, not the answer."""
    kept = prompt_tokens if compression_ratio == 0 else math.ceil(prompt_tokens * (1 - compression_ratio))
    kv = fp16_kv_bytes(config, kept + new_tokens) * bytes_per_value / 2
    activations = bytes_per_value * prompt_tokens * (16 * config.hidden_size + 2 * config.intermediate_size)
    fixed = reserve_bytes + (activations * prefill_batch if prefill_batch else 0)
    per_sequence = kv + (0 if prefill_batch else activations)
    return max(1, int((free_bytes - fixed) // per_sequence))


def search_start(args, model, cell: dict) -> int:
    """The first batch the search tries: --max_batch_start, else on a GPU the estimate from its
    free memory rounded up to the step (a first try that does not fit costs a prefill, one that
    fits a compile and two generations: the search goes down from there), else the step."""
    step = args.max_batch_step
    if args.max_batch_start:
        return args.max_batch_start
    if model.device.type != "cuda":
        return step
    release_memory(model.device)
    free = torch.cuda.mem_get_info(model.device)[0] + torch.cuda.memory_reserved(model.device) - \
        torch.cuda.memory_allocated(model.device)
    estimate = estimated_largest_batch(model.config, cell["prompt_tokens"], cell["new_tokens"],
                                       cell["compression_ratio"], free, getattr(args, "prefill_batch", None),
                                       model.dtype.itemsize)
    print(f"largest batch search: {free / 2**30:.1f} GiB free, estimate {estimate}", file=sys.stderr, flush=True)
    return math.ceil(estimate / step) * step


def search_largest_batch(args, loaded: LoadedModel, cell: dict, run: Callable[[dict], dict],
                         record: Callable[..., None]) -> list[dict]:
    """``largest_batch`` for one family (``cell`` with batch ``max``): every tried batch a measured
    row (out of memory: its error, as in a grid), recorded as it is done; at the end the largest
    batch that fit is marked ``largest_fit`` in its row (its file written again)."""
    rows, began = {}, time.perf_counter()

    def fits(batch: int) -> bool | None:
        tried = dict(cell, batch_size=batch)
        row = run(tried)
        rows[batch] = (tried, row)
        record(tried, row)
        if row.get("error") is None:
            return True
        return False if row["error"] == OUT_OF_MEMORY else None

    limit = args.max_batch_time_s
    largest, tried = largest_batch(fits, search_start(args, loaded.model, cell), args.max_batch_step,
                                   args.max_batch_tries,
                                   lambda: limit is not None and time.perf_counter() - began > limit)
    print(f"largest batch that fits: {largest} (tried {', '.join(map(str, tried))}; step {args.max_batch_step})",
          file=sys.stderr, flush=True)
    for batch, (tried_cell, row) in rows.items():
        row["largest_fit"] = batch == largest
        if batch == largest:
            record(tried_cell, row, echo=False)
    return [rows[batch][1] for batch in tried]


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
