"""StreamingLLM decoding at a constant cost per token: the sinks and a recent window in a ring buffer.

StreamingLLM (Xiao et al. 2023) keeps the first ``n_sink`` tokens and the most recent ones, and
counts positions inside the cache rather than in the text, so generation runs past the model's
training length. Its slow form here is ``presses.BudgetPress`` over kvpress's StreamingLLMPress
with ``positions_in_cache`` (``make_streaming_press("streaming_llm", ...)``), decoded by
decoding/reference.py's ``budget_generate``: after every step each layer drops its oldest
non-sink token and every kept key is re-rotated one position back. This file computes the same
attention on the fast path (decoding/neox_decode.py's step, one CUDA graph on CUDA) in a buffer
of fixed size, budget + 1 slots per layer, so the graph replays over any number of new tokens at
the same cost and memory.

- Slots. [0, n_sink) hold the sinks; the other budget + 1 - n_sink slots are a ring holding the
  window and the new token: the token at frame position p (below) lives in slot
  n_sink + (p - n_sink) mod (budget + 1 - n_sink), so each new token overwrites the one the slow
  path evicted after the previous step. The pressed prefill's tokens go to slots 0..kept-1.
- Positions. A rotary score depends on the query's and key's positions only through their
  difference. Call a token's *frame position* its index among the tokens the pressed prefill
  kept (0..kept-1; the text position when the prompt fitted the budget), the new tokens
  continuing from ``kept``. The window is contiguous, so a window key's distance from the new
  query in the slow path's cache equals their frame distance: each key is rotated once, at its
  frame position, when written, and never again. A sink's distance is shorter: the slow path's
  query sits at cache position min(p, budget), not p. The sinks are kept as the prefill left
  them (rotated at 0..n_sink-1) and, each step, rotated on by max(0, p - budget) from that copy,
  so no rounding accumulates (the slow path's re-rotations do: BudgetPress.move_to_slots).
- Angles in float64. Frame positions grow without bound (past 16k here); float32's angle p * f
  would be off by up to p * 2^-24 rad, so the angles are computed in float64 and the cos / sin
  then cast as transformers casts its own.

The ring takes one new token per sequence per step (no speculative verify pass) and its sinks from
the prompt (at least ``n_sink`` tokens). It evicts after every step (``compress_every`` 1).
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
from kvpress import StreamingLLMPress
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb, rotate_half

from decoding import neox_decode
from decoding.kv_cache import tensor_bytes
from decoding.neox_cuda_graphs import TwoStreamStep
from decoding.neox_decode import StepState, attend, final_logits, layer_outputs, next_token, sum_in_order
from patches.gpt_neox import split_qkv
from presses.budget_press import BudgetPress
from presses.errors import PressConfigError


class RingLayer(NamedTuple):
    """One layer's part of the RingBuffer."""

    keys: torch.Tensor
    values: torch.Tensor
    sinks: torch.Tensor
    held: torch.Tensor
    inv_freq: torch.Tensor


