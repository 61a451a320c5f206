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
from pathlib import Path

import torch

from decoding.registry import ALIASES, SPECULATIVE_DECODERS
from evaluation import cli
from evaluation.drafts import Spec, SpecError, parse_spec
from evaluation.models import REPO_ROOT
from evaluation.results import write_json_atomic
from evaluation.speculative_costs import measure_costs
from evaluation.speculative_rows import cache_kind, speculative_rows
from presses import make_press


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
