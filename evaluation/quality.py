"""The rows of a quality run (evaluation/perplexity.py): dense first, then every press at every
setting, under the context or the streaming protocol (evaluation/protocols.py), each row with its
PPL, its 95% interval and its paired difference to dense."""

import argparse
import sys

import torch

from evaluation.calibration import calibration_facts
from evaluation.intervals import paired_difference, ppl_interval
from evaluation.methods import DENSE, press_settings, ready
from evaluation.models import LoadedModel
from evaluation.protocols import SEGMENT_TOKENS, context_nll, streaming_nll
from presses import Settings, make_press, make_streaming_press
from presses.registry import check_compression_ratio, method_for


def settings_from(args: argparse.Namespace, ratio: float = 0.0, budget: int | None = None) -> Settings:
    return press_settings(args, compression_ratio=ratio, budget=budget or args.budget[0],
                          compress_every=args.compress_every, chunk_tokens=args.chunk_tokens)


def context_tokens(args: argparse.Namespace, config) -> int:
    """N, the tokens prefilled with the press: --context_tokens, else the model's context less M."""
    return args.context_tokens or config.max_position_embeddings - args.eval_tokens


def context_press(name: str, ratio: float, args: argparse.Namespace, context_tokens: int):
    """The press for the context protocol: the method's prefill form, or, for a decode-time
    method (InfLLM), its streaming form holding the kept fraction of the context."""
    if method_for(name).prefill:
        return make_press(name, ratio, settings_from(args))
    check_compression_ratio(ratio)
    return make_streaming_press(name, settings_from(args, budget=max(1, int(context_tokens * (1 - ratio)))))


def cells(args: argparse.Namespace, presses: list[str]) -> list[tuple[str, float | int | None]]:
    """The run's cells in the order they run, dense first: (method, compression ratio) under the
    context protocol, (method, budget) under the streaming one (dense has no budget)."""
    if args.protocol == "context":
        return [(DENSE, 0.0)] + [(name, ratio) for name in presses for ratio in args.compression_ratio]
    return [(DENSE, None)] + [(name, budget) for name in presses for budget in args.budget]


def cell_row(args: argparse.Namespace, loaded: LoadedModel, ids: torch.Tensor, name: str,
             setting: float | int | None) -> dict:
    """One cell's row (``setting``: its ratio or budget), over all the windows or the whole text."""
    model = loaded.model
    # A cell's row must not depend on the cells run before it (a sweep split over processes runs
    # each cell in another order): a press that draws from torch's generator draws the same numbers.
    torch.manual_seed(args.seed)
    if args.protocol == "context":
        context = context_tokens(args, model.config)
        press = None if name == DENSE else context_press(name, setting, args, context)
        press, attn = ready(loaded, name, press, args)
        result = context_nll(model, ids, press, context, args.eval_tokens, args.num_windows, args.chunk_tokens,
                             args.kv_quant)
        row = {"method": name, "compression_ratio": setting, "attn_implementation": attn, "kv_quant": args.kv_quant,
               "context_tokens": context, "eval_tokens": args.eval_tokens, "num_windows": args.num_windows}
        row |= quality_facts(result) | {"kv_mib_after_prefill": result.kv_bytes / 2**20} | stored_facts(result)
        row |= calibration_facts(press)
        print(f"{name} @ {setting}: ppl {result.ppl:.4f}", file=sys.stderr, flush=True)
        return row
    press = None if name == DENSE else make_streaming_press(name, settings_from(args, budget=setting))
    press, attn = ready(loaded, name, press, args)
    result = streaming_nll(model, ids, press, args.chunk_tokens, args.max_tokens)
    print(f"{name} @ budget {setting}: ppl {result.ppl:.4f}", file=sys.stderr, flush=True)
    return ({"method": name, "attn_implementation": attn, "budget": setting, "chunk_tokens": args.chunk_tokens,
             "max_tokens": args.max_tokens}
            | quality_facts(result) | {f"ppl_per_{SEGMENT_TOKENS}_tokens": result.segment_ppl})


def finished_rows(rows: list[dict], source: str) -> list[dict]:
    """``rows`` (dense first) with the text they scored and each one's paired difference to dense;
    a row that records an error (a failed cell of a sweep, evaluation/sweep.py) has none."""
    dense = rows[0]
    for row in rows:
        row["data"] = source
        if "error" not in row and "error" not in dense:
            row |= paired_difference(row["unit_nll"], dense["unit_nll"], row["unit_tokens"])
    return rows


def quality_rows(args: argparse.Namespace, loaded: LoadedModel, presses: list[str], ids: torch.Tensor,
                 source: str) -> list[dict]:
    rows = [cell_row(args, loaded, ids, name, setting) for name, setting in cells(args, presses)]
    return finished_rows(rows, source)


def stored_facts(result) -> dict:
    """Context protocol: the bytes the pressed cache takes stored as the press stores it (low-bit
    presses count packed integers and scales; others their tokens in fp16), and that over the
    context's fp16 cache. Absent for caches held in another form (cross-layer, low rank)."""
    if result.stored_kv_bytes is None:
        return {}
    return {"stored_kv_bytes": result.stored_kv_bytes, "kv_bytes_fraction": result.stored_kv_bytes / result.dense_kv_bytes}


def quality_facts(result) -> dict:
    """What a quality row records of a protocol's result: PPL with its 95% interval over the
    units (windows, or SEGMENT_TOKENS-token stretches), the cache actually held and attended,
    the tokens scored, and each unit's NLL sum so later reports can pair methods again."""
    return ppl_interval(result.unit_nll, result.unit_tokens) | {
        "mean_nll": result.mean_nll, "scored_tokens": result.tokens, "scored_token_range": list(result.scored_range),
        "mean_cache_tokens": result.cache_tokens, "peak_attended_keys": result.peak_attended_keys,
        "unit_nll": result.unit_nll, "unit_tokens": result.unit_tokens}
