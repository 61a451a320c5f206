"""KV compression at equal bytes while text streams in (the streaming protocol of
evaluation/protocols.py: the text in calls of --chunk_tokens, the press acting after every call):
every method's cache, after every call, takes at most the fp16 bytes of --budget_tokens tokens
per layer, bytes as stored (scales, zero points, precision tags and channel statistics counted).

  python evaluation/equal_bytes_streaming.py --model smollm2-135m --dataset pg19 --sample_idx 1 \
      --budget_tokens 256 512 --max_tokens 8193 --part baselines --output baselines.json
  python evaluation/equal_bytes_streaming.py ... --part rdkv --rdkv "" "evict_weight=8" \
      --versus baselines.json --output rdkv.json

``--part baselines``: each eviction rule of --scorers through BudgetPress, holding the budget's
tokens in fp16; and each rule holding as many tokens as the bytes pay for with every token past
the newest --recent_tokens quantized once to each of --bits in each of --key_layouts
(QuantizedBudgetPress: KIVI's per-channel key groups, or per-token keys; values per token). With
StreamingLLM's rule (sinks and the newest tokens) that is uniform quantization; with the others,
eviction then quantization. Quantized rows give tokens their places in the text as positions
(StreamingLLM and TreeKV in fp16 count them in the cache). ``--part rdkv``: RDKVBudgetPress with each --rdkv setting
(evaluation/equal_bytes.py's syntax), RD-KV re-allocating the whole cache whenever a call pushes
it past the budget (its own settings beside RD-KV's: carry_received=0 for the call's evidence alone,
whole_key_groups=0 for partial key groups quantized per token (the press before the fix), realloc_slack=N, h2o_keep=x for H2O's keep set of x budgets' tokens first).

Every row is scored on the tokens past the budget (the first --budget_tokens tokens every
method scores against an uncompressed cache), in 1024-token stretches: PPL with its 95%
interval, and the paired difference to dense over the same stretches (block bootstrap,
evaluation/intervals.py). With --versus FILE... (baselines of the same text and settings), each
row is also paired against their best row at its budget (lowest PPL). A row's
``kv_bytes_fraction`` is the mean over calls of the bytes held after the call, over the budget's
fp16 bytes; ``peak_kv_bytes_fraction`` the largest: the run stops if any method exceeds 1.
Each part runs its own dense row first. ``--first_token N`` streams the text from its N-th token
(the N-th at position 0): a stretch of the text kept apart for tuning, the reported runs starting
at 0.
"""

import json
import sys
from pathlib import Path

from evaluation.cli import (Parser, add_data_options, add_model_options, add_press_settings, load, one_line_errors,
                            print_summary, result_header)
from evaluation.equal_bytes import flag, rdkv_setting
from evaluation.intervals import paired_difference, ppl_interval
from evaluation.models import SMOLLM2_ALIAS, data_dir, tokenized_text
from evaluation.protocols import SEGMENT_TOKENS, ProtocolError, stored_bytes, streaming_nll
from evaluation.results import write_json_atomic
from decoding.kv_cache import fp16_kv_bytes
from presses import Settings, make_streaming_press
from presses.errors import PressConfigError
from presses.quantized_budget_press import QuantizedBudgetPress
from presses.rdkv_budget_press import RDKVBudgetPress
from presses.rdkv_press import RDKVPress

SCORERS = ("streaming_llm", "h2o", "tova", "scissorhands", "treekv", "snapkv")
COLUMNS = ["method", "budget_tokens", "kv_bytes_fraction", "peak_kv_bytes_fraction", "mean_cache_tokens", "ppl",
           "ppl_ci95", "delta_pct", "delta_pct_ci95", "versus_method", "versus_pct", "versus_pct_ci95"]


def baselines(args, budget: int) -> tuple[list[tuple[str, object]], dict[str, str]]:
    """(name, press) of every baseline at ``budget``, and the scorers that cannot stream in these
    calls (SnapKV's window of queries is longer than a chunk of one token), with why."""
    configs, not_run = [], {}
    for name in args.scorers:
        try:
            press = make_streaming_press(name, Settings(n_sink=args.n_sink, window=args.window, budget=budget,
                                                        chunk_tokens=args.chunk_tokens))
        except PressConfigError as error:
            not_run[name] = str(error)
            continue
        if not args.quantized_only:
            configs.append((name, press))
        for layout in args.key_layouts:
            for bits in args.bits:
                configs.append((f"{name}+{layout}{bits}", QuantizedBudgetPress(
                    press.base_press, compression_interval=press.compression_interval, bits=bits,
                    key_layout="channel" if layout == "kivi" else "token", recent_tokens=args.recent_tokens,
                    budget_tokens=budget)))
    return configs, not_run


