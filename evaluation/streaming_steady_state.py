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


def grouped_rows(paths: list[Path], head_dim: int) -> dict[tuple, list[tuple[dict, int]]]:
    """(row, its fill point) by (text, budget); one dense row per group."""
    groups: dict[tuple, list[tuple[dict, int]]] = {}
    for path in paths:
        payload = json.loads(path.read_text())
        text = json.dumps([payload.get(key) for key in ("data", "first_token", "max_tokens", "chunk_tokens")])
        for row in payload["rows"]:
            rows = groups.setdefault((text, row["budget_tokens"]), [])
            if row["method"] != "dense" or all(other["method"] != "dense" for other, _ in rows):
                rows.append((row, fill_end(row, payload, head_dim)))
    return groups


def steady_state(rows: list[tuple[dict, int]]) -> dict:
    """Every row rescored on the stretches past the latest fill point, the best baseline there,
    and RD-KV's rows paired with it."""
    start = max(end for _, end in rows)
    by_method, ends = {row["method"]: row for row, _ in rows}, {row["method"]: end for row, end in rows}
    if "dense" not in by_method:
        raise ValueError("no dense row among the files of this text and budget")
    units = steady_units(by_method["dense"], start)
    if units.start >= len(by_method["dense"]["unit_tokens"]):
        raise ValueError(f"no stretch begins after token {start}: the text is too short for this budget")

    def part(row):
        if row["unit_tokens"] != by_method["dense"]["unit_tokens"]:
            raise ValueError(f"{row['method']} scored other stretches than dense")
        return row["unit_nll"][units], row["unit_tokens"][units]

    dense_nll, tokens = part(by_method["dense"])
    scored = []
    for method, row in by_method.items():
        nll, _ = part(row)
        scored.append({"method": method, "fill_end": ends[method],
                       "whole_run_kv_bytes_fraction": row["kv_bytes_fraction"]}
                      | ppl_interval(nll, tokens) | paired_difference(nll, dense_nll, tokens))
    baselines = [row for row in scored if row["method"] != "dense" and not is_ours(row)]
    best = min(baselines, key=lambda row: row["ppl"]) if baselines else None
    for row in scored:
        if is_ours(row) and best is not None:
            versus = paired_difference(part(by_method[row["method"]])[0], part(by_method[best["method"]])[0], tokens)
            row |= {"versus_method": best["method"], "versus_pct": versus["delta_pct"],
                    "versus_pct_ci95": versus["delta_pct_ci95"]}
    return {"steady_from_token": start, "scored_tokens": sum(tokens), "units": len(tokens),
            "best_baseline": best["method"] if best else None, "rows": scored}


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
    args = parser.parse_args()
    if args.head_dim < 1:
        fail(f"--head_dim must be positive, got {args.head_dim}")
    missing = [str(path) for path in args.files if not path.is_file()]
    if missing:
        fail(f"no such file: {', '.join(missing)}")
    results = []
    try:
        for (text, budget), rows in sorted(grouped_rows(args.files, args.head_dim).items()):
            data, first_token = json.loads(text)[:2]
            label = data if not first_token else f"{data} from token {first_token}"
            results.append({"text": json.loads(text), "text_label": label, "budget_tokens": budget} | steady_state(rows))
    except ValueError as error:
        fail(str(error))
    markdown = table(results)
    write_json_atomic(args.output.with_suffix(".json"), {"command": args.command, "head_dim": args.head_dim,
                                                         "results": results})
    write_text_atomic(args.output.with_suffix(".md"), markdown)
    print(markdown, end="")


if __name__ == "__main__":
    main()
