"""What one speculative iteration costs on the fast decode path (decoding/neox_decode.py: GPT-NeoX's
step written out, compiled whole with torch.compile(mode="reduce-overhead"), i.e. one CUDA graph
per shape, on a GPU):

- the target's forward of k+1 tokens (one verify pass) after a cached prompt, for each k,
  against its single-token decode step;
- the draft model's single-token step on its own cache of the same prompt;
- the self-drafts' steps: the target on a cache of each ``--self_budget`` tokens (compressed-cache
  draft), and the target skipping each ``--skip_fraction`` of its layers on the full cache
  (layer-skip draft).

Each is the median of ``--repeats`` forwards writing the same cache slots (as after a
rejection), after three untimed calls that compile and record the graphs. With these,
evaluation/speculative_speedup.py predicts the speedup for an acceptance rate (Leviathan et al.
2023). The file is rewritten after every measurement, so a run stopped by ``--time_limit_s``
keeps what it measured.
"""

import statistics
import sys
import time

import torch

from decoding import neox_cuda_graphs, neox_decode
from decoding.layer_skip import skipping_model
from evaluation.models import load_model
from evaluation.speed import synchronize


@torch.no_grad()  # with autograd on, each compiled call keeps a graph for backward and re-records its CUDA graph
def time_forward(model, buffer, tokens: torch.Tensor, repeats: int, step) -> tuple[float, float]:
    """Median seconds of one forward of ``tokens`` (batch, new) at the buffer's first free slots,
    and the seconds of the first (compiling) call."""
    device = tokens.device
    new = tokens.shape[1]
    new_index = torch.arange(new, device=device)
    positions = (buffer.kept[0] + new_index).expand(tokens.shape[0], -1)
    times = []
    for _ in range(3 + repeats):
        synchronize(device)
        start = time.perf_counter()
        step(model, neox_decode.StepState(buffer, tokens, positions, new_index))
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:]), times[0]


def spread_layers(layers: int, count: int) -> list[int]:
    """``count`` layers spread evenly over 1..layers-2 (timing does not depend on which)."""
    return sorted({round(1 + index * (layers - 3) / max(1, count - 1)) for index in range(count)})


@torch.no_grad()
def measure_costs(args, loaded, dtype: str, save) -> dict:
    """Run every measurement that fits in ``args.time_limit_s``; ``save(payload)`` after each."""
    target = loaded.model
    if target.config.model_type != "gpt_neox":
        raise ValueError("--verify_costs times the GPT-NeoX fast path (decoding/neox_decode.py): use a Pythia model")
    device = target.device
    compile = device.type == "cuda"
    if compile:  # one compiled step serves every shape, model and layer subset: allow its recompilations
        torch._dynamo.config.recompile_limit = 64
        torch._dynamo.config.accumulated_recompile_limit = 1024
    step = neox_cuda_graphs.compiled_step(compile)
    room = max(args.k_values) + 2
    deadline = time.perf_counter() + args.time_limit_s
    generator = torch.Generator().manual_seed(args.seed)
    vocab = target.config.vocab_size
    payload = {"rows": [], "prompt_tokens": args.prompt_tokens, "cache_room": room, "decoder": "neox",
               "compiled": compile, "draft_model": args.draft_model, "stopped_by_time_limit": False}

    def ids(batch, length):
        return torch.randint(2, vocab, (batch, length), generator=generator).to(device)

    def cached(model, batch, length):
        _, groups = neox_decode.prefill(model, list(ids(batch, length).split(1)))
        return neox_decode.load_buffer(groups, room)

    def record(what, batch, tokens, model, buffer, decode_ms=None, **extra):
        if time.perf_counter() > deadline:
            payload["stopped_by_time_limit"] = True
            return None
        median, first = time_forward(model, buffer, ids(batch, tokens), args.repeats, step)
        row = {"what": what, "batch_size": batch, "tokens": tokens, "ms": 1e3 * median,
               "first_call_s": first, **extra}
        if decode_ms is not None:
            row["ratio_to_decode_step"] = 1e3 * median / decode_ms
        payload["rows"].append(row)
        save(payload)
        print(f"{what} batch {batch} tokens {tokens}: {1e3 * median:.3f} ms (first call {first:.1f} s)",
              file=sys.stderr)
        return 1e3 * median

    targets, decode_ms = {}, {}
    for batch in args.batch_size:  # 1. the verify pass against the decode step
        targets[batch] = cached(target, batch, args.prompt_tokens)
        decode_ms[batch] = record("target decode step", batch, 1, target, targets[batch])
        for k in args.k_values:
            record("target verify pass", batch, k + 1, target, targets[batch], decode_ms=decode_ms[batch], k=k)

    draft = load_model(args.draft_model, args.random_init, dtype, str(device), args.attn_implementation,
                       args.data_dir).model
    for batch in args.batch_size:  # 2. the draft model's step on its own cache of the prompt
        record("draft model decode step", batch, 1, draft, cached(draft, batch, args.prompt_tokens),
               decode_ms=decode_ms[batch], model_name=args.draft_model)
    del draft

    layers = len(target.model.layers)
    for batch in args.batch_size:  # 3. the self-drafts' steps
        for budget in args.self_budget:
            record("self-draft step, compressed cache", batch, 1, target, cached(target, batch, budget),
                   decode_ms=decode_ms[batch], cache_tokens=budget, kept_fraction=budget / args.prompt_tokens)
        for fraction in args.skip_fraction:
            skip = spread_layers(layers, round(fraction * layers))
            record("self-draft step, layers skipped", batch, 1, skipping_model(target, skip), targets[batch],
                   decode_ms=decode_ms[batch], skipped_layers=skip, layers=layers,
                   skipped_fraction=len(skip) / layers)
    return payload
