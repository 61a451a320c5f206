"""One layer's decode attention on the GPU: the split_kv kernel (decoding/split_kv_attention.py)
against SDPA as the decode step calls it, each against the bytes it must read.

  python evaluation/split_kv_speed.py --shapes 1x32x80x2000 64x32x80x2000 --output results/tmp/split_kv.json

A shape is BATCHxHEADSxDIMxCACHE (default: Pythia-2.8B's 32 heads of 80 at batch 1 over 2000 and
8000 cached tokens, and at batch 64 over 2000), fp16, one new token per sequence, every slot
visible. Each shape gets as many layers of random keys and values as make ``L2_SPAN`` bytes (at
least 2, at most 32): a decode step reads each layer's cache once, so no layer may be found in the
L2 cache from the previous call. Each back end runs once over every layer inside one CUDA graph,
replayed ``--replays`` times and timed by CUDA events: the time per layer, graph launch gaps
included as in the step. SDPA is neox_decode.attend compiled (fullgraph), so the boolean mask
goes through what inductor makes of it in the step; split_kv runs with the chunks
``split_plan`` picks (``chunks`` null in the rows) and with each of ``--chunks``. The floor: the
layer's bytes (keys, values, query and output, as evaluation/roofline.py counts attention) over
the copy bandwidth measured in the same process (evaluation/ceilings.py). Each row also has the
largest difference of its output from SDPA's on the first layer. A shape that fails records its
error and the next runs; the JSON is rewritten after every shape.
"""

import sys
from pathlib import Path

import torch
import triton

from decoding import neox_decode
from decoding.split_kv_attention import multiprocessors, split_kv_attention, split_plan
from evaluation import cli
from evaluation.ceilings import machine_ceilings
from evaluation.results import environment, table, write_json_atomic

L2_SPAN = 512 * 2**20  # bytes of keys and values cycled through: ten times an H200's L2 cache
COLUMNS = ["shape", "backend", "chunks", "layers", "us_per_layer", "floor_us", "over_floor", "tb_per_s",
           "max_abs_difference", "error"]


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = text.split("x")
    if len(parts) != 4 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"bad shape {text!r}: BATCHxHEADSxDIMxCACHE, e.g. 1x32x80x2000")
    return tuple(int(part) for part in parts)


def graph_us(run, replays: int) -> float:
    """Microseconds per call of ``run`` captured in a CUDA graph, after warm-up off the capture
    (Triton compiles, inductor traces, cuDNN plans)."""
    warmup = torch.cuda.Stream()
    warmup.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warmup):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(warmup)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / replays


def measure_shape(text: str, chunk_counts: list[int], replays: int, bandwidth: float) -> list[dict]:
    batch, heads, dim, cache = parse_shape(text)
    layer_bytes = 2 * (2 * batch * heads * cache * dim + 2 * batch * heads * dim)  # fp16
    layers = max(2, min(32, triton.cdiv(L2_SPAN, layer_bytes)))
    generator = torch.Generator("cuda").manual_seed(0)
    query = torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.float16, generator=generator)
    caches = [tuple(torch.randn(batch, heads, cache, dim, device="cuda", dtype=torch.float16, generator=generator)
                    for _ in range(2)) for _ in range(layers)]
    visible = torch.ones(batch, 1, cache, device="cuda", dtype=torch.bool)
    scale = dim**-0.5
    sdpa = torch.compile(lambda keys, values: neox_decode.attend(query, keys, values, visible, scale, "sdpa"),
                         fullgraph=True)
    expected = sdpa(*caches[0])
    _, planned = split_plan(batch * heads, cache, multiprocessors(query.device))
    floor_us = 1e6 * layer_bytes / bandwidth
    rows = []
    for backend, chunks in [("sdpa", None), ("split_kv", None)] + [("split_kv", count) for count in chunk_counts]:
        row = {"shape": text, "batch": batch, "heads": heads, "head_dim": dim, "cache_tokens": cache,
               "layers": layers, "backend": backend, "chunks": chunks,
               "planned_chunks": planned if backend == "split_kv" and chunks is None else None,
               "bytes": layer_bytes, "floor_us": floor_us}
        if backend == "sdpa":
            attend = sdpa
        else:
            def attend(keys, values, chunks=chunks):
                return split_kv_attention(query, keys, values, visible, scale, chunks)
        try:
            us = graph_us(lambda: [attend(keys, values) for keys, values in caches], replays) / layers
            difference = (attend(*caches[0]).float() - expected.float()).abs().max().item()
            row |= {"us_per_layer": us, "over_floor": us / floor_us, "tb_per_s": layer_bytes / us / 1e6,
                    "max_abs_difference": difference}
        except Exception as error:  # noqa: BLE001 -- one back end's failure is its result, the next runs
            row["error"] = f"{type(error).__name__}: {error}"[:2000]
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = cli.Parser(__file__, __doc__)
    parser.add_argument("--shapes", nargs="+", default=["1x32x80x2000", "1x32x80x8000", "64x32x80x2000"])
    parser.add_argument("--chunks", type=int, nargs="*", default=[1, 4, 8, 16, 32, 64],
                        help="chunk counts tried beside split_plan's")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--output", type=Path, default=Path("results/split_kv_speed.json"))
    args = parser.parse_args(argv)
    with cli.one_line_errors(ValueError):
        for text in args.shapes:
            parse_shape(text)
    if not torch.cuda.is_available():
        cli.fail("the kernels are timed on a CUDA device")
    ceilings = machine_ceilings("cuda")
    header = {"command": args.command, "dtype": "float16", "triton": triton.__version__,
              "multiprocessors": multiprocessors(torch.device("cuda")), "ceilings": ceilings.to_json(),
              "environment": environment("cuda")}
    rows = []
    for text in args.shapes:
        try:
            rows += measure_shape(text, args.chunks, args.replays, ceilings.bandwidth)
        except Exception as error:  # noqa: BLE001 -- a shape that fails to set up (memory) is its result
            rows.append({"shape": text, "error": f"{type(error).__name__}: {error}"[:2000]})
        print(table([row for row in rows if row["shape"] == text], COLUMNS), file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
        write_json_atomic(args.output, header | {"rows": rows})
    print(f"copy {ceilings.bandwidth / 1e12:.3f} TB/s; wrote {args.output}")


if __name__ == "__main__":
    main()
