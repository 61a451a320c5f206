"""TTFT, TPOT, throughput, peak memory, KV bytes and FLOPs of generation with a press
(DESIGN.md section 6), on one of two decode paths: ``kvpress`` (prefill through ``model.model``
with the press active, then the pipeline's greedy loop of single-token forward calls on the
pressed, possibly quantized, cache) or ``static`` (decoding/generate.py: StaticCache + CUDA graphs).

The generation length is forced (no early stop at EOS) so every method makes the same number
of steps. Timings are wall-clock with CUDA synchronisation, after warm-up, median of repeats.
"""

import contextlib
import functools
import statistics
import time

import torch

from decoding.generate import compiled_step, generate, synchronize
from decoding.kv_cache import kv_bytes, make_cache
from evaluation import flops

DECODERS = ("kvpress", "static")  # the kvpress per-token loop on a DynamicCache; the StaticCache + CUDA-graph path


@torch.no_grad()
def generate_forced(model, prompt: torch.Tensor, press, new_tokens: int, kv_quant: str = "none") -> dict:
    """Greedy generation of exactly ``new_tokens`` tokens after ``prompt`` (batch, length);
    returns the tokens, the timings and the cache sizes of one run."""
    device = model.device
    batch, prompt_len = prompt.shape
    cache = make_cache(model, kv_quant)
    synchronize(device)
    start = time.perf_counter()
    with press(model) if press is not None else contextlib.nullcontext():
        hidden = model.model(input_ids=prompt, past_key_values=cache).last_hidden_state
    token = model.get_output_embeddings()(hidden[:, -1:]).argmax(-1)
    synchronize(device)
    first_token_at = time.perf_counter()
    kept = cache.get_seq_length(0)
    kv_after_prefill = kv_bytes(cache)

    generated = [token]
    for step in range(new_tokens - 1):
        # Positions continue from the prompt length, whatever the press kept.
        position = torch.full((batch, 1), prompt_len + step, device=device)
        logits = model(input_ids=token, past_key_values=cache, position_ids=position).logits
        token = logits[:, -1:].argmax(-1)
        generated.append(token)
    synchronize(device)
    end = time.perf_counter()
    return {
        "tokens": torch.cat(generated, dim=1),
        "ttft_s": first_token_at - start,
        "decode_s": end - first_token_at,
        "kept_tokens_layer0": kept,
        "kv_bytes_after_prefill": kv_after_prefill,
        "kv_bytes_final": kv_bytes(cache),
    }


def generate_static(model, prompt: torch.Tensor, press, new_tokens: int, step) -> dict:
    """One run of the static-cache path, in generate_forced's format."""
    run = {}
    run["tokens"] = generate(model, prompt, press, new_tokens, step=step, timings=run)
    return run


def measure(model, prompt: torch.Tensor, press, new_tokens: int, repeats: int = 3, warmup: int = 1,
            decoder: str = "kvpress", kv_quant: str = "none") -> dict:
    """Median timings over ``repeats`` runs after ``warmup`` runs (compilation happens there),
    peak memory of the last run."""
    if new_tokens < 2:
        raise ValueError("--new_tokens must be at least 2 to time decode steps")
    device = model.device
    if decoder == "static" and kv_quant != "none":
        raise ValueError("the static decoder keeps a full-precision StaticCache: use --decoder kvpress with --kv_quant")
    if decoder == "static":
        step = compiled_step(device.type == "cuda")  # CUDA graphs need CUDA; on CPU the same step, eager
        run_once = functools.partial(generate_static, model, prompt, press, new_tokens, step)
    else:
        run_once = functools.partial(generate_forced, model, prompt, press, new_tokens, kv_quant)
    for _ in range(warmup):
        run_once()
    runs = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        runs.append(run_once())
    batch, prompt_len = prompt.shape
    ttft = statistics.median(run["ttft_s"] for run in runs)
    decode = statistics.median(run["decode_s"] for run in runs)
    last = runs[-1]
    config = model.config
    decode_work = flops.decode_flops(config, last["kept_tokens_layer0"], new_tokens - 1)
    return {
        "decoder": decoder,
        "kv_quant": kv_quant,
        "batch_size": batch,
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "ttft_ms": 1e3 * ttft,
        "tpot_ms": 1e3 * decode / (new_tokens - 1),
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode,
        "end_to_end_tokens_per_s": batch * new_tokens / (ttft + decode),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "kept_tokens_layer0": last["kept_tokens_layer0"],
        "kv_mib_after_prefill": last["kv_bytes_after_prefill"] / 2**20,
        "kv_mib_final": last["kv_bytes_final"] / 2**20,
        "prefill_gflops": batch * flops.prefill_flops(config, prompt_len) / 1e9,
        "decode_gflops_per_token": batch * decode_work / (new_tokens - 1) / 1e9,
        "tokens": last["tokens"].tolist(),
    }
