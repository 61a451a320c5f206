"""Speculative decoding by name (decoding/speculative.py): acceptance, tokens per verify pass
and wall-clock speedup against plain decoding of the same prompts in the same run; or, with
--verify_costs, the step costs that predict the speedup on a GPU (evaluation/speculative_costs.py).

Examples (the first two run offline; the third needs the Hugging Face hub or local folders):
  python evaluation/speculative.py --model smollm2-135m --dataset wikitext pg19 \\
      --speculative self=streaming_llm,budget=64,k=4 self=layer_skip,skip=6,k=4 self=snapkv,budget=64,k=adaptive
  python evaluation/speculative.py --model EleutherAI/pythia-2.8b --random-init --verify_costs \\
      --draft_model EleutherAI/pythia-160m --prompt_tokens 2000 --batch_size 1 8
  python evaluation/speculative.py --model EleutherAI/pythia-2.8b --speculative draft=EleutherAI/pythia-160m,k=4

A --speculative spec is comma-separated key=value pairs:
  draft=MODEL          a draft model (hub id, local folder, smollm2-135m), same tokenizer as the target
  self=PRESS           the target as its own draft, its copy of the cache pressed to budget=N tokens
                       at prefill by a registered press (streaming_llm, snapkv, ...)
  self=layer_skip      the target skipping skip=N layers chosen on the calibration text, or layers=A+B+C
  k=N | k=adaptive     drafts per verify pass (adaptive: starts at 4, +2 after a full acceptance,
                       -1 otherwise, at most k_max=N, default 8)
--model is the target; --random-init gives a draft model random weights too (timings only: their
acceptance means nothing). Errors in the arguments exit with code 2 and one line, writing no file.
"""

import argparse
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from decoding import neox_cuda_graphs, neox_decode
from decoding import static_cache
from decoding.reference import END, FIRST_TOKEN, START, kvpress_generate, no_mark
from decoding.layer_skip import choose_skip_layers
from decoding.registry import ALIASES, SPECULATIVE_DECODERS, decoder
from decoding.speculative import LayerSkipDraft, ModelDraft, Stats, speculative_generate
from evaluation import cli
from evaluation.data import DataError, load_text
from evaluation.models import REPO_ROOT, load_model
from evaluation.results import write_json_atomic
from evaluation.speculative_costs import measure_costs
from evaluation.speed import Clock, timed
from presses import PressConfigError, Settings, make_press, press_names
from presses.registry import method_for

LAYER_SKIP = "layer_skip"
ADAPTIVE_START = 4


class SpecError(ValueError):
    """A --speculative spec or setting that cannot be used."""


@dataclass
class Spec:
    text: str
    kind: str  # "model", "press" or "layer_skip"
    draft: str | None = None  # draft model name, or the press name for kind "press"
    budget: int = 256
    k: int = 4
    adaptive: bool = False
    k_max: int = 8
    skip: int | None = None
    layers: list[int] = field(default_factory=list)


def _int(key: str, value: str, low: int = 1) -> int:
    if not re.fullmatch(r"\d+", value) or int(value) < low:
        raise SpecError(f"{key} must be an integer >= {low}, got {value!r}")
    return int(value)


