"""TTFT, TPOT, throughput, peak memory, KV bytes and FLOPs of generation with a press
(DESIGN.md section 6), on one of the decoders of decoding/registry.py:

- ``hf_eager``, ``hf_sdpa``: transformers' ``generate`` with a DynamicCache, eager or SDPA
  attention (the plain Hugging Face baselines; dense only; decoding/reference.py);
- ``hf_static``: ``generate`` with a StaticCache, which transformers compiles on its own (what a
  user would pick instead; dense only; decoding/reference.py);
- ``kvpress``: prefill through ``model.model`` with the press active, then the kvpress pipeline's
  greedy loop of single-token forward calls on the pressed, possibly quantized, cache
  (decoding/reference.py);
- ``static``: decoding/static_cache.py (the pressed KV in a StaticCache, the HF step as a CUDA graph);
- ``neox``: decoding/neox_decode.py (GPT-NeoX's step written out and replayed as one CUDA graph,
  by default the two-stream graph that keeps its buffer between generations; attention back end
  by name; with ``kv_bits`` the KV buffer quantized, read by decoding/quantized_kv_attention.py's kernel).

The generation length is forced (no early stop at EOS) so every method makes the same number
of steps. Timings are wall-clock with CUDA synchronisation, after warm-up, median of repeats;
the warm-up's extra time is reported as the first call's cost (``compile_s``, see ``measure``).
Every row carries the TPOT floor at each layer's own kept length over the ceilings measured on the
machine that ran (evaluation/ceilings.py: copy and GEMV bandwidth), with the datasheet's floor
beside it, never the one a ratio uses.
"""

import functools
import statistics
import time

import torch

from transformers import DynamicCache, StaticCache

from decoding import neox_cuda_graphs, neox_decode, static_cache
from decoding.reference import END, FIRST_TOKEN, START, Generation, hf_generate, kvpress_generate
from decoding.registry import DECODERS, decoder as decoder_named
from evaluation import flops, roofline
from evaluation.ceilings import Ceilings, machine_ceilings


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a host clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """A decoder's ``mark`` (decoding/reference.py): the host clock at each phase it marks, the
    device synchronised first. The decoders only mark; the timing is here."""

    def __init__(self, device: torch.device):
        self.device, self.at = device, {}

    def __call__(self, phase: str) -> None:
        synchronize(self.device)
        self.at[phase] = time.perf_counter()

    def seconds(self, start: str, end: str) -> float:
        return self.at[end] - self.at[start]


def run_row(generation: Generation, ttft_s: float, decode_s: float) -> dict:
    """One timed generation as ``measure`` reads it."""
    return {"tokens": generation.tokens, "ttft_s": ttft_s, "decode_s": decode_s,
            "kept_tokens_layer0": generation.kept_tokens_layer0,
            "kept_tokens_per_layer": generation.kept_tokens_per_layer,
            "kv_bytes_after_prefill": generation.kv_bytes_after_prefill, "kv_bytes_final": generation.kv_bytes_final}


def timed(generate, device: torch.device, *args, **kwargs) -> dict:
    """One run of a decoder that marks its first token (``kvpress``, ``static``, ``neox``):
    TTFT from the start of the prefill to the first token (compression and any cache copy
    included), decode time from there to the last token."""
    clock = Clock(device)
    generation = generate(*args, mark=clock, **kwargs)
    return run_row(generation, clock.seconds(START, FIRST_TOKEN), clock.seconds(FIRST_TOKEN, END))


def timed_hf(model, prompt: torch.Tensor, new_tokens: int, cache: StaticCache | None = None) -> dict:
    """One run of transformers' ``generate``, which has no first-token point to mark: TTFT is a
    one-token generation timed on its own, the decode time the full generation's time less it.
    ``cache``: a StaticCache reset before each of the two generations and kept (``hf_static``,
    see ``static_cache_for``); None: a new DynamicCache for each."""
    def generation_and_seconds(tokens: int) -> tuple[Generation, float]:
        if cache is not None:
            cache.reset()
        clock = Clock(model.device)
        generation = hf_generate(model, prompt, tokens, DynamicCache() if cache is None else cache, mark=clock)
        return generation, clock.seconds(START, END)

    _, ttft = generation_and_seconds(1)
    generation, total = generation_and_seconds(new_tokens)
    return run_row(generation, ttft, total - ttft)


def prompt_ids(vocab_size: int, batch: int, tokens: int, seed: int) -> torch.Tensor:
    """Random token ids (batch, tokens): with a forced generation length the content does not
    change the work, so speed runs need no text (ids 0 and 1 are Pythia's special tokens)."""
    return torch.randint(2, vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def static_cache_for(model, prompt: torch.Tensor, new_tokens: int) -> StaticCache:
    """One StaticCache for every ``hf_generate`` call of a cell: transformers' compiled step then
    sees the same cache tensors call after call (its CUDA graphs are recorded once, not again for
    a new cache). ``timed_hf`` resets it before each call, as transformers documents for
    reusing a StaticCache on a new prompt (docs: llm_optims, "Static kv-cache and torch.compile")."""
    return StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens)


