"""The decoders every fast path is measured against (names in decoding/registry.py):

- ``kvpress_generate`` (``kvpress``): prefill through ``model.model`` with the press active, then
  the kvpress pipeline's greedy loop of single-token forward calls on the pressed, possibly
  quantized, cache. The reference whose tokens the fast paths are tested to give.
- ``hf_generate`` (``hf_eager``, ``hf_sdpa``, ``hf_static``): transformers' own ``generate``,
  greedy, dense only (what a user would run without this project).

``prefill`` is the pressed prefill every decoder of this package starts from.
"""

import contextlib
import time

import torch
from transformers import DynamicCache, StaticCache

from decoding.kv_cache import kv_bytes, make_cache


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a host clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(model, prompt: torch.Tensor, press=None, cache=None) -> tuple[torch.Tensor, DynamicCache]:
    """Run the prompt (batch, length) with the press into ``cache`` (default: a new DynamicCache);
    return the last position's logits (batch, vocab) and the pressed cache."""
    cache = DynamicCache() if cache is None else cache
    with press(model) if press is not None else contextlib.nullcontext():
        hidden = model.model(input_ids=prompt, past_key_values=cache).last_hidden_state
    return model.get_output_embeddings()(hidden[:, -1]), cache


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
def kvpress_generate(model, prompt: torch.Tensor, press, new_tokens: int, kv_quant: str = "none",
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


@torch.no_grad()
def hf_generate(model, prompt: torch.Tensor, new_tokens: int, static: bool, cache: StaticCache | None = None) -> dict:
    """transformers' own ``generate`` (greedy, exactly ``new_tokens``), in kvpress_generate's
    format. It reports no first-token time, so TTFT is a separate one-token generation and the
    decode time is the difference. ``static``: a StaticCache, ``cache`` if given (reset before
    each of the two generations and kept), else a new one per generation; otherwise a new
    DynamicCache per generation."""
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
