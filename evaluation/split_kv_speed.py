"""One layer's decode attention on the GPU: the split_kv kernel (decoding/split_kv_attention.py)
against SDPA as the decode step calls it, each against the bytes it must read, and a sweep of the
kernel's launch (``KernelConfig``) that names the fastest per shape.

  python evaluation/split_kv_speed.py --shapes 1x32x80x2000 64x32x80x2000 --output results/tmp/split_kv.json

A shape is BATCHxHEADSxDIMxCACHE (default: Pythia-2.8B's 32 heads of 80 at batch 1 over 2000 and
8000 cached tokens, and at batch 64 over 2000), fp16, one new token per sequence, every slot
visible. Each shape gets as many layers of random keys and values as make ``L2_SPAN`` bytes (at
least 2, at most 32): a decode step reads each layer's cache once, so no layer may be found in the
L2 cache from the previous call. Each back end runs once over every layer inside one CUDA graph,
replayed ``--replays`` times and timed by CUDA events: the time per layer, graph launch gaps
included as in the step. SDPA is neox_decode.attend compiled (fullgraph), so the boolean mask
goes through what inductor makes of it in the step. split_kv runs every configuration of the grid
``--blocks`` x ``--warps`` x ``--stages`` x chunk counts (``split_plan``'s, ``chunks`` null in the
rows, and each of ``--chunks``): by default 3 x 3 x 4 x 3 = 108 per shape, each (block, warps,
stages) compiled once; a minute or two on an H200 for the three shapes, an estimate, never timed.
The floor: the layer's bytes (keys, values, query and output, as evaluation/roofline.py counts
attention) over the copy bandwidth measured in the same process (evaluation/ceilings.py). Each row
also has the largest difference of its output from SDPA's on the first layer.

``--sdpa_kernels cudnn efficient math`` adds rows ``sdpa_NAME``: SDPA held to that back end
(``torch.nn.attention.sdpa_kernel`` inside the compiled call), to see which kernel the default
dispatch runs and whether another reads short caches at a large batch faster (``--blocks`` with no
value leaves split_kv out).

``best`` in the JSON: per shape, the fastest configuration whose output is within ``AGREEMENT`` of
SDPA's, with its time against the floor and against SDPA's; its ``config`` (BLOCKxWARPSxSTAGES,
then xCHUNKS where a chunk count beat split_plan's) is what evaluation/speed_frontier.py's
``--split_kv_config`` takes. A configuration that fails (one that does not fit the shared memory)
records its error; a shape that fails to set up records its error and the next runs; past
``--time_limit_s`` the rest of the shapes are recorded as skipped (the first shape is the one the
decode step runs). The JSON is rewritten after every row.
"""

import math
import sys
import time
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from decoding import neox_decode
from decoding.split_kv_attention import KernelConfig, launch_plan, multiprocessors, split_kv_attention
from evaluation import cli
from evaluation.ceilings import machine_ceilings
from evaluation.results import environment, table, write_json_atomic

L2_SPAN = 512 * 2**20  # bytes of keys and values cycled through: ten times an H200's L2 cache
COLUMNS = ["shape", "backend", "config", "chunks_run", "layers", "us_per_layer", "floor_us", "over_floor",
           "tb_per_s", "max_abs_difference", "error"]
# fp16 outputs agreed with SDPA's to 1.2e-4 on the first H200 call; a configuration off by more
# than this computes something else, however fast
AGREEMENT = 1e-2
SHOWN = 10  # the fastest configurations printed per shape (the JSON has them all)
# --sdpa_kernels: SDPA held to one of its back ends (torch.nn.attention.sdpa_kernel, inside the compiled call)
SDPA_KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


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


def compiled_sdpa(query, visible, scale, kernel: str | None = None):
    """neox_decode.attend's SDPA over (keys, values), compiled whole; ``kernel``: held to that back end."""
    def attend(keys, values):
        if kernel is None:
            return neox_decode.attend(query, keys, values, visible, scale, "sdpa")
        with sdpa_kernel(SDPA_KERNELS[kernel]):
            return neox_decode.attend(query, keys, values, visible, scale, "sdpa")
    return torch.compile(attend, fullgraph=True)