def neox_settings(decoder: str, compile_mode: str, keep_buffer: bool, prefix_bucket: int | None) -> dict:
    """How the step was compiled, for a result row: only the neox decoder has these settings, and
    only its hand-captured step (two-stream or one-stream) keeps a buffer and reads it by prefix buckets."""
    if decoder != "neox":
        return {"compile_mode": None, "keep_buffer": None, "prefix_bucket": None}
    hand_captured = compile_mode in neox_cuda_graphs.HAND_CAPTURED
    return {"compile_mode": compile_mode, "keep_buffer": keep_buffer if hand_captured else None,
            "prefix_bucket": prefix_bucket if hand_captured else None}


def run_once_for(model, prompt: torch.Tensor, press, new_tokens: int, decoder: str, kv_quant: str = "none",
                 backend: str = "sdpa", compile_mode: str = "two-stream", keep_buffer: bool = True, step=None,
                 prefill_batch: int | None = None, kv_bits: tuple[int, int] | None = None,
                 prefix_bucket: int = neox_cuda_graphs.PREFIX_BUCKET):
    """A no-argument function generating once with ``decoder`` (see the module docstring).
    ``step``: the neox decoder's step, instead of ``compiled_step(compile_mode, keep_buffer, prefix_bucket)``
    (evaluation/speed_frontier.py: the folded step). ``prefill_batch``: the neox decoder prefills
    in micro-batches of this many sequences (decoding/neox_decode.py's ``prefill``; None: at once).
    ``kv_bits``: (key bits, value bits), the neox decoder's KV buffer quantized (None: fp)."""
    compile = model.device.type == "cuda"  # CUDA graphs need CUDA; on CPU the same steps run eagerly
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose from {', '.join(DECODERS)}")
    if kv_quant != "none" and decoder != "kvpress":
        raise ValueError("a quantized KV cache runs on the kvpress decoder only (--decoder kvpress)")
    if prefill_batch is not None and decoder != "neox":
        raise ValueError("micro-batched prefill (prefill_batch) is the neox decoder's only")
    if kv_bits is not None and decoder != "neox":
        raise ValueError("a quantized KV buffer (kv_bits) is the neox decoder's only")
    hf_attention = decoder_named(decoder).hf_attention
    if hf_attention is not None:
        if press is not None:
            raise ValueError(f"{decoder} is transformers' own generate: dense only")
        if model.config._attn_implementation != hf_attention:
            model.set_attn_implementation(hf_attention)
        cache = static_cache_for(model, prompt, new_tokens) if decoder == "hf_static" else None
        return functools.partial(timed_hf, model, prompt, new_tokens, cache)
    device = model.device
    if decoder == "static":
        step = static_cache.compiled_step(compile)
        return functools.partial(timed, static_cache.generate, device, model, prompt, press, new_tokens, step=step)
    if decoder == "neox":
        step = step or neox_cuda_graphs.compiled_step(compile, compile_mode, keep_buffer, prefix_bucket=prefix_bucket)
        return functools.partial(timed, neox_decode.generate, device, model, list(prompt.split(1)), press, new_tokens,
                                 step=step, backend=backend, prefill_batch=prefill_batch, kv_bits=kv_bits)
    return functools.partial(timed, kvpress_generate, device, model, prompt, press, new_tokens, kv_quant)


def measure(model, prompt: torch.Tensor, press, new_tokens: int, repeats: int = 3, warmup: int = 1,
            decoder: str = "kvpress", kv_quant: str = "none", backend: str = "sdpa",
            compile_mode: str = "two-stream", keep_buffer: bool = True, ceilings: Ceilings | None = None,
            step=None, weight_quant: str = "none", prefill_batch: int | None = None,
            kv_bits: tuple[int, int] | None = None, prefix_bucket: int = neox_cuda_graphs.PREFIX_BUCKET) -> dict:
    """Median timings over ``repeats`` runs after ``warmup`` runs (compilation happens there),
    peak memory of the last run, and the TPOT floors (evaluation/roofline.py) at every layer's own
    kept length over ``ceilings`` (default: measured on the model's device once per process,
    evaluation/ceilings.py). ``step``: see ``run_once_for``; ``weight_quant``: the scheme the
    model's weights are in (decoding/weight_quant.py), for the floors' bytes; ``prefill_batch``:
    see ``run_once_for`` (recorded in the row); ``kv_bits``: see ``run_once_for``, the floors' KV at its bytes;
    ``prefix_bucket``: the two-stream step's (decoding/neox_cuda_graphs.py; a given ``step``'s own is recorded).

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
    run_once = run_once_for(model, prompt, press, new_tokens, decoder, kv_quant, backend, compile_mode, keep_buffer,
                            step, prefill_batch, kv_bits, prefix_bucket)
    if step is not None:
        prefix_bucket = getattr(step, "prefix_bucket", None)
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
    floors = roofline.decode_floors(config, batch, kept, new_tokens, ceilings, weight_quant, kv_bits)
    first_call_s = warmup_s[0] if warmup_s else None
    median_run_s = statistics.median(run_s)
    return {
        "decoder": decoder,
        "decode_attention": backend if decoder == "neox" else model.config._attn_implementation,
        **neox_settings(decoder, compile_mode, keep_buffer, prefix_bucket),
        "kv_quant": kv_quant,
        "kv_bits": None if kv_bits is None else "x".join(map(str, kv_bits)),
        "weight_quant": weight_quant,
        "batch_size": batch,
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        **({"prefill_batch": prefill_batch} if prefill_batch is not None else {}),
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
