"""RD-KV against the best baseline on the stretches where every method's cache is at its budget
(result files of evaluation/equal_bytes_streaming.py).

  python evaluation/streaming_steady_state.py results/x/*.json --head_dim 64 --output results/x/steady_state

A streamed run scores the tokens past the budget in 1024-token stretches, but the methods reach
their budget at different points: a KIVI-style baseline quantizes every token past its newest
``recent_tokens`` at once, so it holds every token, in less than the budget, until its store of
4-bit tokens fills it (3456 tokens at a 1024-token budget, head dim 64); RD-KV and the fp16 rules
hold fp16 tokens and are at the budget from its first call past it. Before the baselines fill,
RD-KV spends bytes they leave unused. Here each row is scored again on the stretches that begin
after the latest of the rows' fill points, the best baseline is chosen again on those stretches,
and RD-KV is paired with it. A fill point is found by streaming zeros through the baseline's own
storage rule (QuantizedBudgetPress's quantization and StoredLayer's bytes: no model, no text).
Files are grouped by their text (``data``, ``first_token``, ``max_tokens``, ``chunk_tokens``) and
budget. Writes OUTPUT.json and OUTPUT.md (atomically) and prints the table.

``--pool_streams``: the files of one book streamed from several first tokens (``--first_token`` of
evaluation/equal_bytes_streaming.py, streams that must not overlap) are one group: each stream's
stretches are chosen as above, then pooled, the best baseline chosen over the pooled stretches and the
intervals bootstrapped over all of them (a book's 8192 positions give 7 stretches at a budget of 512;
four streams, 28). Every stream must hold the same methods. ``--all_stretches``: every stretch past the
budget (the protocol's own scoring) instead of those after the latest fill point.
"""

import functools
import json
import math
import re
from pathlib import Path

import torch
from kvpress import StreamingLLMPress

from evaluation.cli import Parser, fail
from evaluation.equal_bytes_report import is_ours
from evaluation.intervals import paired_difference, ppl_interval
from evaluation.results import write_json_atomic, write_text_atomic
from presses.quantize import FP16_BYTES
from presses.quantized_budget_press import QuantizedBudgetPress
from presses.stored_kv import StoredLayer

QUANTIZED = re.compile(r"\+(kivi|token)(\d+)$")  # evaluation/equal_bytes_streaming.py's baseline names


@functools.cache  # one simulation per setting, however many files share it
def quantized_fill_end(budget: int, head_dim: int, bits: int, layout: str, chunk: int, recent: int) -> int:
    """The tokens streamed when a baseline's store, every token past the newest ``recent``
    quantized to ``bits`` as the press stores it, first takes more than ``budget`` tokens' fp16
    keys and values: the call after which it evicts (one KV head; the bytes are per head)."""
    press = QuantizedBudgetPress(StreamingLLMPress(), bits=bits, key_layout="channel" if layout == "kivi" else "token",
                                 recent_tokens=recent, budget_tokens=budget)
    state, tokens = StoredLayer.empty(1, "cpu"), 0
    while state.nbytes(head_dim) <= budget * 2 * FP16_BYTES * head_dim:
        tokens += chunk
        zeros = torch.zeros(1, 1, tokens, head_dim)
        state.grow(tokens)
        _, _, state = press._quantize_old(zeros, zeros.clone(), state)
    return tokens


def fill_end(row: dict, payload: dict, head_dim: int) -> int:
    """Where ``row``'s method is first at its budget: a quantized baseline when its store fills,
    every other method (fp16 rules, RD-KV, dense: no budget) at the first call past the budget."""
    budget, chunk = row["budget_tokens"], payload["chunk_tokens"]
    quantized = QUANTIZED.search(row["method"])
    if quantized is None:
        return math.ceil((budget + 1) / chunk) * chunk
    recent = re.search(r"--recent_tokens (\d+)", payload["command"])
    return quantized_fill_end(budget, head_dim, int(quantized.group(2)), quantized.group(1), chunk,
                              int(recent.group(1)) if recent else QuantizedBudgetPress.recent_tokens)