@dataclass
class RingBuffer:
    """Per layer (batch, heads, budget + 1, head_dim) keys and values in the patched (kvpress) head
    basis, laid out as the module docstring says; ``sinks``: per layer (batch, heads, n_sink,
    head_dim), the sink keys as the prefill left them; ``held`` (layers, batch): the tokens the
    pressed prefill left in each layer, the frame position of the first new token; ``inv_freq``
    (head_dim / 2,) float64: the rotary frequencies in that basis (0 on the pass-through dims)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    sinks: list[torch.Tensor]
    held: torch.Tensor
    inv_freq: torch.Tensor

    def layer(self, index: int) -> RingLayer:
        return RingLayer(self.keys[index], self.values[index], self.sinks[index], self.held[index], self.inv_freq)

    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for t in self.keys + self.values + self.sinks)

    # What neox_decode.generate reads at its end, as KVBuffer has them: each layer's longest kept
    # sequence is kept - first_valid.min().
    @property
    def kept(self) -> torch.Tensor:
        return self.held.max(dim=1).values

    @property
    def first_valid(self) -> torch.Tensor:
        return self.kept[:, None] - self.held


def ring_settings(press) -> tuple[int, int]:
    """(n_sink, budget) of a press the ring can run: StreamingLLM's rule as a BudgetPress."""
    if not (isinstance(press, BudgetPress) and isinstance(press.base_press, StreamingLLMPress)):
        raise PressConfigError(
            "ring decoding runs StreamingLLM's rule: a BudgetPress over kvpress's StreamingLLMPress "
            f"(make_streaming_press('streaming_llm' or 'sliding_window', Settings(budget=...))), not {press!r}")
    n_sink, budget = press.base_press.n_sink, press.target_size
    if not press.positions_in_cache:
        raise PressConfigError("ring decoding counts positions inside the cache: the press needs positions_in_cache")
    if press.compression_interval != 1:
        raise PressConfigError(f"the ring evicts one token per step: compress_every must be 1, "
                               f"not {press.compression_interval}")
    if n_sink > budget:
        raise PressConfigError(f"{n_sink} sink tokens do not fit a budget of {budget} tokens")
    return n_sink, budget


def load_ring(groups, n_sink: int, budget: int, inv_freq: torch.Tensor) -> RingBuffer:
    """The pressed caches (neox_decode.prefill's (rows, cache) groups) in a new RingBuffer. Each
    source layer is emptied once copied, as neox_decode.load_buffer does."""
    batch = sum(len(rows) for rows, _ in groups)
    layers = len(groups[0][1].layers)
    sample = groups[0][1].layers[0].keys
    shape = (batch, sample.shape[1], budget + 1, sample.shape[3])
    keys, values = [sample.new_zeros(shape) for _ in range(layers)], [sample.new_zeros(shape) for _ in range(layers)]
    held = torch.zeros(layers, batch, dtype=torch.long)
    for rows, cache in groups:
        for layer in range(layers):
            source = cache.layers[layer]
            length = source.keys.shape[2]
            if length > budget:
                raise PressConfigError(f"the prefill left {length} tokens in layer {layer}, more than the ring's "
                                       f"budget of {budget}: prefill with the same press")
            if length < n_sink:
                raise PressConfigError(f"a prompt of {length} tokens holds fewer than the {n_sink} sink tokens: "
                                       "the ring takes its sinks from the prompt")
            keys[layer][rows, :, :length] = source.keys
            values[layer][rows, :, :length] = source.values
            held[layer, rows] = length
            source.keys, source.values = source.keys.new_empty(0), source.values.new_empty(0)
    sinks = [layer_keys[:, :, :n_sink].clone() for layer_keys in keys]
    for tensor in keys + values + sinks:
        torch._dynamo.mark_static_address(tensor)  # the compiled step writes the ring in place, replay after replay
    return RingBuffer(keys, values, sinks, held.to(sample.device), inv_freq.to(sample.device, torch.float64))


