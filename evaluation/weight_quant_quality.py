"""What weight-only quantization costs in perplexity: the context protocol (evaluation/protocols.py)
on the same windows with the model's own weights and with every Linear's weights quantized
(decoding/weight_quant.py), dense, and each quantized row's paired difference to the first with
its 95% interval over the windows (evaluation/intervals.py).

  python evaluation/weight_quant_quality.py --model smollm2-135m --context_tokens 1536 --num_windows 32
  python evaluation/weight_quant_quality.py --model smollm2-135m --context_tokens 1536 --weights int8 fp8 \\
      --weight_quant_library quanto --num_windows 4
  python evaluation/weight_quant_quality.py --model smollm2-135m --device cuda --dtype bfloat16 --weights int4 \\
      --int4_group 64

int4 (torchao's tinygemm layout, CUDA only) takes bf16 inputs: run it with ``--dtype bfloat16``, so that
the model's own weights are scored in bf16 too, and with ``--int4_group`` dividing every Linear's inputs
(SmolLM2-135M's 576 = 9 x 64: 64; Pythia's 2560 and 10240: the speed path's 128).

evaluation/perplexity.py --weight_quant runs its presses on quantized weights, each against a dense
row on the same weights; this program holds the weights themselves against the model's.
"""

import copy
import sys
from pathlib import Path

from decoding.weight_quant import INT4_GROUP, INT4_GROUPS, LIBRARIES, SCHEMES, quantize_weights
from evaluation import cli
from evaluation.intervals import paired_difference
from evaluation.models import data_dir, tokenized_text
from evaluation.protocols import check_windows, context_nll
from evaluation.quality import context_tokens, quality_facts
from evaluation.results import write_json_atomic

COLUMNS = ["weight_quant", "library", "ppl", "ppl_ci95", "delta_pct", "delta_pct_ci95", "scored_tokens"]


def parse_args(argv=None):
    parser = cli.Parser(__file__, __doc__)
    cli.add_model_options(parser, default_model="smollm2-135m")
    parser.add_argument("--weights", nargs="+", default=["int8"], choices=[s for s in SCHEMES if s != "none"],
                        help="the schemes held against the model's own weights")
    parser.add_argument("--weight_quant_library", default="torchao", choices=LIBRARIES)
    parser.add_argument("--int4_group", type=int, default=INT4_GROUP, choices=INT4_GROUPS,
                        help="int4: inputs per scale and zero point")
    cli.add_data_options(parser, what="the text scored")
    parser.add_argument("--eval_tokens", type=int, default=512, help="tokens scored per window (M)")
    parser.add_argument("--context_tokens", type=int, help="tokens prefilled (N); default: model context - M")
    parser.add_argument("--num_windows", type=int, default=32)
    parser.add_argument("--output", type=Path, default=Path("results/weight_quant_quality.json"))
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli.one_line_errors():
        if args.random_init:
            cli.fail("--random-init has random weights: its perplexity means nothing")
        if "int4" in args.weights and cli.dtype_of(args) != "bfloat16":
            cli.fail("int4 weights take bf16 inputs (tinygemm): run with --dtype bfloat16, the model's own row too")
        text = tokenized_text(args.model, False, args.dataset, data_dir(args.data_dir), args.sample_idx)
        context = context_tokens(args, text.config)
        check_windows(text.ids.numel(), text.config.max_position_embeddings, context, args.eval_tokens,
                      args.num_windows)
        loaded = cli.load(args, data_dir=args.data_dir)
    rows = []
    for scheme in ["none"] + args.weights:
        model = loaded.model if scheme == "none" else quantize_weights(
            copy.deepcopy(loaded.model), scheme, args.weight_quant_library, args.int4_group)
        result = context_nll(model, text.ids, None, context, args.eval_tokens, args.num_windows)
        row = {"weight_quant": scheme, "library": None if scheme == "none" else args.weight_quant_library,
               "int4_group": args.int4_group if scheme == "int4" else None,
               "context_tokens": context, "eval_tokens": args.eval_tokens, "num_windows": args.num_windows,
               "data": text.source} | quality_facts(result)
        if rows:
            row |= paired_difference(row["unit_nll"], rows[0]["unit_nll"], row["unit_tokens"])
        rows.append(row)
        print(f"{scheme}: ppl {result.ppl:.4f}", file=sys.stderr, flush=True)
    write_json_atomic(args.output, cli.result_header(args, loaded, protocol="context", press=None) | {"rows": rows})
    cli.print_summary(args, loaded, rows, COLUMNS, args.output, "context protocol, dense")


if __name__ == "__main__":
    main()
