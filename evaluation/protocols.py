"""Perplexity under KV compression, measured so that compression can matter (DESIGN.md section 5).

A press compresses a layer's cache *after* that layer's attention ran, so one teacher-forced
pass over a whole text with a press active scores every token with the full cache: it
measures nothing. Both protocols here score tokens against a cache that was already pressed.

- ``context``: prefill the first N tokens with the press, then score the next M tokens
  teacher-forced against that compressed cache (kvpress style). Ratio 0 equals dense exactly.
- ``streaming``: feed the text in chunks of C tokens (the last one may be shorter); a streaming
  press (``BudgetPress`` or a method's own) holds each layer's cache at its budget between
  chunks; every token after the first is scored. Positions are the token's index in the text,
  or its slot in the cache for presses with ``positions_in_cache`` (StreamingLLM's rule).

What a budget means: between calls a layer holds at most the budget, but within a call of C
tokens query i also sees the call's first i + 1 keys, so up to budget + C - 1 keys before the
press evicts again. Both protocols record ``peak_attended_keys``, the most keys any scored query
attended (its visible mask entries), beside the mean cache size; C = 1 makes them one.

Both return each unit's NLL sum and token count (a window, or a ``SEGMENT_TOKENS``-token
stretch), from which evaluation/intervals.py bootstraps intervals.
"""

import contextlib
from dataclasses import dataclass

import torch
from kvpress import BasePress, DecodingPress
from torch.nn import functional as F
from tqdm import tqdm
from transformers import DynamicCache

from decoding.kv_cache import fp16_kv_bytes, kv_bytes, make_cache


SEGMENT_TOKENS = 1024  # streaming: PPL is also reported per stretch, to see where a method breaks


class ProtocolError(ValueError):
    """The protocol's settings do not fit the model or the text."""


@dataclass
class Perplexity:
    nll_sum: float
    tokens: int
    cache_tokens: float  # mean over layers (and windows/chunks) of the tokens held when scoring
    token_nll: torch.Tensor  # (tokens,) NLL of each scored token, in text order
    unit_nll: list[float]  # NLL sum of each unit: a context window, or a SEGMENT_TOKENS-token stretch
    unit_tokens: list[int]  # tokens each unit scored
    peak_attended_keys: int  # the most keys any scored query attended, over layers and calls
    scored_range: tuple[int, int]  # the text's token indices [first, last] whose NLL counted
    segment_ppl: list[float] | None = None  # streaming: PPL of each SEGMENT_TOKENS-token stretch of the text
    kv_bytes: float | None = None  # context: bytes the cache held after the pressed prefill (mean over windows)
    stored_kv_bytes: float | None = None  # context: bytes that cache takes stored as the press stores it (stored_bytes)
    dense_kv_bytes: float | None = None  # context: bytes of the context's whole cache in fp16

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def ppl(self) -> float:
        return float(torch.tensor(self.mean_nll).exp())


def _pressed(press: BasePress | None, model):
    return press(model) if press is not None else contextlib.nullcontext()


def stored_bytes(press: BasePress | None, cache) -> float | None:
    """Bytes one sequence's cache takes stored as the press stores it: a press that keeps
    low-bit KV reports each layer's bytes in ``stored_bytes`` (for a ComposedPress, the last
    part that reports a layer); any other layer holds its tokens in fp16. None when a layer
    holds its cache in another form (the cross-layer presses: ``kv_bytes`` counts those)."""
    reported = {}
    for part in getattr(press, "presses", [press]):
        reported |= getattr(part, "stored_bytes", None) or {}
    total = 0.0
    for index, layer in enumerate(cache.layers):
        if index in reported:
            total += reported[index]
        elif hasattr(layer, "held_tensors"):  # rebuilt or shared storage: only kv_bytes counts it
            return None
        elif getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
            total += 2 * layer.keys[0].numel() * 2  # keys and values of one sequence, fp16
        else:
            return None
    return total


def _cache_lengths(cache) -> list[int]:
    return [cache.get_seq_length(index) for index in range(len(cache.layers))]


