"""The roofline of one decoder step of a model (evaluation/roofline.py): per operator FLOPs, bytes,
arithmetic intensity, the bound and its floor, then the step's floor, for decode (--new_tokens 1)
or prefill at any batch and cache length.

  python evaluation/step_floor.py --model EleutherAI/pythia-2.8b --batch 1 --cache 2000 --measure
  python evaluation/step_floor.py --cache 2000 --bandwidth 4.24 --peak_tflops 790
  python evaluation/step_floor.py --cache 2000 --gpu h200                 # a datasheet, as a lead only
  python evaluation/step_floor.py --cache 2000 --measure --weight_quant int8   # int8 weights, fp16 KV

The ceilings are measured on the machine that runs (``--measure``, evaluation/ceilings.py: a
device-to-device copy, a weight-sized GEMV and a matrix product) or given (``--bandwidth`` TB/s,
``--peak_tflops``); datasheet figures (``--gpu``) are leads. ``--model`` takes a Pythia size
offline (configs/models/), or a hub id / local folder whose config.json is read.
"""

from decoding.weight_quant import SCHEMES
from evaluation import ceilings as ceilings_module
from evaluation.ceilings import DATASHEETS, RECORDED
from evaluation.cli import Parser, one_line_errors
from evaluation.roofline import load_config, step_bytes, step_floor_ms, table


def main(argv=None) -> None:
    parser = Parser(__file__, __doc__)
    parser.add_argument("--model", default="EleutherAI/pythia-2.8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cache", type=float, nargs="+", default=[2000],
                        help="tokens already cached (after compression): one for every layer, or one per layer")
    parser.add_argument("--new_tokens", type=int, default=1, help="1: decode step; the prompt length: prefill")
    parser.add_argument("--weight_quant", default="none", choices=SCHEMES,
                        help="weights at the bytes of decoding/weight_quant.py (int8 / fp8: 1 a weight + a scale per channel; int4: half + a scale and zero per 128 inputs)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--measure", nargs="?", const="cuda", metavar="DEVICE",
                        help="measure the ceilings on this device now (default cuda)")
    source.add_argument("--bandwidth", type=float, help="memory bandwidth, TB/s (with --peak_tflops)")
    source.add_argument("--gpu", choices=sorted(DATASHEETS | RECORDED), help="a datasheet's figures (leads only)")
    parser.add_argument("--peak_tflops", type=float, help="matmul rate with --bandwidth, TFLOP/s")
    args = parser.parse_args(argv)
    with one_line_errors():
        config = load_config(args.model)  # before measuring: a model without a config fails at once
    if args.bandwidth is not None:
        if args.peak_tflops is None:
            parser.error("--bandwidth needs --peak_tflops")
        ceilings = ceilings_module.given(args.bandwidth * 1e12, args.peak_tflops * 1e12)
    elif args.gpu:
        ceilings = ceilings_module.named(args.gpu)
    else:
        ceilings = ceilings_module.measure(args.measure)
    cache = args.cache[0] if len(args.cache) == 1 else args.cache
    print(f"{args.model}, batch {args.batch}, cache {args.cache if len(args.cache) <= 4 else 'per layer'}, "
          f"{args.new_tokens} new token(s); {ceilings.source}: {ceilings.bandwidth / 1e12:.3f} TB/s, "
          f"{ceilings.peak_flops / 1e12:.0f} TFLOP/s"
          + (f", GEMV {ceilings.gemv_bandwidth / 1e12:.3f} TB/s" if ceilings.gemv_bandwidth else ""))
    quant = args.weight_quant
    print(table(config, args.batch, args.new_tokens, cache, ceilings, quant).to_string(
        index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"floor: {step_floor_ms(config, args.batch, args.new_tokens, cache, ceilings, weight_quant=quant):.3f} ms "
          f"per step ({step_bytes(config, args.batch, args.new_tokens, cache, quant) / 1e9:.3f} GB)")
    if ceilings.gemv_bandwidth:
        gemv = step_floor_ms(config, args.batch, args.new_tokens, cache, ceilings, ceilings.gemv_bandwidth, quant)
        print(f"floor at the GEMV bandwidth: {gemv:.3f} ms")
    if ceilings.datasheet and args.gpu is None:
        datasheet = ceilings_module.named(ceilings.datasheet)
        print(f"floor at the datasheet ({ceilings.datasheet}): "
              f"{step_floor_ms(config, args.batch, args.new_tokens, cache, datasheet, weight_quant=quant):.3f} ms")


if __name__ == "__main__":
    main()
