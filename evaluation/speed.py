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
of steps. Timings are wall-clock with CUDA synchronisation, after warm-up, median of repeats;
the warm-up's extra time is reported as the first call's cost (``compile_s``, see ``measure``).
Every row carries the TPOT floor at each layer's own kept length over the ceilings measured on the
machine that ran (evaluation/ceilings.py: copy and GEMV bandwidth), with the datasheet's floor
beside it, never the one a ratio uses.
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
from evaluation import flops, roofline
from evaluation.ceilings import Ceilings, machine_ceilings

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


def layer_lengths(cache) -> list[int]:
    """Tokens each layer of a cache holds (a press may keep different numbers per layer)."""
    return [cache.get_seq_length(layer) for layer in range(len(cache.layers))]


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
    kept = layer_lengths(cache)
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
        "kept_tokens_layer0": kept[0],
        "kept_tokens_per_layer": kept,
        "kv_bytes_after_prefill": kv_after_prefill,
        "kv_bytes_final": kv_bytes(cache),
    }


def static_cache_for(model, prompt: torch.Tensor, new_tokens: int) -> StaticCache:
    """One StaticCache for every ``generate_hf`` call of a cell: transformers' compiled step then
    sees the same cache tensors call after call (its CUDA graphs are recorded once, not again for
    a new cache). ``generate_hf`` resets it before each call, as transformers documents for
    reusing a StaticCache on a new prompt (docs: llm_optims, "Static kv-cache and torch.compile")."""
    return StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens)


@torch.no_grad()
def generate_hf(model, prompt: torch.Tensor, new_tokens: int, static: bool, cache: StaticCache | None = None) -> dict:
    """transformers' own ``generate`` (greedy, exactly ``new_tokens``), in generate_forced's
    format. It reports no first-token time, so TTFT is a separate one-token generation and the
    decode time is the difference. ``static``: a StaticCache, ``cache`` if given (reset before
    each of the two generations and kept, see ``static_cache_for``), else a new one per
    generation; otherwise a new DynamicCache per generation."""
    batch, prompt_len = prompt.shape

    def timed(tokens: int):
        if static and cache is not None:
            cache.reset()
            used = cache
        else:
            used = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens) if static else DynamicCache()
        synchronize(model.device)
        start = time.perf_counter()
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=used,
                                max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                pad_token_id=model.config.eos_token_id)
        synchronize(model.device)
        return output, time.perf_counter() - start, used

    _, ttft, _ = timed(1)
    output, total, used = timed(new_tokens)
    return {"tokens": output[:, prompt_len:], "ttft_s": ttft, "decode_s": total - ttft,
            "kept_tokens_layer0": prompt_len, "kept_tokens_per_layer": [prompt_len] * model.config.num_hidden_layers,
            "kv_bytes_after_prefill": None, "kv_bytes_final": kv_bytes(used)}


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
        static = decoder == "hf_static"
        cache = static_cache_for(model, prompt, new_tokens) if static else None
        return functools.partial(generate_hf, model, prompt, new_tokens, static, cache)
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
            compile_mode: str = "two-stream", keep_buffer: bool = True, ceilings: Ceilings | None = None) -> dict:
    """Median timings over ``repeats`` runs after ``warmup`` runs (compilation happens there),
    peak memory of the last run, and the TPOT floors (evaluation/roofline.py) at every layer's own
    kept length over ``ceilings`` (default: measured on the model's device once per process,
    evaluation/ceilings.py).

    The cost of the first call, for every decoder alike: ``first_call_s`` is the wall time (host
    clock, CUDA-synchronised) of the first warm-up run, one whole generation as the timed runs
    make it (for ``hf_*``: the one-token and the full ``generate``); ``run_s`` is the median wall
    time of the timed runs; ``compile_s`` = ``first_call_s`` - ``run_s``: what the first call pays
    beyond a warm one, i.e. torch.compile's tracing and code generation, CUDA-graph capture, and
    one-time allocations and library set-up (cuBLAS / cuDNN handles and plans) not already paid by
    earlier cells of the same process (a later cell of one decoder reuses compiled code where the
    shapes and guards allow, so its ``compile_s`` is smaller than the first cell's). A cost paid
    again by every run (such as the two-stream graph's capture with ``keep_buffer=False``) is in
    ``run_s`` and the TTFT / TPOT, not here. On a CPU (no compilation) it is noise around zero."""
    if new_tokens < 2:
        raise ValueError("--new_tokens must be at least 2 to time decode steps")
    device = model.device
    run_once = run_once_for(model, prompt, press, new_tokens, decoder, kv_quant, backend, compile_mode, keep_buffer)
    ceilings = ceilings or machine_ceilings(device)
    warmup_s = []
    for _ in range(warmup):
        warmup_s.append(_wall(run_once, device)[1])
    runs, run_s = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        run, seconds = _wall(run_once, device)
        runs.append(run)
        run_s.append(seconds)
    batch, prompt_len = prompt.shape
    ttft = statistics.median(run["ttft_s"] for run in runs)
    decode = statistics.median(run["decode_s"] for run in runs)
    last = runs[-1]
    config = model.config
    kept = last["kept_tokens_per_layer"]
    decode_work = flops.decode_flops(config, kept, new_tokens - 1)
    tpot_ms = 1e3 * decode / (new_tokens - 1)
    floors = roofline.decode_floors(config, batch, kept, new_tokens, ceilings)
    first_call_s = warmup_s[0] if warmup_s else None
    median_run_s = statistics.median(run_s)
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
        "tpot_ms": tpot_ms,
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode,
        "end_to_end_tokens_per_s": batch * new_tokens / (ttft + decode),
        "first_call_s": first_call_s,
        "run_s": median_run_s,
        "compile_s": None if first_call_s is None else first_call_s - median_run_s,
        "warmup_runs_s": warmup_s,
        "timed_runs_s": run_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "kept_tokens_layer0": last["kept_tokens_layer0"],
        "kept_tokens_mean": sum(kept) / len(kept),
        "kept_tokens_per_layer": kept,
        "kv_mib_after_prefill": None if last["kv_bytes_after_prefill"] is None else last["kv_bytes_after_prefill"] / 2**20,
        "kv_mib_final": last["kv_bytes_final"] / 2**20,
        "prefill_gflops": batch * flops.prefill_flops(config, prompt_len) / 1e9,
        "decode_gflops_per_token": batch * decode_work / (new_tokens - 1) / 1e9,
        **floors,
        "tpot_over_floor": tpot_ms / floors["tpot_floor_ms"],
        "tpot_over_gemv_floor": tpot_ms / floors["tpot_floor_gemv_ms"] if floors["tpot_floor_gemv_ms"] else None,
        **ceilings.summary(),
        "tokens": last["tokens"].tolist(),
    }


def _wall(run_once, device) -> tuple[dict, float]:
    """One run and its wall time in seconds, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    run = run_once()
    synchronize(device)
    return run, time.perf_counter() - start