def measure_shape(text: str, configs: list[KernelConfig], replays: int, bandwidth: float, deadline: float,
                  sdpa_kernels: tuple[str, ...] = ()):
    """The shape's rows, SDPA's first, then SDPA held to each of ``sdpa_kernels`` (``sdpa_NAME``),
    then one per configuration, yielded as each is measured; past ``deadline`` (time.monotonic) a
    last row says how many were left unmeasured."""
    batch, heads, dim, cache = parse_shape(text)
    # Every compiled_sdpa is the same code object to dynamo, so its compilations pile up across
    # shapes and back ends until dynamo's recompile limit (8) fails one (the fifth shape of a call
    # with three --sdpa_kernels did on the H200): start each shape with none; a shape compiles
    # 1 + len(sdpa_kernels) times
    torch._dynamo.reset()
    layer_bytes = 2 * (2 * batch * heads * cache * dim + 2 * batch * heads * dim)  # fp16
    layers = max(2, min(32, triton.cdiv(L2_SPAN, layer_bytes)))
    generator = torch.Generator("cuda").manual_seed(0)
    query = torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.float16, generator=generator)
    caches = [tuple(torch.randn(batch, heads, cache, dim, device="cuda", dtype=torch.float16, generator=generator)
                    for _ in range(2)) for _ in range(layers)]
    visible = torch.ones(batch, 1, cache, device="cuda", dtype=torch.bool)
    scale = dim**-0.5
    sdpa = compiled_sdpa(query, visible, scale)
    expected = sdpa(*caches[0])
    floor_us = 1e6 * layer_bytes / bandwidth
    runs = [("sdpa", None)] + [(f"sdpa_{kernel}", kernel) for kernel in sdpa_kernels] + [
        ("split_kv", config) for config in configs]
    for done, (backend, config) in enumerate(runs):
        if time.monotonic() > deadline:
            yield {"shape": text, "error": f"skipped: past --time_limit_s, {len(runs) - done} of {len(runs)} "
                                           "runs left unmeasured"}
            return
        row = {"shape": text, "batch": batch, "heads": heads, "head_dim": dim, "cache_tokens": cache,
               "layers": layers, "backend": backend, "bytes": layer_bytes, "floor_us": floor_us}
        if backend == "sdpa":
            attend = sdpa
        elif backend.startswith("sdpa_"):
            attend = compiled_sdpa(query, visible, scale, config)
        else:
            row |= {"config": str(config), "block": config.block, "warps": config.warps, "stages": config.stages,
                    "chunks": config.chunks, "chunks_run": launch_plan(batch * heads, cache, query.device, config)[1]}

            def attend(keys, values, config=config):
                return split_kv_attention(query, keys, values, visible, scale, config.chunks, config.block,
                                          config.warps, config.stages)
        try:
            us = graph_us(lambda: [attend(keys, values) for keys, values in caches], replays) / layers
            difference = (attend(*caches[0]).float() - expected.float()).abs().max().item()
            row |= {"us_per_layer": us, "over_floor": us / floor_us, "tb_per_s": layer_bytes / us / 1e6,
                    "max_abs_difference": difference}
        except Exception as error:  # noqa: BLE001 -- one configuration's failure is its result, the next runs
            row["error"] = f"{type(error).__name__}: {error}"[:2000]
        yield row


def best_configs(rows: list[dict]) -> dict:
    """Per shape, the fastest split_kv row whose output agrees with SDPA's, against SDPA's time."""
    sdpa = {row["shape"]: row["us_per_layer"] for row in rows if row.get("backend") == "sdpa" and "us_per_layer" in row}
    best = {}
    for row in rows:
        # written "not <=" so that a NaN difference counts as disagreeing
        if row.get("backend") != "split_kv" or "us_per_layer" not in row or not row["max_abs_difference"] <= AGREEMENT:
            continue
        if row["shape"] not in best or row["us_per_layer"] < best[row["shape"]]["us_per_layer"]:
            best[row["shape"]] = row
    keys = ("config", "block", "warps", "stages", "chunks", "chunks_run", "us_per_layer", "over_floor", "tb_per_s",
            "max_abs_difference")
    return {shape: {key: row[key] for key in keys} | {
        "sdpa_us_per_layer": sdpa.get(shape),
        "over_sdpa": row["us_per_layer"] / sdpa[shape] if shape in sdpa else None} for shape, row in best.items()}