class AttendedKeys:
    """Counts the keys each query attends (its own included): a forward pre-hook on every
    attention module, added after the press's own (InfLLM's retrieval runs first), reads the
    cache length and the mask the attention will get. A query attends the keys its mask row
    leaves visible (all cached keys, the chunk before it and itself, when the back end gets no
    mask). ``peak`` is the largest count seen while ``counting``; the counts stay on the device
    until it is read, so token-by-token streaming on a GPU does not wait at every layer."""

    def __init__(self):
        self._peak_unmasked, self._peak_masked = 0, None

    @property
    def peak(self) -> int:
        masked = 0 if self._peak_masked is None else int(self._peak_masked)
        return max(self._peak_unmasked, masked)

    @contextlib.contextmanager
    def counting(self, model):
        hooks = [layer.self_attn.register_forward_pre_hook(self._count, with_kwargs=True)
                 for layer in model.model.layers]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def _count(self, module, args, kwargs):
        queries = kwargs["hidden_states"].shape[1]
        keys = kwargs["past_key_values"].get_seq_length(module.layer_idx) + queries
        mask = kwargs.get("attention_mask")
        if mask is None:
            self._peak_unmasked = max(self._peak_unmasked, keys)
            return
        visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        if mask.shape[-1] == keys:
            attended = visible.sum(dim=-1).max()
        else:  # built at another layer's length: the attention sees all cached keys and this causal block
            attended = visible[..., -queries:].sum(dim=-1).max() + (keys - queries)
        self._peak_masked = attended if self._peak_masked is None else torch.maximum(self._peak_masked, attended)


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
    chunk_tokens: int = 128, kv_quant: str = "none", first_window: int = 0,
) -> Perplexity:
    """``num_windows`` consecutive windows of ``context_tokens + eval_tokens + 1`` tokens: prefill
    the context with the press, score ``eval_tokens`` tokens against the pressed cache.

    A decode-time press (a DecodingPress such as InfLLM) only acts while tokens stream in: the
    context is fed in calls of ``chunk_tokens`` and the press stays on while the scored tokens
    are fed the same way. ``kv_quant``: keep the cache quantized (decoding/kv_cache.py).
    ``first_window``: skip that many windows of the text first (a tuning set apart from the
    windows a study reports)."""
    decode_time = isinstance(press, DecodingPress)
    chunk = chunk_tokens if decode_time else None
    check_windows(ids.numel(), model.config.max_position_embeddings, context_tokens, eval_tokens,
                  first_window + num_windows)
    window = context_tokens + eval_tokens + 1

    token_nll, kept, held_bytes, stored, attended = [], [], [], [], AttendedKeys()
    for index in tqdm(range(first_window, first_window + num_windows), desc="windows", disable=num_windows == 1):
        sample = ids[index * window : (index + 1) * window].unsqueeze(0).to(model.device)
        cache = make_cache(model, kv_quant)
        scored = sample[:, context_tokens:-1]  # positions continue from the context length, not the cache size
        with contextlib.ExitStack() as pressing:
            pressing.enter_context(_pressed(press, model))
            _feed(model.model, sample[:, :context_tokens], cache, 0, chunk)
            kept.extend(_cache_lengths(cache))
            held_bytes.append(kv_bytes(cache))
            stored.append(stored_bytes(press, cache))
            if not decode_time:  # a prefill press acts once; a decode-time one stays on while the scored tokens stream in
                pressing.close()
            with attended.counting(model):
                outputs = _feed(model, scored, cache, context_tokens, chunk)
        logits = torch.cat([output.logits for output in outputs], dim=1)
        token_nll.append(F.cross_entropy(logits[0].float(), sample[0, context_tokens + 1 :], reduction="none"))
    window_nll = [nll.sum().item() for nll in token_nll]
    return Perplexity(sum(window_nll), eval_tokens * num_windows, sum(kept) / len(kept), torch.cat(token_nll),
                      unit_nll=window_nll, unit_tokens=[eval_tokens] * num_windows,
                      peak_attended_keys=attended.peak,
                      scored_range=_window_range(window, context_tokens, first_window, num_windows),
                      kv_bytes=sum(held_bytes) / len(held_bytes),
                      stored_kv_bytes=None if None in stored else sum(stored) / len(stored),
                      dense_kv_bytes=fp16_kv_bytes(model.config, context_tokens))