def parse_spec(text: str) -> Spec:
    """'draft=EleutherAI/pythia-160m,k=4' -> Spec; raises SpecError with one line."""
    pairs = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise SpecError(f"--speculative {text!r}: expected key=value pairs separated by commas, got {part!r}")
        pairs[key.strip()] = value.strip()
    known = {"draft", "self", "k", "k_max", "budget", "skip", "layers"}
    if set(pairs) - known:
        raise SpecError(f"--speculative {text!r}: unknown key(s) {', '.join(sorted(set(pairs) - known))}; "
                        f"known: {', '.join(sorted(known))}")
    if ("draft" in pairs) == ("self" in pairs):
        raise SpecError(f"--speculative {text!r}: give exactly one of draft=MODEL or self=PRESS|{LAYER_SKIP}")
    if "draft" in pairs:
        spec = Spec(text, "model", pairs["draft"])
    elif pairs["self"] == LAYER_SKIP:
        spec = Spec(text, LAYER_SKIP)
        if ("skip" in pairs) == ("layers" in pairs):
            raise SpecError(f"--speculative {text!r}: {LAYER_SKIP} needs skip=N (chosen on the calibration text) "
                            "or layers=A+B+C, not both")
        if "skip" in pairs:
            spec.skip = _int("skip", pairs["skip"])
        else:
            spec.layers = sorted({_int("layers", layer, 0) for layer in pairs["layers"].split("+")})
    else:
        name = pairs["self"]
        try:
            if not method_for(name).prefill:
                raise SpecError(f"self={name}: this press has no prefill form; use one of {', '.join(press_names())}")
        except PressConfigError as error:
            raise SpecError(f"self={name}: {error}; or self={LAYER_SKIP}") from None
        spec = Spec(text, "press", name)
        if "budget" in pairs:
            spec.budget = _int("budget", pairs["budget"])
    spec.k_max = _int("k_max", pairs.get("k_max", "8"))
    if pairs.get("k") == "adaptive":
        spec.adaptive, spec.k = True, min(ADAPTIVE_START, spec.k_max)
    else:
        spec.k = _int("k", pairs.get("k", "4"))
        if spec.k > spec.k_max:
            spec.k_max = spec.k
    return spec


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.Parser(__file__, __doc__)
    model = cli.add_model_options(parser, attention=("eager", "sdpa"))
    model.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speculative", nargs="+", default=[], metavar="SPEC", help="draft spec(s), see above")
    parser.add_argument("--press", help="press on the target's cache at prefill (any registered prefill press)")
    parser.add_argument("--compression_ratio", type=float, default=0.5, help="the target press's ratio")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy (output checked equal to plain decoding); > 0: rejection sampling")
    parser.add_argument("--decoder", default="dynamic", choices=[*ALIASES, *SPECULATIVE_DECODERS],
                        help="dynamic (or kvpress): DynamicCache, eager steps; static: StaticCache, steps compiled to "
                             "CUDA graphs on a GPU (decoding/static_cache.py); neox: GPT-NeoX's own step on its buffer, compiled "
                             "to CUDA graphs on a GPU (decoding/neox_decode.py)")
    cli.add_data_options(parser, several=True, what="the prompts' texts")
    parser.add_argument("--num_prompts", type=int, default=2, help="prompts per dataset, spread over the text")
    parser.add_argument("--prompt_tokens", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each decoder before timing")
    parser.add_argument("--calibration", default="pg19", help="layer_skip: calibration dataset (not an eval prompt)")
    parser.add_argument("--calibration_sample", type=int, default=1, help="layer_skip: PG-19 book of the calibration")
    parser.add_argument("--calibration_offset", type=int, default=2000, help="layer_skip: first calibration token")
    parser.add_argument("--calibration_tokens", type=int, default=256)
    costs = parser.add_argument_group("--verify_costs (evaluation/speculative_costs.py)")
    costs.add_argument("--verify_costs", action="store_true",
                       help="time one target forward of k+1 tokens against one decode step, and the drafts' steps")
    costs.add_argument("--draft_model", default="EleutherAI/pythia-160m")
    costs.add_argument("--batch_size", type=int, nargs="+", default=[1])
    costs.add_argument("--k_values", type=int, nargs="+", default=list(range(1, 9)))
    costs.add_argument("--self_budget", type=int, nargs="+", default=[256],
                       help="cache tokens of the compressed self-draft")
    costs.add_argument("--skip_fraction", type=float, nargs="+", default=[0.5],
                       help="fraction of layers the layer-skip self-draft skips")
    costs.add_argument("--repeats", type=int, default=20, help="timed forwards per measurement (median)")
    costs.add_argument("--time_limit_s", type=float, default=420,
                       help="stop starting new measurements after this long (results so far are kept)")
    parser.add_argument("--output", type=Path, help="result JSON (default: results/<model>_speculative_*.json)")
    return parser.parse_args(argv)


def check_args(args) -> list[Spec]:
    specs = [parse_spec(text) for text in args.speculative]
    if not args.verify_costs and not specs:
        raise SpecError("give --speculative SPEC (or --verify_costs)")
    if args.new_tokens < 2 or args.prompt_tokens < 1 or args.num_prompts < 1:
        raise SpecError("--new_tokens must be >= 2, --prompt_tokens and --num_prompts >= 1")
    if args.temperature < 0:
        raise SpecError(f"--temperature must be >= 0, got {args.temperature}")
    if args.press:
        make_press(args.press, args.compression_ratio)  # unknown press or ratio: PressConfigError
    if cache_kind(args) == "static" and args.press == "pyramidkv":
        raise SpecError("the static decoder needs one cache length in every layer; pyramidkv leaves them uneven")
    return specs


def prompts_from(args, loaded) -> list[tuple[str, torch.Tensor]]:
    """``num_prompts`` windows of ``prompt_tokens`` per dataset, spread evenly over each text."""
    tokenizer = loaded.tokenizer()
    prompts = []
    for dataset in args.dataset:
        text, source = load_text(dataset, loaded.data_folder, args.sample_idx if dataset == "pg19" else 0)
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        stride = (ids.numel() - args.prompt_tokens) // args.num_prompts
        if stride < 1:
            raise DataError(f"{source}: {ids.numel()} tokens, too few for {args.num_prompts} prompts of "
                            f"{args.prompt_tokens}")
        for index in range(args.num_prompts):
            start = index * stride
            prompts.append((f"{source} tokens {start}..{start + args.prompt_tokens}",
                            ids[start:start + args.prompt_tokens][None]))
    return prompts


def calibration_ids(args, loaded) -> tuple[torch.Tensor, str]:
    text, source = load_text(args.calibration, loaded.data_folder,
                             args.calibration_sample if args.calibration == "pg19" else 0)
    ids = loaded.tokenizer()(text, return_tensors="pt").input_ids[0]
    window = ids[args.calibration_offset:args.calibration_offset + args.calibration_tokens]
    if window.numel() < args.calibration_tokens:
        raise DataError(f"{source}: too short for calibration tokens from {args.calibration_offset}")
    return window[None], f"{source} tokens {args.calibration_offset}..{args.calibration_offset + window.numel()}"


def build_draft(spec: Spec, args, loaded, dtype: str, chosen: dict):
    """The draft object and a description of it for the result file. ``chosen`` keeps the
    greedy layer search between specs (run once, for the largest count in ``chosen["largest"]``)."""
    model = loaded.model
    if spec.kind == "model":
        # --random-init (speed stand-in) applies to the draft too: timings only, acceptance meaningless
        draft_model = load_model(spec.draft, args.random_init, dtype, args.device, args.attn_implementation,
                                 args.data_dir).model
        if draft_model.config.vocab_size != model.config.vocab_size:
            raise SpecError(f"draft {spec.draft} has vocabulary {draft_model.config.vocab_size}, the target "
                            f"{model.config.vocab_size}: they must share one tokenizer")
        return ModelDraft(draft_model), {"draft_model": spec.draft}
    if spec.kind == "press":
        ratio = max(0.0, 1.0 - (spec.budget + 0.5) / args.prompt_tokens)  # kvpress keeps int(n * (1 - ratio))
        press = make_press(spec.draft, ratio, Settings(compression_ratio=ratio))
        return ModelDraft(model, press), {"draft_press": spec.draft, "draft_budget_tokens": spec.budget,
                                          "draft_compression_ratio": ratio}
    layers = len(model.model.layers)
    if spec.layers:
        if spec.layers[-1] >= layers or len(spec.layers) >= layers:
            raise SpecError(f"layers={spec.layers}: the model has layers 0..{layers - 1}, at least one must run")
        return LayerSkipDraft(model, spec.layers), {"skipped_layers": spec.layers, "layers": layers}
    if spec.skip >= layers:
        raise SpecError(f"skip={spec.skip}: the model has {layers} layers, at least one must run")
    if len(chosen.get("history", [])) < spec.skip:  # the greedy search once, for the largest count asked
        ids, chosen["source"] = calibration_ids(args, loaded)
        _, chosen["history"] = choose_skip_layers(model, ids.to(model.device), max(spec.skip, chosen["largest"]))
    history = chosen["history"][:spec.skip]  # greedy: the first N steps are the choice for N layers
    skip = sorted(step["added_layer"] for step in history)
    print(f"layer_skip: skipping {skip} (chosen on {chosen['source']})", file=sys.stderr)
    return LayerSkipDraft(model, skip), {"skipped_layers": skip, "layers": layers, "calibration": chosen["source"],
                                         "calibration_greedy_steps": history}


def cache_kind(args) -> str:
    """decoding/speculative.py's name for the cache of ``--decoder``: dynamic, static or neox."""
    return decoder(args.decoder).speculative_cache


def plain(args, model, prompt, press, step):
    """Plain greedy decoding with the same cache kind: tokens and timings."""
    if cache_kind(args) == "static":
        run = timed(static_cache.generate, model.device, model, prompt, press, args.new_tokens, step=step)
    elif cache_kind(args) == "neox":
        run = timed(neox_decode.generate, model.device, model, list(prompt.split(1)), press, args.new_tokens,
                    step=step)
    else:
        run = timed(kvpress_generate, model.device, model, prompt, press, args.new_tokens)
    return run["tokens"], run["ttft_s"], run["decode_s"]


def speculative_rows(args, loaded, specs, dtype, save) -> list[dict]:
    """One row per draft spec; ``save(rows)`` after each, so a run cut short keeps its finished specs."""
    model = loaded.model
    prompts = [(source, ids.to(model.device)) for source, ids in prompts_from(args, loaded)]
    target_press = make_press(args.press, args.compression_ratio) if args.press else None
    compile = cache_kind(args) != "dynamic" and model.device.type == "cuda"
    step = neox_cuda_graphs.compiled_step(compile) if cache_kind(args) == "neox" else static_cache.compiled_step(compile)

    for _ in range(args.warmup):
        plain(args, model, prompts[0][1], target_press, step)
    baseline = [plain(args, model, ids, target_press, step) for _, ids in prompts]
    rows, chosen = [], {"largest": max([spec.skip for spec in specs if spec.skip], default=0)}
    for spec in specs:
        draft, description = build_draft(spec, args, loaded, dtype, chosen)

        def run(ids, stats, seed, mark=no_mark):
            generator = torch.Generator(device=model.device).manual_seed(seed)
            return speculative_generate(model, ids, draft, args.new_tokens, k=spec.k, press=target_press,
                                        temperature=args.temperature, adaptive=spec.adaptive, k_max=spec.k_max,
                                        cache=cache_kind(args), compile=compile, generator=generator, stats=stats,
                                        mark=mark)

        for _ in range(args.warmup):
            run(prompts[0][1], Stats(), args.seed)
        per_prompt, total, total_ttft, total_decode = [], Stats(), 0.0, 0.0
        for index, ((source, ids), (plain_tokens, plain_ttft, plain_decode)) in enumerate(zip(prompts, baseline)):
            stats, clock = Stats(), Clock(model.device)
            tokens = run(ids, stats, args.seed + index, clock)
            ttft, decode = clock.seconds(START, FIRST_TOKEN), clock.seconds(FIRST_TOKEN, END)
            total.proposed += stats.proposed
            total.accepted += stats.accepted
            total_ttft += ttft
            total_decode += decode
            per_prompt.append({"prompt": source, **stats.summary(), "ttft_s": ttft,
                               "decode_s": decode, "plain_ttft_s": plain_ttft, "plain_decode_s": plain_decode,
                               "identical_to_plain": bool(torch.equal(tokens, plain_tokens))})
        plain_ttft = sum(b[1] for b in baseline)
        plain_decode = sum(b[2] for b in baseline)
        row = {"spec": spec.text, "kind": spec.kind, **description, "k": "adaptive" if spec.adaptive else spec.k,
               "k_max": spec.k_max, **total.summary(),
               "decode_speedup": plain_decode / total_decode,
               "end_to_end_speedup": (plain_ttft + plain_decode) / (total_ttft + total_decode),
               "plain_decode_ms_per_token": 1e3 * plain_decode / (len(prompts) * (args.new_tokens - 1)),
               "speculative_decode_ms_per_token": 1e3 * total_decode / (len(prompts) * (args.new_tokens - 1)),
               "identical_to_plain": all(p["identical_to_plain"] for p in per_prompt) if args.temperature == 0 else None,
               "median_prompt_acceptance_rate": statistics.median(p["acceptance_rate"] for p in per_prompt),
               "prompts": per_prompt}
        rows.append(row)
        save(rows)
        print(f"{spec.text}: acceptance {row['acceptance_rate']:.3f}, {row['tokens_per_verify_pass']:.2f} tokens "
              f"per verify pass, decode speedup {row['decode_speedup']:.2f}x", file=sys.stderr)
    return rows


def default_output(args, label: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{args.model.split('/')[-1]}{'_random' if args.random_init else ''}")
    return REPO_ROOT / "results" / f"{slug}_speculative_{label}.json"


def run(args) -> Path:
    specs = check_args(args)
    dtype = cli.dtype_of(args)
    torch.manual_seed(args.seed)
    loaded = cli.load(args, args.attn_implementation, args.data_dir)
    header = cli.result_header(
        args, loaded, decoder=args.decoder, target_press=args.press,
        target_compression_ratio=args.compression_ratio if args.press else None, temperature=args.temperature,
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    if args.verify_costs:
        output = args.output or default_output(args, "costs")
        header |= {"decoder": "neox", "temperature": None, "target_press": None}
        rows = measure_costs(args, loaded, dtype, save=lambda payload: write_json_atomic(output, header | payload))["rows"]
        columns = ["what", "batch_size", "tokens", "ms", "ratio_to_decode_step", "first_call_s"]
    else:
        output = args.output or default_output(args, "-".join(sorted({s.kind for s in specs})))
        rows = speculative_rows(args, loaded, specs, dtype,
                                save=lambda rows: write_json_atomic(output, header | {"rows": rows}))
        columns = ["spec", "acceptance_rate", "alpha", "tokens_per_verify_pass", "decode_speedup",
                   "end_to_end_speedup", "identical_to_plain"]
    cli.print_summary(args, loaded, rows, columns, output)
    return output


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli.one_line_errors(SpecError):
        run(args)


if __name__ == "__main__":
    main()
