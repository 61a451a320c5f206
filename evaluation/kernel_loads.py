"""How the quantized-KV decode kernel reads and converts its codes, seen without a GPU: its partial
kernel (decoding/quantized_kv_attention.py) compiled for an H100/H200 (sm_90) from the arguments the
op would launch it with at a given shape, specialised by Triton's own rules (its binder: integers
that are 1 or multiples of 16, pointer alignment), and the PTX's global loads counted by width and
its conversions (``cvt``) by form.

A code tile loaded byte by byte (``ld.global.b8``, one per element) instead of in vectors
(``ld.global.v2.b32``, 8 bytes) is what made 4-bit KV 3x slower than 8-bit on the H200
(results/pythia-2.8b_random_quantized_kv_h200/); an integer-to-float conversion per code element
(``cvt.rn.f32.u32``: by the CUDA guide's table 16 a clock per SM against 128 fp32 adds) is the next suspect for
both widths' cost at batch 64. tests/test_kernel_loads.py keeps both from coming back.

    TRITON_INTERPRET=0 python evaluation/kernel_loads.py --bits 8 4 --slots 2000

Uses Triton's private binder and argument packing (pinned: triton==3.7.1), so that the kernel is
specialised exactly as a launch would specialise it.
"""

import argparse
import json
import os
import re
from collections import Counter

import torch

from evaluation.cli import one_line_errors

TARGET = ("cuda", 90, 32)  # Hopper: the H100 and H200 the project times on


def compiled_ptx(bits: int, batch: int, heads: int, dim: int, slots: int, config) -> str:
    """The PTX of the partial kernel for ``bits``-bit keys and values at this shape and launch (a
    split_kv ``KernelConfig``)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("TRITON_INTERPRET=1 replaces kernels by the interpreter: run with TRITON_INTERPRET=0")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    from decoding.quantized_kv_attention import partial_arguments, quantize_kv
    from decoding.quantized_kv_attention import quantized_kv_attention_partial as kernel
    from decoding.split_kv_attention import empty_partials, launch_plan

    query = torch.randn(batch, heads, 1, dim, dtype=torch.float16)
    keys, values = torch.randn(2, batch, heads, slots, dim, dtype=torch.float16)
    cache = quantize_kv(keys, values, bits, bits, centre_keys=False)
    visible = torch.ones(batch, 1, slots, dtype=torch.bool)
    # the chunking is the op's own plan (on this CPU, the interpreter's): the kernel is not specialised on it
    chunk, chunks = launch_plan(batch * heads, slots, query.device, config)
    arguments, constants = partial_arguments(
        query, cache.keys.codes, cache.keys.scale, cache.keys.zero, cache.values.codes, cache.values.scale,
        cache.values.zero, visible, dim**-0.5, bits, bits, None, empty_partials(query, chunks), chunk, chunks,
        config.block)
    target = GPUTarget(*TARGET)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    launch = constants | {"num_warps": config.warps, "num_stages": config.stages}
    bound, specialization, options = binder(*arguments, **launch)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch, bound, specialization, options)
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__).asm["ptx"]


def global_loads(ptx: str) -> dict[str, int]:
    """Count of each ``ld.global`` instruction form (``ld.global.v2.b32``, ``ld.global.b8``, ...)."""
    return dict(Counter(re.findall(r"ld\.global(?:\.\w+)*", ptx)).most_common())


def conversions(ptx: str) -> dict[str, int]:
    """Count of each ``cvt`` instruction form (``cvt.rn.f32.u32``: integer to float, ...)."""
    return dict(Counter(re.findall(r"\bcvt(?:\.\w+)+", ptx)).most_common())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4], choices=[8, 4])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=80, help="head dim (Pythia-2.8B: 80)")
    parser.add_argument("--slots", type=int, default=2000)
    parser.add_argument("--config", default="128x2x4", help="BLOCKxWARPSxSTAGES, as split_kv's KernelConfig")
    args = parser.parse_args(argv)
    from decoding.split_kv_attention import parse_config

    config = parse_config(args.config)
    ptx = {str(bits): compiled_ptx(bits, args.batch, args.heads, args.dim, args.slots, config) for bits in args.bits}
    print(json.dumps({"target": "sm_%d" % TARGET[1], "config": args.config,
                      "loads_per_thread": {bits: global_loads(text) for bits, text in ptx.items()},
                      "conversions_per_thread": {bits: conversions(text) for bits, text in ptx.items()}}, indent=1))


if __name__ == "__main__":
    with one_line_errors(ValueError):
        main()