def rotation(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and sin (..., head_dim) of the rotary at integer ``positions`` (...), the angles in float64."""
    angle = positions.double()[..., None] * inv_freq
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def attention_branch(layer, parts, cos, sin, ring: RingLayer, new_index, backend: str):
    """neox_decode.attention_branch over the ring (called like it). ``cos``, ``sin`` (the rotary at
    the text positions) are not used: StreamingLLM rotates by frame position (module docstring)."""
    hidden = sum_in_order(parts)
    attention = layer.attention
    query, key, value = split_qkv(attention, layer.input_layernorm(hidden))
    keys, values, sinks = ring.keys, ring.values, ring.sinks
    n_sink, slots = sinks.shape[2], keys.shape[2]
    span, budget = slots - n_sink, slots - 1
    frame = ring.held[:, None] + new_index  # (batch, 1): the new token's frame position
    query, key = apply_rotary_pos_emb(query, key, *rotation(ring.inv_freq, frame, query.dtype))
    # The sinks, rotated on from their stored copy, and the new key at its row's slot, in one
    # index_put: the compiler keeps it in place (a slice assignment beside it made it copy the ring).
    cos, sin = rotation(ring.inv_freq, (frame - budget).clamp(min=0), torch.float32)
    stored = sinks.float()
    sinks_now = (stored * cos[:, None] + rotate_half(stored) * sin[:, None]).to(keys.dtype)
    slot = n_sink + (frame - n_sink) % span  # (batch, 1)
    sink_slots = torch.arange(n_sink, device=keys.device).expand(slot.shape[0], -1)
    rows = torch.arange(key.shape[0], device=keys.device)[:, None, None]
    heads = torch.arange(key.shape[1], device=keys.device)[None, :, None]
    keys[rows, heads, torch.cat([sink_slots, slot], dim=1)[:, None]] = torch.cat([sinks_now, key], dim=2)
    values[rows, heads, slot[:, None]] = value
    # (batch, 1, slots): a sink, or a ring slot whose latest frame position so far is past the sinks
    slot_index = torch.arange(slots, device=keys.device)
    latest = frame[..., None] - (frame[..., None] - slot_index) % span
    visible = (slot_index < n_sink) | (latest >= n_sink)
    attended = attend(query, keys, values, visible, attention.scaling, backend)
    return hidden, attention.dense(attended.transpose(1, 2).reshape(hidden.shape))


def decode_step(model, state: StepState):
    """neox_decode.decode_step over the ring."""
    return next_token(final_logits(model, layer_outputs(model, state, attention_branch)),
                      state.temperature, state.top_k, state.noise)


class RingTwoStreamStep(TwoStreamStep):
    """The two-stream CUDA graph (decoding/neox_cuda_graphs.py) over the ring. Each generation
    loads a new ring, so its graph is captured again (a fixed cost, docs/fast_decode.md)."""

    def __init__(self):
        super().__init__(keep_buffer=False)
        self.attention_fn = torch.compile(attention_branch, fullgraph=True)


def compiled_step(compile: bool):
    """The ring's step as the two-stream CUDA graph, or as is (CPU)."""
    return RingTwoStreamStep() if compile else decode_step


class RingStep:
    """``step`` (``decode_step`` or ``RingTwoStreamStep``) with the ring as its buffer: neox_decode.generate
    loads the pressed caches through ``load_buffer`` (neox_decode.OwnsBuffer)."""

    def __init__(self, n_sink: int, budget: int, inv_freq: torch.Tensor, step=decode_step):
        self.n_sink, self.budget, self.inv_freq, self.step = n_sink, budget, inv_freq, step

    def load_buffer(self, groups, new_tokens: int, kv_bits: tuple[int, int] | None = None) -> RingBuffer:
        """The ring: its size is the budget's, whatever ``new_tokens``."""
        if kv_bits is not None:
            raise ValueError("the ring holds fp keys and values: no kv_bits")
        return load_ring(groups, self.n_sink, self.budget, self.inv_freq)

    def __call__(self, model, state: StepState):
        if state.token.shape[1] != 1:
            raise ValueError(f"the ring takes one new token per sequence per step, not {state.token.shape[1]}")
        return self.step(model, state)


def generate(model, prompts: list[torch.Tensor], press, new_tokens: int, step=decode_step, **options):
    """neox_decode.generate with StreamingLLM's rule on the ring: ``press`` (``ring_settings``) at
    the prefill, then ``new_tokens`` tokens at a constant cost each. ``step``: ``decode_step`` or
    ``compiled_step(True)``; ``options``: neox_decode.generate's (backend, sampling, mark)."""
    n_sink, budget = ring_settings(press)
    rotary = model.model.rotary_emb
    if rotary.rope_type != "default":
        raise PressConfigError(f"the ring rotates with the default rotary, not {rotary.rope_type!r}")
    ring = RingStep(n_sink, budget, rotary.inv_freq, step)
    return neox_decode.generate(model, prompts, press, new_tokens, step=ring, **options)