def check_windows(text_tokens: int, limit: int, context_tokens: int, eval_tokens: int, num_windows: int) -> None:
    """Raise a one-line ProtocolError unless ``num_windows`` windows of ``context_tokens`` +
    ``eval_tokens`` fit a model of ``limit`` positions and a text of ``text_tokens`` tokens."""
    for option, value in (("--eval_tokens", eval_tokens), ("--num_windows", num_windows)):
        if value < 1:
            raise ProtocolError(f"{option} must be at least 1, got {value}")
    if context_tokens + eval_tokens > limit:
        raise ProtocolError(
            f"context {context_tokens} + eval {eval_tokens} tokens exceed the model's {limit}-token context; "
            "shorten them or use --protocol streaming for long texts"
        )
    if context_tokens < 1:
        raise ProtocolError(f"context {context_tokens} + eval {eval_tokens} tokens: no context is left in the model's "
                            f"{limit}-token context; lower --eval_tokens or set --context_tokens")
    window = context_tokens + eval_tokens + 1
    if text_tokens < window * num_windows:
        raise ProtocolError(f"text has {text_tokens} tokens, {num_windows} window(s) of {context_tokens} + "
                            f"{eval_tokens} + 1 need {window * num_windows}: lower --num_windows or give a longer text")


def _window_range(window: int, context_tokens: int, first_window: int, num_windows: int) -> tuple[int, int]:
    """The first and last text token scored: window w scores tokens w*window + context + 1 ... (w+1)*window - 1."""
    return first_window * window + context_tokens + 1, (first_window + num_windows) * window - 1


@torch.no_grad()
def streaming_nll(
    model, ids: torch.Tensor, press: BasePress | None, chunk_tokens: int, max_tokens: int | None = None
) -> Perplexity:
    """Stream ``ids`` (the first ``max_tokens``) in chunks of ``chunk_tokens`` (the last may be
    shorter); score every token after the first. Without a press the cache grows with the text
    (dense control)."""
    in_cache = getattr(press, "positions_in_cache", False)
    if chunk_tokens < 1:
        raise ProtocolError(f"--chunk_tokens must be at least 1, got {chunk_tokens}")
    if max_tokens is not None and max_tokens < 2:
        raise ProtocolError(f"--max_tokens must be at least 2 (one token to score after the first), got {max_tokens}")
    ids = ids[:max_tokens] if max_tokens else ids
    if ids.numel() < 2:
        raise ProtocolError(f"text has {ids.numel()} token(s): nothing to score after the first")
    inputs = ids.numel() - 1  # every token but the last is fed; every token but the first is scored
    ids = ids.unsqueeze(0).to(model.device)

    cache, token_nll, held, attended = DynamicCache(), [], [], AttendedKeys()
    with _pressed(press, model), attended.counting(model):
        starts = range(0, inputs, chunk_tokens)
        for start in tqdm(starts, desc="chunks", disable=len(starts) < 8):
            size = min(chunk_tokens, inputs - start)
            cached = sum(_cache_lengths(cache)) / len(model.model.layers) if start else 0
            first = int(cached) if in_cache else start  # in-cache positions: every layer holds the same count
            positions = torch.arange(first, first + size, device=model.device).unsqueeze(0)
            held.append(cached)
            logits = model(input_ids=ids[:, start : start + size], past_key_values=cache, position_ids=positions).logits
            targets = ids[0, start + 1 : start + size + 1]
            token_nll.append(F.cross_entropy(logits[0].float(), targets, reduction="none"))
    token_nll = torch.cat(token_nll)
    segments = token_nll.split(SEGMENT_TOKENS)
    return Perplexity(token_nll.sum().item(), token_nll.numel(), sum(held) / len(held), token_nll,
                      unit_nll=[segment.sum().item() for segment in segments],
                      unit_tokens=[segment.numel() for segment in segments],
                      peak_attended_keys=attended.peak, scored_range=(1, inputs),
                      segment_ppl=[segment.mean().exp().item() for segment in segments])