def rdkv_presses(settings: list[str], budget: int) -> list[tuple[str, object]]:
    """(name, press): RDKVBudgetPress at ``budget`` with each setting: RDKVPress's (evaluation/
    equal_bytes.py's syntax) and the streaming press's own, carry_received=0/1 and realloc_slack=N."""
    configs = []
    for text in settings:
        streaming, rest = {}, []
        for item in text.split():
            key, _, value = item.partition("=")
            if key in ("carry_received", "whole_key_groups"):
                streaming[key] = flag(key, value, text)
            elif key == "realloc_slack":
                streaming[key] = int(value)
            elif key == "h2o_keep":
                streaming[key] = float(value)
            else:
                rest.append(item)
        setting = rdkv_setting(" ".join(rest))
        if "after_h2o" in setting:
            raise PressConfigError("after_h2o composes H2O with RD-KV after prefill (evaluation/equal_bytes.py); "
                                   "its streaming form is h2o_keep=x (H2O keeps x budgets' tokens first)")
        configs.append((f"rdkv[{text}]", RDKVBudgetPress(RDKVPress(**setting), budget_tokens=budget, **streaming)))
    return configs


def measure(model, ids, press, args):
    """The streaming run, and the bytes every layer's cache takes after each call (summed over layers)."""
    held = []

    def after_call(module, inputs, kwargs, output):
        held.append(stored_bytes(press, kwargs["past_key_values"]))

    hook = model.register_forward_hook(after_call, with_kwargs=True)
    try:
        return streaming_nll(model, ids, press, args.chunk_tokens, args.max_tokens), held
    finally:
        hook.remove()


def past_budget(result, budget: int) -> tuple[list[float], list[int]]:
    """NLL sums and token counts of the stretches of the tokens past the budget (tokens budget + 1, ...)."""
    stretches = result.token_nll[budget:].split(SEGMENT_TOKENS)  # token_nll[i] scores token i + 1
    return [stretch.sum().item() for stretch in stretches], [stretch.numel() for stretch in stretches]


def row_for(name: str, budget: int, measured, dense, budget_bytes: float) -> dict:
    (result, held), (dense_result, _) = measured, dense
    nll, tokens = past_budget(result, budget)
    row = {"method": name, "budget_tokens": budget, "kv_bytes_fraction": sum(held) / len(held) / budget_bytes,
           "peak_kv_bytes_fraction": max(held) / budget_bytes, "mean_kv_bytes": sum(held) / len(held),
           "budget_kv_bytes": budget_bytes, "mean_cache_tokens": result.cache_tokens,
           "peak_attended_keys": result.peak_attended_keys, "scored_tokens": sum(tokens),
           "scored_token_range": [budget + 1, result.scored_range[1]], "mean_nll": sum(nll) / sum(tokens),
           "ppl_all_tokens": result.ppl, "segment_ppl": result.segment_ppl, "unit_nll": nll, "unit_tokens": tokens}
    return row | ppl_interval(nll, tokens) | paired_difference(nll, past_budget(dense_result, budget)[0], tokens)


def best_rows(paths: list[Path], header: dict) -> dict[int, dict]:
    """Per budget, the row of lowest PPL among the methods of ``paths`` (files of the same text and settings)."""
    best = {}
    for path in paths:
        payload = json.loads(path.read_text())
        for key in ("data", "chunk_tokens", "first_token", "max_tokens"):
            if payload.get(key, 0 if key == "first_token" else None) != header[key]:  # files before it: token 0
                raise ValueError(f"--versus {path}: its {key} {payload.get(key)!r} is not this run's {header[key]!r}")
        for row in payload["rows"]:
            if row["method"] != "dense" and row["ppl"] < best.get(row["budget_tokens"], {"ppl": float("inf")})["ppl"]:
                best[row["budget_tokens"]] = row
    return best


def versus(row: dict, best: dict | None) -> dict:
    """The row paired against ``best`` (the same stretches), as a percentage of best's PPL."""
    if best is None:
        raise ValueError(f"--versus: the files have no row at budget {row['budget_tokens']}")
    if best["unit_tokens"] != row["unit_tokens"]:
        raise ValueError(f"--versus: {best['method']} scored other stretches than {row['method']}")
    difference = paired_difference(row["unit_nll"], best["unit_nll"], row["unit_tokens"])
    return {"versus_method": best["method"], "versus_pct": difference["delta_pct"],
            "versus_pct_ci95": difference["delta_pct_ci95"], "versus_ppl": difference["delta_ppl"],
            "versus_ppl_ci95": difference["delta_ppl_ci95"]}


