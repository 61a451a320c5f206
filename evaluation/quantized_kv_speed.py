"""One layer's decode attention over fp16 and over 8-bit and 4-bit KV, each against the bytes it must
read: SDPA and split_kv (decoding/split_kv_attention.py) over fp16, the quantized kernel
(decoding/quantized_kv_attention.py) at each ``--bits`` pair, keys stored centred by their channel
statistics as the presses store them.

  python evaluation/quantized_kv_speed.py --shapes 1x32x80x2000 64x32x80x2000 --output results/tmp/quantized_kv.json

A shape is BATCHxHEADSxDIMxCACHE (split_kv_speed.py's), one new token per sequence, every slot
visible. Each format gets as many layers of random keys and values as make ``--span_mib`` of its own
bytes (at least 2, at most ``MAX_LAYERS``), so no layer is found in the L2 cache from the previous
call, and runs once over every layer inside one CUDA graph replayed ``--replays`` times
(split_kv_speed.py's ``graph_us``); on a CPU (the tests: Triton's interpreter) a host clock times
the calls instead, which says only that the path runs. SDPA is neox_decode.attend compiled
(fullgraph) on a GPU, as in split_kv_speed.py; split_kv and the quantized kernel run every
``--configs`` launch (``KernelConfig``), the same list for both, and ``best`` names per shape and
format the fastest whose output agrees with its reference (SDPA over fp16 for split_kv; SDPA in
fp32 over the dequantized first layer for the quantized kernel) within ``AGREEMENT``.

The floor of a format: its layer's bytes (codes, the fp16 scale and zero point per (token, head),
the keys' fp16 channel scale, the fp16 query and output; the visibility mask is not counted, as
split_kv_speed.py does not) over the copy bandwidth measured in the same process
(evaluation/ceilings.py). The JSON is rewritten after every row; past ``--time_limit_s`` the rest is
recorded as skipped.
"""

import math
import sys
import time
from pathlib import Path

import torch
import triton

from decoding import neox_decode
from decoding.quantized_kv_attention import attend_quantized, check_bits, quantize_kv
from decoding.split_kv_attention import multiprocessors, parse_config, split_kv_attention
from evaluation import cli
from evaluation.ceilings import machine_ceilings
from evaluation.results import environment, table, write_json_atomic
from evaluation.split_kv_speed import AGREEMENT, graph_us, parse_shape

MAX_LAYERS = 64  # 4-bit layers are small: at batch 1 over 2000 tokens, 64 of them make 360 MB
COLUMNS = ["shape", "format", "config", "layers", "us_per_layer", "floor_us", "over_floor", "tb_per_s",
           "max_abs_difference", "error"]
FP16_BYTES = 2
# the best split_kv launches of the H200 sweep (results/pythia-2.8b_random_split_kv_h200/tuned_b3755ff),
# the default's, and larger and smaller blocks for the quantized kernel's smaller tiles
DEFAULT_CONFIGS = ["128x2x3", "128x2x4", "128x2x1x16", "64x4x3", "128x4x3", "256x4x2", "32x2x2"]


def parse_bits(text: str) -> tuple[int, int]:
    parts = text.split("x")
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        raise ValueError(f"bad bits {text!r}: KEYxVALUE, e.g. 4x4")
    key_bits, value_bits = int(parts[0]), int(parts[1])
    check_bits(key_bits)
    check_bits(value_bits)
    return key_bits, value_bits