def shown(rows: list[dict]) -> list[dict]:
    """What the terminal gets of a shape: SDPA, the SHOWN fastest configurations, and the errors."""
    timed = sorted((row for row in rows if row.get("backend") == "split_kv" and "us_per_layer" in row),
                   key=lambda row: row["us_per_layer"])
    return [row for row in rows if row.get("backend", "").startswith("sdpa")] + timed[:SHOWN] + [
        row for row in rows if "error" in row and not row.get("backend", "").startswith("sdpa")]


def main(argv=None) -> None:
    parser = cli.Parser(__file__, __doc__)
    parser.add_argument("--shapes", nargs="+", default=["1x32x80x2000", "1x32x80x8000", "64x32x80x2000"])
    parser.add_argument("--blocks", type=int, nargs="*", default=[32, 64, 128],
                        help="slots per loop iteration of split_kv (none: no split_kv rows)")
    parser.add_argument("--sdpa_kernels", nargs="*", default=[], choices=sorted(SDPA_KERNELS),
                        help="SDPA also held to each of these back ends (rows sdpa_NAME beside the default dispatch)")
    parser.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--chunks", type=int, nargs="*", default=[16, 64],
                        help="chunk counts tried beside split_plan's")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--time_limit_s", type=float, default=math.inf,
                        help="measure nothing past this many seconds (the rest recorded as skipped)")
    parser.add_argument("--output", type=Path, default=Path("results/split_kv_speed.json"))
    args = parser.parse_args(argv)
    with cli.one_line_errors(ValueError):
        for text in args.shapes:
            parse_shape(text)
        configs = [KernelConfig(block, warps, stages, chunks) for block in args.blocks for warps in args.warps
                   for stages in args.stages for chunks in [None, *args.chunks]]
    if not torch.cuda.is_available():
        cli.fail("the kernels are timed on a CUDA device")
    deadline = time.monotonic() + args.time_limit_s
    ceilings = machine_ceilings("cuda")
    header = {"command": args.command, "dtype": "float16", "triton": triton.__version__,
              "multiprocessors": multiprocessors(torch.device("cuda")), "agreement": AGREEMENT,
              "ceilings": ceilings.to_json(), "environment": environment("cuda")}
    rows = []
    for text in args.shapes:
        if time.monotonic() > deadline:  # not even set up: its SDPA compile alone takes seconds
            rows.append({"shape": text, "error": "skipped: past --time_limit_s"})
            continue
        try:
            for row in measure_shape(text, configs, args.replays, ceilings.bandwidth, deadline, tuple(args.sdpa_kernels)):
                rows.append(row)
                write_json_atomic(args.output, header | {"best": best_configs(rows), "rows": rows})
        except Exception as error:  # noqa: BLE001 -- a shape that fails to set up (memory) is its result
            rows.append({"shape": text, "error": f"{type(error).__name__}: {error}"[:2000]})
        print(table(shown([row for row in rows if row["shape"] == text]), COLUMNS), file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
        write_json_atomic(args.output, header | {"best": best_configs(rows), "rows": rows})
    for shape, best in best_configs(rows).items():
        print(f"{shape}: best {best['config']}, {best['us_per_layer']:.1f} us per layer "
              f"({best['over_floor']:.2f}x its floor, {best['over_sdpa'] or math.nan:.2f}x SDPA's)")
    print(f"copy {ceilings.bandwidth / 1e12:.3f} TB/s; wrote {args.output}")


if __name__ == "__main__":
    main()