def main(argv=None) -> None:
    parser = Parser(__file__, __doc__)
    add_model_options(parser, default_model=SMOLLM2_ALIAS)
    add_data_options(parser)
    study = parser.add_argument_group("study")
    study.add_argument("--part", choices=["baselines", "rdkv"], required=True)
    study.add_argument("--budget_tokens", type=int, nargs="+", default=[512],
                       help="the byte budget per layer: this many tokens' keys and values in fp16 (one row per method each)")
    study.add_argument("--chunk_tokens", type=int, default=128, help="tokens fed per call")
    study.add_argument("--max_tokens", type=int, default=8193, help="the text's first tokens streamed (64 calls of 128)")
    study.add_argument("--first_token", type=int, default=0,
                       help="stream the text from this token (a held-out stretch for tuning; reported runs: 0)")
    study.add_argument("--scorers", nargs="+", choices=SCORERS, default=list(SCORERS), help="--part baselines: eviction rules")
    study.add_argument("--bits", type=int, nargs="+", choices=[2, 3, 4, 8], default=[2, 4, 8],
                       help="--part baselines: widths the quantized baselines store")
    study.add_argument("--quantized_only", action="store_true",
                       help="--part baselines: leave out each rule's fp16 row (only its quantized rows: one pass less)")
    study.add_argument("--key_layouts", nargs="+", choices=["kivi", "token"], default=["kivi"],
                       help="--part baselines: KIVI's per-channel key groups, or per-token keys")
    study.add_argument("--recent_tokens", type=int, default=32, help="--part baselines: the newest tokens kept in fp16")
    add_press_settings(study)
    study.add_argument("--rdkv", nargs="+", default=[""], help="--part rdkv: RD-KV settings, e.g. 'evict_weight=8 bits=2,4,8'")
    study.add_argument("--versus", type=Path, nargs="+", help="--part baselines files of the same text and settings: "
                                                              "pair every row with their best row at its budget")
    study.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if min(args.budget_tokens) < 2 or args.chunk_tokens < 1:
        parser.error("--budget_tokens must be at least 2 and --chunk_tokens at least 1")
    if args.first_token < 0:
        parser.error(f"--first_token must be at least 0, got {args.first_token}")
    if args.max_tokens - 1 <= max(args.budget_tokens):
        parser.error(f"--max_tokens {args.max_tokens} scores no token past the budget {max(args.budget_tokens)}")

    def configs(budget):
        return baselines(args, budget) if args.part == "baselines" else (rdkv_presses(args.rdkv, budget), {})

    for budget in args.budget_tokens:  # bad settings fail before the model loads
        configs(budget)
    text = tokenized_text(args.model, args.random_init, args.dataset, data_dir(args.data_dir), args.sample_idx)
    ids = text.ids[args.first_token :]
    if ids.numel() < args.max_tokens:
        raise ProtocolError(f"{text.source} has {ids.numel()} tokens from token {args.first_token}, fewer than "
                            f"--max_tokens {args.max_tokens}")
    loaded = load(args, data_dir=args.data_dir)
    header = result_header(args, loaded, protocol="streaming", data=text.source, chunk_tokens=args.chunk_tokens,
                           first_token=args.first_token, max_tokens=args.max_tokens, budget_tokens=args.budget_tokens,
                           scored="the tokens past each budget, in 1024-token stretches")
    best = best_rows(args.versus, header) if args.versus else {}
    dense = measure(loaded.model, ids, None, args)
    rows, not_run = [], {}
    for budget in args.budget_tokens:
        budget_bytes = fp16_kv_bytes(loaded.model.config, budget)
        rows.append(row_for("dense", budget, dense, dense, budget_bytes))
        presses, skipped = configs(budget)
        not_run |= skipped
        for name, press in presses:
            row = row_for(name, budget, measure(loaded.model, ids, press, args), dense, budget_bytes)
            if row["peak_kv_bytes_fraction"] > 1:
                raise RuntimeError(f"{name} at budget {budget} held {row['peak_kv_bytes_fraction']:.4f} of the "
                                   "budget's bytes after a call: not at equal bytes")
            rows.append(row)
            print(f"{name} @ {budget}: ppl {row['ppl']:.4f} ({row['delta_pct']:+.2f}% vs dense), "
                  f"{row['kv_bytes_fraction']:.4f} of the bytes", file=sys.stderr, flush=True)
            write_json_atomic(args.output, header | {"not_run": not_run, "rows": rows})  # a run cut short keeps its rows
    for row in rows:
        if args.versus:
            row |= versus(row, best.get(row["budget_tokens"]))
    write_json_atomic(args.output, header | {"not_run": not_run, "rows": rows})
    print_summary(args, loaded, rows, COLUMNS, args.output, "streaming at equal bytes, tokens past the budget")


if __name__ == "__main__":
    with one_line_errors(ValueError):
        main()