def layer_bytes(batch: int, heads: int, dim: int, cache: int, bits: tuple[int, int] | None) -> int:
    """Bytes one layer's attention reads and writes: the cache (fp16 when ``bits`` is None, else
    codes and per-(token, head) sides, and the keys' channel scale) and the fp16 query and output."""
    edges = 2 * FP16_BYTES * batch * heads * dim
    if bits is None:
        return 2 * FP16_BYTES * batch * heads * cache * dim + edges
    groups = batch * heads * cache
    codes = sum(groups * dim * b // 8 + groups * 2 * FP16_BYTES for b in bits)
    return codes + FP16_BYTES * batch * heads * dim + edges


def host_us(run, replays: int) -> float:
    """Microseconds per call of ``run`` by the host clock, after one call (the CPU path)."""
    run()
    start = time.perf_counter()
    for _ in range(replays):
        run()
    return 1e6 * (time.perf_counter() - start) / replays


def measure_shape(text: str, configs: list, bit_pairs: list, args, bandwidth: float, deadline: float):
    """The shape's rows, yielded as each is measured: SDPA and split_kv over fp16, then each bits pair."""
    batch, heads, dim, cache = parse_shape(text)
    device = torch.device(args.device)
    timer = graph_us if device.type == "cuda" else host_us
    generator = torch.Generator(device).manual_seed(0)
    query = torch.randn(batch, heads, 1, dim, device=device, dtype=torch.float16, generator=generator)
    visible = torch.ones(batch, 1, cache, device=device, dtype=torch.bool)
    scale = dim**-0.5

    def random_layers(bits):
        count = max(2, min(MAX_LAYERS, triton.cdiv(args.span_mib * 2**20, layer_bytes(batch, heads, dim, cache, bits))))
        for _ in range(count):
            keys, values = (torch.randn(batch, heads, cache, dim, device=device, dtype=torch.float16,
                                        generator=generator) for _ in range(2))
            yield (keys, values) if bits is None else quantize_kv(keys, values, *bits, centre_keys=True)

    def sdpa(keys, values):
        return neox_decode.attend(query, keys, values, visible, scale, "sdpa")

    sdpa_step = torch.compile(sdpa, fullgraph=True) if device.type == "cuda" else sdpa

    def format_runs(bits):
        """The format's layers, its reference output on the first, and its (name, config, attend) runs."""
        layers = list(random_layers(bits))
        if bits is None:
            def split_kv(layer, config):
                return split_kv_attention(query, *layer, visible, scale, config.chunks, config.block, config.warps,
                                          config.stages)
            runs = [("sdpa_fp16", None, lambda layer: sdpa_step(*layer))]
            runs += [("split_kv_fp16", config, lambda layer, config=config: split_kv(layer, config))
                     for config in configs]
            return layers, sdpa_step(*layers[0]).float(), runs
        expected = neox_decode.attend(query.float(), *layers[0].dequantize(), visible, scale, "sdpa")
        return layers, expected, [(f"quantized_k{bits[0]}v{bits[1]}", config,
                                   lambda layer, config=config: attend_quantized(query, layer, visible, scale, config))
                                  for config in configs]

    for bits in [None, *bit_pairs]:
        layers, expected, runs = format_runs(bits)
        for name, config, attend in runs:
            if time.monotonic() > deadline:
                yield {"shape": text, "format": name, "error": "skipped: past --time_limit_s"}
                continue
            nbytes = layer_bytes(batch, heads, dim, cache, bits)
            floor_us = 1e6 * nbytes / bandwidth
            row = {"shape": text, "format": name, "key_bits": bits and bits[0], "value_bits": bits and bits[1],
                   "config": config and str(config), "layers": len(layers), "bytes": nbytes, "floor_us": floor_us}
            try:
                us = timer(lambda: [attend(layer) for layer in layers], args.replays) / len(layers)
                difference = (attend(layers[0]).float() - expected).abs().max().item()
                row |= {"us_per_layer": us, "over_floor": us / floor_us, "tb_per_s": nbytes / us / 1e6,
                        "max_abs_difference": difference}
            except Exception as error:  # noqa: BLE001 -- one launch's failure (shared memory) is its result
                row["error"] = f"{type(error).__name__}: {error}"[:2000]
            yield row
        del layers, expected, runs  # this format's memory freed before the next one's is made


def best_formats(rows: list[dict]) -> dict:
    """Per shape and format, the fastest row that agrees with its reference, against SDPA's time."""
    best = {}
    for row in rows:
        # "not <=": a NaN difference disagrees
        if "us_per_layer" not in row or not row["max_abs_difference"] <= AGREEMENT:
            continue
        kept = best.setdefault(row["shape"], {}).get(row["format"])
        if kept is None or row["us_per_layer"] < kept["us_per_layer"]:
            best[row["shape"]][row["format"]] = row
    keys = ("config", "us_per_layer", "bytes", "floor_us", "over_floor", "tb_per_s", "max_abs_difference")
    summary = {}
    for shape, formats in best.items():
        sdpa = formats.get("sdpa_fp16", {}).get("us_per_layer")
        summary[shape] = {name: {key: row[key] for key in keys} | {"over_sdpa": sdpa and row["us_per_layer"] / sdpa}
                          for name, row in formats.items()}
    return summary


def main(argv=None) -> None:
    parser = cli.Parser(__file__, __doc__)
    parser.add_argument("--shapes", nargs="+", default=["1x32x80x2000", "64x32x80x2000", "1x32x80x8000"])
    parser.add_argument("--bits", nargs="+", default=["8x8", "4x4"], help="KEYxVALUE bits of the quantized runs")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="BLOCKxWARPSxSTAGES[xCHUNKS] launches of split_kv and the quantized kernel")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--span_mib", type=float, default=512, help="bytes of layers cycled through per format")
    parser.add_argument("--device", default="cuda", help="cuda; cpu runs Triton's interpreter (tests only)")
    parser.add_argument("--time_limit_s", type=float, default=math.inf,
                        help="measure nothing past this many seconds (the rest recorded as skipped)")
    parser.add_argument("--output", type=Path, default=Path("results/quantized_kv_speed.json"))
    args = parser.parse_args(argv)
    with cli.one_line_errors(ValueError):
        for text in args.shapes:
            parse_shape(text)
        bit_pairs = [parse_bits(text) for text in args.bits]
        configs = [parse_config(text) for text in args.configs]
    if args.device == "cuda" and not torch.cuda.is_available():
        cli.fail("the kernels are timed on a CUDA device (--device cpu: the interpreter, for tests)")
    deadline = time.monotonic() + args.time_limit_s
    ceilings = machine_ceilings(args.device)
    header = {"command": args.command, "device": args.device, "triton": triton.__version__,
              "multiprocessors": multiprocessors(torch.device(args.device)), "agreement": AGREEMENT,
              "ceilings": ceilings.to_json(), "environment": environment(args.device)}
    rows = []
    for text in args.shapes:
        if time.monotonic() > deadline:
            rows.append({"shape": text, "error": "skipped: past --time_limit_s"})
            continue
        try:
            for row in measure_shape(text, configs, bit_pairs, args, ceilings.bandwidth, deadline):
                rows.append(row)
                write_json_atomic(args.output, header | {"best": best_formats(rows), "rows": rows})
        except Exception as error:  # noqa: BLE001 -- a shape that fails to set up (memory) is its result
            rows.append({"shape": text, "error": f"{type(error).__name__}: {error}"[:2000]})
        print(table([row for row in rows if row["shape"] == text], COLUMNS), file=sys.stderr, flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        write_json_atomic(args.output, header | {"best": best_formats(rows), "rows": rows})
    for shape, formats in best_formats(rows).items():
        for name, best in formats.items():
            print(f"{shape} {name}: {best['config'] or '-'}, {best['us_per_layer']:.1f} us per layer "
                  f"({best['over_floor']:.2f}x its floor, {best['over_sdpa'] or math.nan:.2f}x SDPA's)")
    print(f"copy {ceilings.bandwidth / 1e12:.3f} TB/s; wrote {args.output}")


if __name__ == "__main__":
    main()
