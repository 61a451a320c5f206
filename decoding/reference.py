"""The decoders every fast path is measured against (names in decoding/registry.py):

- ``kvpress_generate`` (``kvpress``): prefill through ``model.model`` with the press active, then
  the kvpress pipeline's greedy loop of single-token forward calls on the pressed, possibly
  quantized, cache. The reference whose tokens the fast paths are tested to give.
- ``hf_generate`` (``hf_eager``, ``hf_sdpa``, ``hf_static``): transformers' own ``generate``,
  greedy, dense only (what a user would run without this project).
- ``budget_generate``: the same loop with a decode-time press (``presses.BudgetPress``) held on
  through every step, positions as the press counts them: the reference of decoding/ring_cache.py.

``prefill`` is the pressed prefill every decoder of this package starts from; ``Generation`` is
what every decoder returns, and ``mark`` how it says where its phases begin and end (decoders do
not time themselves: evaluation/speed.py passes a clock as ``mark``).
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache

from decoding.kv_cache import kv_bytes, make_cache

# The phases a decoder marks, by calling ``mark(phase)``: START just before the prefill; FIRST_TOKEN
# when the first token is chosen and the cache is ready to decode on (prefill, the press's
# compression and any copy into another cache done: TTFT is START to FIRST_TOKEN); END when the
# last token is chosen. A decoder that cannot split its work (transformers' generate) marks START
# and END only.
START, FIRST_TOKEN, END = "start", "first_token", "end"
PhaseMarker = Callable[[str], None]


def no_mark(phase: str) -> None:
    """The default ``mark``: nothing is timed."""


@dataclass
class Generation:
    """What a decoder returns: the tokens (batch, new_tokens), the tokens each layer's cache kept
    after the prefill (every sequence's longest), and the bytes the cache held after the prefill
    (None where the decoder does not say) and at the end."""

    tokens: torch.Tensor
    kept_tokens_per_layer: list[int]
    kv_bytes_after_prefill: int | None
    kv_bytes_final: int

    @property
    def kept_tokens_layer0(self) -> int:
        return self.kept_tokens_per_layer[0]


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


def greedy_steps(model, token: torch.Tensor, cache, steps: int, position_of, margins: list | None) -> list:
    """``steps`` greedy decode steps after the first ``token`` (batch, 1), each fed at the position
    ``position_of(step)`` returns; the tokens, the first one included."""
    generated = [token]
    for step in range(steps):
        position = torch.full((token.shape[0], 1), position_of(step), device=token.device)
        logits = model(input_ids=token, past_key_values=cache, position_ids=position).logits
        token = logits[:, -1:].argmax(-1)
        generated.append(token)
        record_margin(logits, margins)
    return generated


@torch.no_grad()  # with autograd on, the cache would hold every step's activations for a backward
def kvpress_generate(model, prompt: torch.Tensor, press, new_tokens: int, kv_quant: str = "none",
                     margins: list | None = None, mark: PhaseMarker = no_mark) -> Generation:
    """Greedy generation of exactly ``new_tokens`` tokens after ``prompt`` (batch, length), with
    the cache sizes of the run. ``margins``, if given, receives per step the (batch,) gap between
    the two largest logits: how near a tie each greedy choice was."""
    prompt_len = prompt.shape[1]
    cache = make_cache(model, kv_quant)
    mark(START)
    with press(model) if press is not None else contextlib.nullcontext():
        hidden = model.model(input_ids=prompt, past_key_values=cache).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, -1:])
    token = logits.argmax(-1)
    mark(FIRST_TOKEN)
    kept = layer_lengths(cache)
    kv_after_prefill = kv_bytes(cache)

    record_margin(logits, margins)
    # Positions continue from the prompt length, whatever the press kept.
    generated = greedy_steps(model, token, cache, new_tokens - 1, lambda step: prompt_len + step, margins)
    mark(END)
    return Generation(torch.cat(generated, dim=1), kept, kv_after_prefill, kv_bytes(cache))


@torch.no_grad()
def hf_generate(model, prompt: torch.Tensor, new_tokens: int, cache: Cache, mark: PhaseMarker = no_mark) -> Generation:
    """transformers' own ``generate``, greedy, exactly ``new_tokens``, dense, on ``cache`` (an
    empty DynamicCache or StaticCache: ``hf_static`` resets and reuses one). It has no first-token
    point to mark: evaluation/speed.py times a one-token generation for the TTFT."""
    batch, prompt_len = prompt.shape
    mark(START)
    output = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=model.config.eos_token_id)
    mark(END)
    return Generation(output[:, prompt_len:], [prompt_len] * model.config.num_hidden_layers, None, kv_bytes(cache))


@torch.no_grad()
def budget_generate(model, prompt: torch.Tensor, press, new_tokens: int, margins: list | None = None,
                    mark: PhaseMarker = no_mark) -> Generation:
    """Greedy generation of exactly ``new_tokens`` tokens with a decode-time press (a
    ``BudgetPress``) active through the prefill and every step, so that each layer's cache is cut
    back to its budget after every forward call, as the streaming protocol does
    (evaluation/protocols.py). With ``positions_in_cache`` (StreamingLLM) a new token's position
    is the number of tokens its cache holds, the press having re-rotated the kept keys to
    0..n-1; otherwise its text position. ``margins``: as ``kvpress_generate``'s."""
    prompt_len = prompt.shape[1]
    in_cache = getattr(press, "positions_in_cache", False)
    cache = DynamicCache()
    with press(model):
        mark(START)
        hidden = model.model(input_ids=prompt, past_key_values=cache).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, -1:])
        token = logits.argmax(-1)
        mark(FIRST_TOKEN)
        kept, kv_after_prefill = layer_lengths(cache), kv_bytes(cache)
        record_margin(logits, margins)
        generated = greedy_steps(model, token, cache, new_tokens - 1,
                                 lambda step: cache.get_seq_length() if in_cache else prompt_len + step, margins)
        mark(END)
    return Generation(torch.cat(generated, dim=1), kept, kv_after_prefill, kv_bytes(cache))
