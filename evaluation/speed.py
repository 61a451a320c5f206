"""TTFT, TPOT, throughput, peak memory, KV bytes and FLOPs of generation with a press
(DESIGN.md section 6), on one of these decode paths:

- ``hf_eager``, ``hf_sdpa``: transformers' ``generate`` with a DynamicCache, eager or SDPA
  attention (the plain Hugging Face baselines; dense only);
- ``hf_static``: ``generate`` with a StaticCache, which transformers compiles on its own (what a
  user would pick instead; dense only);
- ``kvpress``: prefill through ``model.model`` with the press active, then the kvpress pipeline's
  greedy loop of single-token forward calls on the pressed, possibly quantized, cache;
- ``static``: decoding/generate.py (the pressed KV in a StaticCache, the HF step as a CUDA graph);
- ``neox``: decoding/neox_decode.py (GPT-NeoX's step written out and replayed as one CUDA graph,
  by default the two-stream graph that keeps its buffer between generations; attention back end
  by name).

The generation length is forced (no early stop at EOS) so every method makes the same number
of steps. Timings are wall-clock with CUDA synchronisation, after warm-up, median of repeats.
"""

import contextlib
import functools
import statistics
import time

import torch

from transformers import DynamicCache, StaticCache

from decoding import generate as hf_static_path
from decoding import neox_decode
from decoding.generate import synchronize
from decoding.kv_cache import kv_bytes, make_cache
from evaluation import flops

HF_BASELINES = {"hf_eager": "eager", "hf_sdpa": "sdpa", "hf_static": "sdpa"}  # decoder -> attention it runs with
DECODERS = (*HF_BASELINES, "kvpress", "static", "neox")


def prompt_ids(vocab_size: int, batch: int, tokens: int, seed: int) -> torch.Tensor:
    """Random token ids (batch, tokens): with a forced generation length the content does not
    change the work, so speed runs need no text (ids 0 and 1 are Pythia's special tokens)."""
    return torch.randint(2, vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def record_margin(logits: torch.Tensor, margins: list | None) -> None:
    """Append the (batch,) gap between the two largest last-position logits, if ``margins`` is a list."""
    if margins is not None:
        top = logits[:, -1].float().topk(2, dim=-1).values
        margins.append(top[:, 0] - top[:, 1])


@torch.no_grad()  # with autograd on, the cache would hold every step's activations for a backward
def generate_forced(model, prompt: torch.Tensor, press, new_tokens: int, kv_quant: str = "none",
                    margins: list | None = None) -> dict:
    """Greedy generation of exactly ``new_tokens`` tokens after ``prompt`` (batch, length);
    returns the tokens, the timings and the cache sizes of one run. ``margins``, if given,
    receives per step the (batch,) gap between the two largest logits: how near a tie each
    greedy choice was."""
    device = model.device
    batch, prompt_len = prompt.shape
    cache = make_cache(model, kv_quant)
    synchronize(device)
    start = time.perf_counter()
    with press(model) if press is not None else contextlib.nullcontext():
        hidden = model.model(input_ids=prompt, past_key_values=cache).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, -1:])
    token = logits.argmax(-1)
    synchronize(device)
    first_token_at = time.perf_counter()
    kept = cache.get_seq_length(0)
    kv_after_prefill = kv_bytes(cache)

    generated = [token]
    record_margin(logits, margins)
    for step in range(new_tokens - 1):
        # Positions continue from the prompt length, whatever the press kept.
        position = torch.full((batch, 1), prompt_len + step, device=device)
        logits = model(input_ids=token, past_key_values=cache, position_ids=position).logits
        token = logits[:, -1:].argmax(-1)
        generated.append(token)
        record_margin(logits, margins)
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


