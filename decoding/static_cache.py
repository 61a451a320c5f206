"""The ``static`` decoder: fast greedy generation after a press, the whole decode path in one file
(gpt-fast style). Not transformers' own static path (that is ``hf_static``, decoding/reference.py).

1. Prefill: the prompt runs through ``model.model`` with the press active (any kvpress press):
   the DynamicCache comes out compressed, and the last hidden state gives the first token.
2. The kept keys/values are copied into a preallocated transformers ``StaticCache`` sized for
   kept + new tokens, so every decode step has the same shapes and tensor addresses.
3. Each decode step is ``model.forward`` on one token per sequence, compiled with
   ``torch.compile(mode="reduce-overhead")``: on CUDA the step replays as one captured CUDA
   graph instead of hundreds of kernel launches from Python. Positions continue from the
   prompt length; cache slots continue from the kept length.

Tokens equal those of the plain kvpress loop (``decoding/reference.py``) for the same press
(tests/test_fast_decode.py, on CPU without compilation). Not yet supported: layers holding
different numbers of tokens (PyramidKV; StaticCache has one fill level), sampling, and batches
of different prompt lengths.
"""

import torch
from transformers import DynamicCache, StaticCache

from decoding.kv_cache import kv_bytes
from decoding.reference import END, FIRST_TOKEN, START, Generation, PhaseMarker, no_mark, prefill


class RaggedCacheError(ValueError):
    """The press left layers with different cache lengths; the static path needs one length."""


def to_static_cache(model, pressed: DynamicCache, new_tokens: int) -> tuple[StaticCache, int]:
    """Move the pressed keys/values into a StaticCache with room for ``new_tokens`` more;
    return it and the kept length (the first free slot). ``pressed`` is consumed: each layer is
    emptied once copied, so the two caches never both hold everything (large batches fit)."""
    lengths = {layer.keys.shape[2] for layer in pressed.layers}
    if len(lengths) != 1:
        raise RaggedCacheError(f"layers hold {sorted(lengths)} tokens: the static decode path needs one length")
    kept = lengths.pop()
    static = StaticCache(config=model.config, max_cache_len=kept + new_tokens)
    slots = torch.arange(kept, device=model.device)
    for index, layer in enumerate(pressed.layers):
        static.update(layer.keys, layer.values, index, {"cache_position": slots})
        layer.keys, layer.values = layer.keys.new_empty(0), layer.values.new_empty(0)  # frees the storage
    return static, kept


def decode_step(model, token: torch.Tensor, cache: StaticCache, position: torch.Tensor, slot: torch.Tensor):
    """One greedy step: ``token`` (batch, 1) at text ``position`` (batch, 1), written to cache ``slot`` (1,)."""
    logits = model(input_ids=token, past_key_values=cache, position_ids=position, cache_position=slot).logits
    return logits[:, -1:].argmax(-1)


def compiled_step(compile: bool):
    """The decode step, compiled into a CUDA-graph replay when ``compile`` is set."""
    return torch.compile(decode_step, mode="reduce-overhead") if compile else decode_step


@torch.no_grad()
def generate(model, prompt: torch.Tensor, press, new_tokens: int, step=decode_step,
             mark: PhaseMarker = no_mark) -> Generation:
    """Exactly ``new_tokens`` greedy tokens (no early stop) after ``prompt``, with ``press``
    applied at prefill, and the cache sizes. ``step``: ``decode_step`` or ``compiled_step(True)``.
    ``mark``: see decoding/reference.py (the first token is marked after the copy into the
    StaticCache)."""
    mark(START)
    logits, pressed = prefill(model, prompt, press)
    token = logits.argmax(-1, keepdim=True)
    kept_bytes = kv_bytes(pressed)
    cache, kept = to_static_cache(model, pressed, new_tokens)
    mark(FIRST_TOKEN)
    batch, prompt_len = prompt.shape
    generated = [token]
    for index in range(new_tokens - 1):
        position = torch.full((batch, 1), prompt_len + index, device=model.device)
        slot = torch.full((1,), kept + index, device=model.device)  # not from a list: that copy waits for the GPU
        # CUDA graphs reuse their output buffers: clone before the next replay overwrites it.
        token = step(model, token, cache, position, slot).clone()
        generated.append(token)
    mark(END)
    return Generation(torch.cat(generated, dim=1), [kept] * len(cache.layers), kept_bytes, kv_bytes(cache))
