"""Perplexity under KV compression, measured so that compression can matter (DESIGN.md section 5).

A press compresses a layer's cache *after* that layer's attention ran, so one teacher-forced
pass over a whole text with a press active scores every token with the full cache: it
measures nothing. Both protocols here score tokens against a cache that was already pressed.

- ``context``: prefill the first N tokens with the press, then score the next M tokens
  teacher-forced against that compressed cache (kvpress style). Ratio 0 equals dense exactly.
- ``streaming``: feed the text in chunks of C tokens; a streaming press (``BudgetPress`` or a
  method's own) holds each layer's cache at its budget; every token after the first is scored.
  Positions are the token's index in the text, or its slot in the cache for presses with
  ``positions_in_cache`` (StreamingLLM's rule).
"""

import contextlib
from dataclasses import dataclass

import torch
from kvpress import BasePress, DecodingPress
from torch.nn import functional as F
from tqdm import tqdm
from transformers import DynamicCache

from decoding.kv_cache import kv_bytes, make_cache


SEGMENT_TOKENS = 1024  # streaming: PPL is also reported per stretch, to see where a method breaks


class ProtocolError(ValueError):
    """The protocol's settings do not fit the model or the text."""


@dataclass
class Perplexity:
    nll_sum: float
    tokens: int
    cache_tokens: float  # mean over layers (and windows/chunks) of the tokens held when scoring
    segment_ppl: list[float] | None = None  # streaming: PPL of each SEGMENT_TOKENS-token stretch of the text
    kv_bytes: float | None = None  # context: bytes the cache held after the pressed prefill (mean over windows)

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def ppl(self) -> float:
        return float(torch.tensor(self.mean_nll).exp())


def _pressed(press: BasePress | None, model):
    return press(model) if press is not None else contextlib.nullcontext()


def _cache_lengths(cache) -> list[int]:
    return [cache.get_seq_length(index) for index in range(len(cache.layers))]


def _feed(forward, ids: torch.Tensor, cache, first_position: int, chunk_tokens: int | None) -> list:
    """Run ``ids`` (1, n) through ``forward`` in calls of ``chunk_tokens`` (one call if None),
    at text positions from ``first_position``; returns each call's output."""
    step = chunk_tokens or ids.shape[1]
    outputs = []
    for start in range(0, ids.shape[1], step):
        stop = min(start + step, ids.shape[1])
        positions = torch.arange(first_position + start, first_position + stop, device=ids.device).unsqueeze(0)
        outputs.append(forward(input_ids=ids[:, start:stop], past_key_values=cache, position_ids=positions))
    return outputs


@torch.no_grad()
def context_nll(
    model, ids: torch.Tensor, press: BasePress | None, context_tokens: int, eval_tokens: int, num_windows: int = 1,
    chunk_tokens: int = 128, kv_quant: str = "none",
) -> Perplexity:
    """``num_windows`` consecutive windows of ``context_tokens + eval_tokens + 1`` tokens: prefill
    the context with the press, score ``eval_tokens`` tokens against the pressed cache.

    A decode-time press (a DecodingPress such as InfLLM) only acts while tokens stream in: the
    context is fed in calls of ``chunk_tokens`` and the press stays on while the scored tokens
    are fed the same way. ``kv_quant``: keep the cache quantized (decoding/kv_cache.py)."""
    decode_time = isinstance(press, DecodingPress)
    chunk = chunk_tokens if decode_time else None
    limit = model.config.max_position_embeddings
    if context_tokens + eval_tokens > limit:
        raise ProtocolError(
            f"context {context_tokens} + eval {eval_tokens} tokens exceed the model's {limit}-token context; "
            "shorten them or use --protocol streaming for long texts"
        )
    window = context_tokens + eval_tokens + 1
    if ids.numel() < window * num_windows:
        raise ProtocolError(f"text has {ids.numel()} tokens, {num_windows} window(s) need {window * num_windows}")

    nll_sum, kept, held_bytes = 0.0, [], []
    for index in tqdm(range(num_windows), desc="windows", disable=num_windows == 1):
        sample = ids[index * window : (index + 1) * window].unsqueeze(0).to(model.device)
        cache = make_cache(model, kv_quant)
        scored = sample[:, context_tokens:-1]  # positions continue from the context length, not the cache size
        with _pressed(press, model):
            _feed(model.model, sample[:, :context_tokens], cache, 0, chunk)
            kept.extend(_cache_lengths(cache))
            held_bytes.append(kv_bytes(cache))
            if decode_time:  # a decode-time press stays on while the scored tokens stream in
                outputs = _feed(model, scored, cache, context_tokens, chunk)
        if not decode_time:
            outputs = _feed(model, scored, cache, context_tokens, chunk)
        logits = torch.cat([output.logits for output in outputs], dim=1)
        nll_sum += F.cross_entropy(logits[0].float(), sample[0, context_tokens + 1 :], reduction="sum").item()
    return Perplexity(nll_sum, eval_tokens * num_windows, sum(kept) / len(kept),
                      kv_bytes=sum(held_bytes) / len(held_bytes))


@torch.no_grad()
def streaming_nll(
    model, ids: torch.Tensor, press: BasePress | None, chunk_tokens: int, max_tokens: int | None = None
) -> Perplexity:
    """Stream ``ids`` (first ``max_tokens``) in full chunks of ``chunk_tokens``; score every
    token after the first. Without a press the cache grows with the text (dense control)."""
    in_cache = getattr(press, "positions_in_cache", False)
    if chunk_tokens < 1:
        raise ProtocolError(f"--chunk_tokens must be at least 1, got {chunk_tokens}")
    ids = ids[:max_tokens] if max_tokens else ids
    n_chunks = (ids.numel() - 1) // chunk_tokens  # full chunks only: every scoring call sees C queries
    if n_chunks < 1:
        raise ProtocolError(f"text has {ids.numel()} tokens, fewer than one chunk of {chunk_tokens} plus one")
    ids = ids[: n_chunks * chunk_tokens + 1].unsqueeze(0).to(model.device)

    cache, token_nll, held = DynamicCache(), [], []
    with _pressed(press, model):
        for start in tqdm(range(0, n_chunks * chunk_tokens, chunk_tokens), desc="chunks", disable=n_chunks < 8):
            cached = sum(_cache_lengths(cache)) / len(model.model.layers) if start else 0
            first = int(cached) if in_cache else start  # in-cache positions: every layer holds the same count
            positions = torch.arange(first, first + chunk_tokens, device=model.device).unsqueeze(0)
            chunk = ids[:, start : start + chunk_tokens]
            held.append(cached)
            logits = model(input_ids=chunk, past_key_values=cache, position_ids=positions).logits
            targets = ids[0, start + 1 : start + chunk_tokens + 1]
            token_nll.append(F.cross_entropy(logits[0].float(), targets, reduction="none"))
    token_nll = torch.cat(token_nll)
    segments = token_nll.split(SEGMENT_TOKENS)
    return Perplexity(token_nll.sum().item(), token_nll.numel(), sum(held) / len(held),
                      segment_ppl=[segment.mean().exp().item() for segment in segments])