def steady_units(row: dict, start: int) -> slice:
    """The stretches of ``row`` (tokens budget + 1 on, 1024 each but the last) that begin after ``start``."""
    first, begin = 0, row["budget_tokens"]
    for tokens in row["unit_tokens"]:
        if begin >= start:
            break
        first, begin = first + 1, begin + tokens
    return slice(first, len(row["unit_tokens"]))


def grouped_rows(paths: list[Path], head_dim: int, pool_streams: bool = False) -> dict[tuple, dict[int, list]]:
    """(text, budget) -> {first token: [(row, its fill point)]}, one dense row per stream; the text
    leaves the first token out with ``pool_streams`` (each book's streams in one group)."""
    groups: dict[tuple, dict[int, list]] = {}
    for path in paths:
        payload = json.loads(path.read_text())
        keys = ("data", "max_tokens", "chunk_tokens") if pool_streams else ("data", "first_token", "max_tokens",
                                                                           "chunk_tokens")
        text = json.dumps([payload.get(key) for key in keys])
        for row in payload["rows"]:
            rows = groups.setdefault((text, row["budget_tokens"]), {}).setdefault(payload.get("first_token") or 0, [])
            if row["method"] != "dense" or all(other["method"] != "dense" for other, _ in rows):
                rows.append((row, fill_end(row, payload, head_dim)))
    return groups


def stream_parts(rows: list[tuple[dict, int]], all_stretches: bool) -> tuple[int, dict[str, tuple]]:
    """One stream's scored part: (the token it is scored from, {method: (stretch NLLs, tokens)})."""
    by_method = {row["method"]: row for row, _ in rows}
    if "dense" not in by_method:
        raise ValueError("no dense row among the files of this text and budget")
    start = by_method["dense"]["budget_tokens"] if all_stretches else max(end for _, end in rows)
    units = steady_units(by_method["dense"], start)
    if units.start >= len(by_method["dense"]["unit_tokens"]):
        raise ValueError(f"no stretch begins after token {start}: the text is too short for this budget")
    parts = {}
    for method, row in by_method.items():
        if row["unit_tokens"] != by_method["dense"]["unit_tokens"]:
            raise ValueError(f"{method} scored other stretches than dense")
        parts[method] = (row["unit_nll"][units], row["unit_tokens"][units])
    return start, parts


def steady_state(rows: list[tuple[dict, int]], all_stretches: bool = False) -> dict:
    """Every row rescored on the stretches past the latest fill point, the best baseline there,
    and RD-KV's rows paired with it."""
    return pooled([rows], all_stretches)


def pooled(streams: list[list[tuple[dict, int]]], all_stretches: bool = False) -> dict:
    """``steady_state`` over several streams of one text: each stream's stretches, pooled."""
    parts = [stream_parts(rows, all_stretches) for rows in streams]
    methods = list(parts[0][1])  # the first stream's order (its files' rows)
    if any(sorted(stream) != sorted(methods) for _, stream in parts):
        raise ValueError("the streams hold different methods: "
                         + " / ".join(", ".join(sorted(stream)) for _, stream in parts))
    nll = {method: [x for _, stream in parts for x in stream[method][0]] for method in methods}
    tokens = [t for _, stream in parts for t in stream["dense"][1]]
    first = {row["method"]: (row, end) for row, end in streams[0]}
    scored = []
    for method in methods:
        row, end = first[method]
        scored.append({"method": method, "fill_end": end, "whole_run_kv_bytes_fraction": row["kv_bytes_fraction"]}
                      | ppl_interval(nll[method], tokens) | paired_difference(nll[method], nll["dense"], tokens))
    baselines = [row for row in scored if row["method"] != "dense" and not is_ours(row)]
    best = min(baselines, key=lambda row: row["ppl"]) if baselines else None
    for row in scored:
        if is_ours(row) and best is not None:
            versus = paired_difference(nll[row["method"]], nll[best["method"]], tokens)
            row |= {"versus_method": best["method"], "versus_pct": versus["delta_pct"],
                    "versus_pct_ci95": versus["delta_pct_ci95"]}
    return {"steady_from_token": max(start for start, _ in parts), "streams": len(streams),
            "scored_tokens": sum(tokens), "units": len(tokens), "best_baseline": best["method"] if best else None,
            "rows": scored}