@torch.no_grad()
def generate_hf(model, prompt: torch.Tensor, new_tokens: int, static: bool) -> dict:
    """transformers' own ``generate`` (greedy, exactly ``new_tokens``), in generate_forced's
    format. It reports no first-token time, so TTFT is a separate one-token generation and the
    decode time is the difference."""
    batch, prompt_len = prompt.shape

    def timed(tokens: int):
        cache = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens) if static else DynamicCache()
        synchronize(model.device)
        start = time.perf_counter()
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                                max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                pad_token_id=model.config.eos_token_id)
        synchronize(model.device)
        return output, time.perf_counter() - start, cache

    _, ttft, _ = timed(1)
    output, total, cache = timed(new_tokens)
    return {"tokens": output[:, prompt_len:], "ttft_s": ttft, "decode_s": total - ttft,
            "kept_tokens_layer0": prompt_len, "kv_bytes_after_prefill": None, "kv_bytes_final": kv_bytes(cache)}


def with_timings(generate, *args, **kwargs) -> dict:
    """One run of a fast path's ``generate`` (which fills a ``timings`` dict), in generate_forced's format."""
    run = {}
    run["tokens"] = generate(*args, timings=run, **kwargs)
    return run


def neox_settings(decoder: str, compile_mode: str, keep_buffer: bool) -> dict:
    """How the step was compiled, for a result row: only the neox decoder has these settings."""
    if decoder != "neox":
        return {"compile_mode": None, "keep_buffer": None}
    return {"compile_mode": compile_mode, "keep_buffer": keep_buffer if compile_mode == "two-stream" else None}


def run_once_for(model, prompt: torch.Tensor, press, new_tokens: int, decoder: str, kv_quant: str = "none",
                 backend: str = "sdpa", compile_mode: str = "two-stream", keep_buffer: bool = True):
    """A no-argument function generating once with ``decoder`` (see the module docstring)."""
    compile = model.device.type == "cuda"  # CUDA graphs need CUDA; on CPU the same steps run eagerly
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose from {', '.join(DECODERS)}")
    if kv_quant != "none" and decoder != "kvpress":
        raise ValueError("a quantized KV cache runs on the kvpress decoder only (--decoder kvpress)")
    if decoder in HF_BASELINES:
        if press is not None:
            raise ValueError(f"{decoder} is transformers' own generate: dense only")
        if model.config._attn_implementation != HF_BASELINES[decoder]:
            model.set_attn_implementation(HF_BASELINES[decoder])
        return functools.partial(generate_hf, model, prompt, new_tokens, decoder == "hf_static")
    if decoder == "static":
        step = hf_static_path.compiled_step(compile)
        return functools.partial(with_timings, hf_static_path.generate, model, prompt, press, new_tokens, step=step)
    if decoder == "neox":
        step = neox_decode.compiled_step(compile, compile_mode, keep_buffer)
        return functools.partial(with_timings, neox_decode.generate, model, list(prompt.split(1)), press, new_tokens,
                                 step=step, backend=backend)
    return functools.partial(generate_forced, model, prompt, press, new_tokens, kv_quant)


def measure(model, prompt: torch.Tensor, press, new_tokens: int, repeats: int = 3, warmup: int = 1,
            decoder: str = "kvpress", kv_quant: str = "none", backend: str = "sdpa",
            compile_mode: str = "two-stream", keep_buffer: bool = True) -> dict:
    """Median timings over ``repeats`` runs after ``warmup`` runs (compilation happens there),
    peak memory of the last run."""
    if new_tokens < 2:
        raise ValueError("--new_tokens must be at least 2 to time decode steps")
    device = model.device
    run_once = run_once_for(model, prompt, press, new_tokens, decoder, kv_quant, backend, compile_mode, keep_buffer)
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
        "decode_attention": backend if decoder == "neox" else model.config._attn_implementation,
        **neox_settings(decoder, compile_mode, keep_buffer),
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
        "kv_mib_after_prefill": None if last["kv_bytes_after_prefill"] is None else last["kv_bytes_after_prefill"] / 2**20,
        "kv_mib_final": last["kv_bytes_final"] / 2**20,
        "prefill_gflops": batch * flops.prefill_flops(config, prompt_len) / 1e9,
        "decode_gflops_per_token": batch * decode_work / (new_tokens - 1) / 1e9,
        "tokens": last["tokens"].tolist(),
    }