def check_apart(first_tokens: list[int], max_tokens: int) -> None:
    """Streams of ``max_tokens`` from each first token must not share a token (pooled stretches
    would count one text twice)."""
    for earlier, later in zip(sorted(first_tokens), sorted(first_tokens)[1:]):
        if later < earlier + max_tokens:
            raise ValueError(f"the streams from tokens {earlier} and {later} overlap ({max_tokens} tokens each)")


def table(results: list[dict]) -> str:
    lines = ["| text | budget | scored from token (units) | method | PPL [95%] | vs dense, % [95%] | vs best baseline, % [95%] |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        for row in result["rows"]:
            if row["method"] == "dense":
                continue
            versus = (f"{row['versus_pct']:+.2f} [{row['versus_pct_ci95'][0]:+.2f}, {row['versus_pct_ci95'][1]:+.2f}] "
                      f"vs {row['versus_method']}" if "versus_method" in row else
                      ("best" if row["method"] == result["best_baseline"] else ""))
            lines.append(f"| {result['text_label']} | {result['budget_tokens']} | {result['steady_from_token'] + 1} "
                         f"({result['units']}) | {row['method']} | {row['ppl']:.3f} [{row['ppl_ci95'][0]:.2f}, "
                         f"{row['ppl_ci95'][1]:.2f}] | {row['delta_pct']:+.2f} [{row['delta_pct_ci95'][0]:+.2f}, "
                         f"{row['delta_pct_ci95'][1]:+.2f}] | {versus} |")
    return "\n".join(lines) + "\n"


def main():
    parser = Parser(__file__, __doc__)
    parser.add_argument("files", nargs="+", type=Path, help="equal_bytes_streaming.py result files")
    parser.add_argument("--head_dim", type=int, required=True, help="the model's head dimension (SmolLM2-135M: 64)")
    parser.add_argument("--output", type=Path, required=True, help="OUTPUT.json and OUTPUT.md are written")
    parser.add_argument("--pool_streams", action="store_true", help="one book's streams from several first tokens pooled")
    parser.add_argument("--all_stretches", action="store_true",
                        help="every stretch past the budget, not only those after the latest fill point")
    args = parser.parse_args()
    if args.head_dim < 1:
        fail(f"--head_dim must be positive, got {args.head_dim}")
    missing = [str(path) for path in args.files if not path.is_file()]
    if missing:
        fail(f"no such file: {', '.join(missing)}")
    results = []
    try:
        for (text, budget), streams in sorted(grouped_rows(args.files, args.head_dim, args.pool_streams).items()):
            firsts = sorted(streams)
            check_apart(firsts, json.loads(text)[-2])
            data = json.loads(text)[0]
            label = data if firsts == [0] else f"{data} from token{'s' * (len(firsts) > 1)} {', '.join(map(str, firsts))}"
            results.append({"text": json.loads(text), "first_tokens": firsts, "text_label": label,
                            "budget_tokens": budget}
                           | pooled([streams[first] for first in firsts], args.all_stretches))
    except ValueError as error:
        fail(str(error))
    markdown = table(results)
    write_json_atomic(args.output.with_suffix(".json"), {"command": args.command, "head_dim": args.head_dim,
                                                         "pool_streams": args.pool_streams,
                                                         "all_stretches": args.all_stretches, "results": results})
    write_text_atomic(args.output.with_suffix(".md"), markdown)
    print(markdown, end="")


if __name__ == "__main__":
    main()
