"""GPT-NeoX decoding written out plainly (gpt-fast style): the whole decode step in one function.

Why a second decode path next to ``decoding/static_cache.py`` (Hugging Face model + StaticCache):
the HF step carries cache objects, mask builders and hooks that torch.compile cannot fold into
one graph, so its compiled step stays well above the memory-bandwidth floor (measured:
docs/fast_decode.md). Here the step is a few tensor operations per layer over the model's own
weights (nothing copied), compiled whole (``fullgraph=True``) and replayed as one CUDA graph
(decoding/neox_cuda_graphs.py).

The KV buffer is preallocated per layer for what the press kept there plus the new tokens.
Layers may keep different numbers of tokens (PyramidKV budgets): each layer's buffer is as long
as its own longest sequence. Sequences may too (different prompt lengths in one batch): within a
layer each sequence is right-aligned, so that every sequence's n-th new token goes to the same
slot, and the slots in front of a shorter cache are masked out. Positions continue from each
sequence's own prompt length.

Attention back ends by name: ``sdpa`` (torch's scaled_dot_product_attention with a boolean
mask), ``flex`` (FlexAttention; compiled on CUDA it runs its split-KV decoding kernel,
Flash-Decoding style), ``eager`` (matmul, fp32 softmax, matmul, as transformers' eager) and
``split_kv`` (decoding/split_kv_attention.py: a Triton split-KV decode kernel, Flash-Decoding).
``generate`` runs the prompt's prefill through transformers' attention of the same name (``split_kv``:
SDPA's), so one name picks the back end of both phases.

With ``kv_bits`` (key bits, value bits: 8 or 4) the buffer holds each layer's keys and values as
decoding/quantized_kv_attention.py's ``QuantizedTensor`` (codes, and one fp16 scale and zero point per
(token, head)), written as the tensors are (the pressed caches quantized layer by layer, each new
token's key and value quantized inside the step) and read by that module's kernel. Keys are quantized
per token only: the kernel can take keys centred per channel, but the buffer does not store them so.

Greedy or sampled (temperature, top-k), sampling through the Gumbel-max trick so the random
draw is an input of the step and the same noise gives the same tokens on any path.
"""

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers import DynamicCache
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from decoding import reference
from decoding.kv_cache import kv_bytes, tensor_bytes
from decoding.reference import END, FIRST_TOKEN, START, Generation, PhaseMarker, no_mark
from patches.gpt_neox import split_qkv

if TYPE_CHECKING:  # imported where used: it needs Triton (see ``attend``)
    from decoding.quantized_kv_attention import QuantizedTensor

ATTENTION_BACKENDS = ("sdpa", "flex", "eager", "split_kv")
# transformers' names; split_kv is a decode kernel (one query per sequence and head): SDPA prefills
PREFILL_ATTENTION = {"sdpa": "sdpa", "flex": "flex_attention", "eager": "eager", "split_kv": "sdpa"}


class LayerKV(NamedTuple):
    """One layer's part of the KVBuffer."""

    keys: "torch.Tensor | QuantizedTensor"
    values: "torch.Tensor | QuantizedTensor"
    kept: torch.Tensor
    first_valid: torch.Tensor


@dataclass
class KVBuffer:
    """Per layer (batch, heads, slots, head_dim) keys and values, in the patched (kvpress)
    head basis: tensors, or with ``kv_bits`` quantized stores (see ``QuantizedTensor``); ``kept``
    (layers,): slots filled after prefill, where the first new token goes; ``first_valid``
    (layers, batch): the first slot holding a real token; ``kept_slots``: ``kept`` on the host."""

    keys: list["torch.Tensor | QuantizedTensor"]
    values: list["torch.Tensor | QuantizedTensor"]
    kept: torch.Tensor
    first_valid: torch.Tensor
    kept_slots: tuple[int, ...]

    def layer(self, index: int) -> LayerKV:
        return LayerKV(self.keys[index], self.values[index], self.kept[index], self.first_valid[index])

    def new_slots(self) -> int:
        """Slots for new tokens after each layer's kept ones (the same in every layer)."""
        return self.keys[0].shape[2] - self.kept_slots[0]

    def prefix(self, new_slots: int) -> "KVBuffer":
        """Each layer cut to its kept slots and the first ``new_slots`` new ones: views of the same
        memory (writes land in this buffer), so that attention reads and masks no slot past them.
        Tensors only: quantized stores are not cut."""
        if not 0 < new_slots <= self.new_slots():
            raise ValueError(f"new_slots must be in [1, {self.new_slots()}], got {new_slots}")
        ends = [kept + new_slots for kept in self.kept_slots]
        return KVBuffer([keys[:, :, :end] for keys, end in zip(self.keys, ends)],
                        [values[:, :, :end] for values, end in zip(self.values, ends)],
                        self.kept, self.first_valid, self.kept_slots)

    def nbytes(self) -> int:
        return sum(tensor_bytes(t) if isinstance(t, torch.Tensor) else t.nbytes for t in self.keys + self.values)


def empty_store(like: torch.Tensor, shape: tuple, bits: int | None):
    """Zeroed keys or values of ``shape``: a tensor like ``like`` (``bits`` None) or a quantized store."""
    if bits is not None:
        from decoding.quantized_kv_attention import empty_quantized  # needs Triton (see ``attend``)
        return empty_quantized(shape, bits, like.device)
    store = like.new_zeros(shape)
    # Fixed addresses: the compiled step writes into these in place, replay after replay.
    torch._dynamo.mark_static_address(store)
    return store


def store_layout(store) -> tuple:
    """What a refilled store must match: its shape and dtype, or its shape and bits."""
    return tuple(store.shape), store.dtype if isinstance(store, torch.Tensor) else store.bits


def load_buffer(groups: list[tuple[list[int], DynamicCache]], new_tokens: int,
                into: KVBuffer | None = None, kv_bits: tuple[int, int] | None = None) -> KVBuffer:
    """Right-align the pressed caches into one buffer with ``new_tokens`` free slots. ``groups``:
    (rows of the batch, the cache prefilled for them together). Each source layer is emptied once
    copied, so the pressed caches and the buffer never both hold everything (large batches fit).
    ``into``: a buffer to refill rather than allocate (a CUDA graph captured over it reads the same
    addresses again); used if every layer has the shape needed, else dropped before allocating.
    ``kv_bits``: (key bits, value bits), 8 or 4, to store each (token, head) quantized (see ``QuantizedTensor``)."""
    batch = sum(len(rows) for rows, _ in groups)
    layers = len(groups[0][1].layers)
    lengths = torch.zeros(layers, batch, dtype=torch.long)
    for rows, cache in groups:
        for layer in range(layers):
            lengths[layer, rows] = cache.layers[layer].keys.shape[2]
    kept = lengths.max(dim=1).values
    sample = groups[0][1].layers[0].keys
    shapes = [(batch, sample.shape[1], int(end) + new_tokens, sample.shape[3]) for end in kept]
    key_bits, value_bits = kv_bits or (None, None)
    if into is not None and [(store_layout(k), store_layout(v)) for k, v in zip(into.keys, into.values)] != [
            ((shape, sample.dtype if key_bits is None else key_bits),
             (shape, sample.dtype if value_bits is None else value_bits)) for shape in shapes]:
        into = None  # the caller handed over its reference: the old buffer is freed here
    keys, values = [], []
    for layer, shape in enumerate(shapes):
        end = int(kept[layer])
        if into is None:
            layer_keys, layer_values = empty_store(sample, shape, key_bits), empty_store(sample, shape, value_bits)
        else:  # zeroed, so that a refilled buffer holds exactly what a new one would
            layer_keys, layer_values = into.keys[layer].zero_(), into.values[layer].zero_()
        for rows, cache in groups:
            source = cache.layers[layer]
            length = source.keys.shape[2]
            layer_keys[rows, :, end - length : end] = source.keys
            layer_values[rows, :, end - length : end] = source.values
            source.keys, source.values = source.keys.new_empty(0), source.values.new_empty(0)
        keys.append(layer_keys)
        values.append(layer_values)
    first_valid = kept[:, None] - lengths
    if into is None:
        return KVBuffer(keys, values, kept.to(sample.device), first_valid.to(sample.device), tuple(kept.tolist()))
    into.kept.copy_(kept)  # in place too: the captured graph reads these tensors
    into.first_valid.copy_(first_valid)
    into.kept_slots = tuple(kept.tolist())
    return into


@dataclass
class StepState:
    """What one decode step reads besides the weights. ``token`` and ``position`` (batch, new):
    the new tokens and their text positions; ``new_index`` (new,): how many tokens were generated
    before each (they go to slot kept + new_index of every layer; each new token sees the ones
    before it). One token per sequence is a decode step; several are a speculative verify pass.
    ``noise``: the sampling draw (see ``choice_scores``; None when greedy). ``filled``: on the host,
    the new slots in use once this step has written (max(new_index) + 1), for a step that reads
    only the buffer's filled part (decoding/neox_cuda_graphs.py's prefix buckets); None: unknown."""

    buffer: KVBuffer
    token: torch.Tensor
    position: torch.Tensor
    new_index: torch.Tensor
    noise: torch.Tensor | None = None
    backend: str = "sdpa"
    temperature: float = 0.0
    top_k: int | None = None
    filled: int | None = None


def check_kv_bits(kv_bits: tuple[int, int]) -> None:
    """ValueError unless ``kv_bits`` is (key bits, value bits), each one the quantized kernel reads."""
    from decoding.quantized_kv_attention import check_bits  # needs Triton (see ``attend``)
    if len(kv_bits) != 2:
        raise ValueError(f"kv_bits {kv_bits!r}: (key bits, value bits)")
    for bits in kv_bits:
        check_bits(bits)


def unknown_backend(backend: str) -> ValueError:
    return ValueError(f"unknown attention back end {backend!r}; choose from {', '.join(ATTENTION_BACKENDS)}")


def attend(query, keys, values, visible, scaling: float, backend: str):
    """Attention of the new tokens' queries (batch, heads, new, dim) over the buffer's slots
    where ``visible`` (batch, new, slots) is True. Quantized stores are read by the one kernel
    that reads codes, whatever ``backend`` says."""
    if not isinstance(keys, torch.Tensor):
        from decoding.quantized_kv_attention import QuantizedKV, attend_quantized  # needs Triton, as split_kv
        return attend_quantized(query, QuantizedKV(keys, values), visible, scaling)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=visible[:, None], scale=scaling)
    if backend == "flex":
        def is_visible(batch, head, query_index, slot):
            return visible[batch, query_index, slot]
        # A block mask rather than a score modification: blocks of slots nobody sees (not yet
        # written, padding in front of a shorter sequence) are skipped, not read and masked.
        block_mask = create_block_mask(is_visible, B=visible.shape[0], H=None, Q_LEN=visible.shape[1],
                                       KV_LEN=visible.shape[2], device=query.device)
        return flex_attention(query, keys, values, block_mask=block_mask, scale=scaling)
    if backend == "eager":
        scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
        scores = scores.masked_fill(~visible[:, None], torch.finfo(scores.dtype).min)
        return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), values)
    if backend == "split_kv":
        # Imported here: it needs Triton (in torch's CUDA builds; on a CPU the [triton] extra's interpreter).
        from decoding.split_kv_attention import split_kv_attention
        return split_kv_attention(query, keys, values, visible, scaling)
    raise unknown_backend(backend)


def choice_scores(logits: torch.Tensor, temperature: float, top_k: int | None, noise: torch.Tensor | None):
    """What ``next_token`` takes the argmax of: the logits when ``temperature`` is 0; else the
    ``top_k`` best logits / ``temperature`` (the rest -inf) plus Gumbel noise made from ``noise``
    (uniform in (0, 1), logits' shape), whose argmax is a draw from their softmax."""
    if temperature == 0:
        return logits
    logits = logits.float() / temperature
    if top_k is not None:
        kth_best = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, -float("inf"))
    return logits - torch.log(-torch.log(noise))


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, noise: torch.Tensor | None):
    """The token after each position of ``logits`` (..., vocab): greedy when ``temperature`` is
    0; else a draw from softmax(logits / temperature) over the ``top_k`` best (Gumbel-max)."""
    return choice_scores(logits, temperature, top_k, noise).argmax(-1)


def attention_branch(layer, parts, cos, sin, layer_kv: LayerKV, new_index, backend: str):
    """One layer's attention. ``parts``: the terms whose sum is the layer's input (the previous
    layer's outputs and residual, summed here so the sum fuses into the layer norm's kernel);
    ``layer_kv``: the layer's part of the buffer, passed in rather than looked up so that one
    compiled branch serves every layer. Writes the new tokens' keys and values; returns (the
    layer's input, the attention output)."""
    hidden = sum_in_order(parts)
    query, key, value = split_qkv(layer.attention, layer.input_layernorm(hidden))
    return hidden, attention_output(layer.attention, query, key, value, cos, sin, layer_kv, new_index, backend)


def attention_output(attention, query, key, value, cos, sin, layer_kv: LayerKV, new_index, backend: str):
    """The new tokens' pre-RoPE queries, keys and values (batch, heads, new, head_dim) through
    rotary, the buffer (their keys and values written) and attention, to the output projection
    (batch, new, hidden). Shared by ``attention_branch`` and decoding/fused_projections.py."""
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    keys, values = layer_kv.keys, layer_kv.values
    slot = layer_kv.kept + new_index
    keys.index_copy_(2, slot, key)
    values.index_copy_(2, slot, value)
    slots = torch.arange(keys.shape[2], device=slot.device)
    # (batch, new, slots): a real token (not padding in front of a shorter sequence) already written
    visible = (slots <= slot[:, None]) & (slots >= layer_kv.first_valid[:, None, None])
    attended = attend(query, keys, values, visible, attention.scaling, backend)
    return attention.dense(attended.transpose(1, 2).flatten(2))


def mlp_branch(layer, parts):
    """One layer's MLP on the sum of ``parts`` (see ``attention_branch``)."""
    return layer.mlp(layer.post_attention_layernorm(sum_in_order(parts)))


def mlp_hidden(layer, parts):
    """``mlp_branch`` up to its activation: the input GEMV and the GELU (``mlp_output`` finishes it)."""
    mlp = layer.mlp
    return mlp.act(mlp.dense_h_to_4h(layer.post_attention_layernorm(sum_in_order(parts))))


def mlp_output(layer, hidden):
    """The rest of ``mlp_branch`` after ``mlp_hidden``: the output GEMV."""
    return layer.mlp.dense_4h_to_h(hidden)


def sum_in_order(parts):
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def layer_outputs(model, state: StepState, attention_fn=attention_branch, mlp_fn=mlp_branch):
    """The new tokens through every layer; returns the terms whose sum is the last layer's output.
    A model view running fewer layers (decoding/layer_skip.py) reads and writes only its layers'
    buffers. ``attention_fn`` / ``mlp_fn``: the branches, compiled apart by the two-stream step
    (decoding/neox_cuda_graphs.py), which runs each parallel-residual layer's MLP beside its
    attention: both read the same input and meet only in the residual sum."""
    neox = model.gpt_neox
    parts = (neox.embed_in(state.token),)
    cos, sin = neox.rotary_emb(parts[0], position_ids=state.position)
    for layer in neox.layers:
        layer_kv = state.buffer.layer(layer.attention.layer_idx)
        if layer.use_parallel_residual:
            mlp_out = mlp_fn(layer, parts)
            hidden, attended = attention_fn(layer, parts, cos, sin, layer_kv, state.new_index, state.backend)
            # The same residual arithmetic, in the same order, as transformers' GPTNeoXLayer.
            parts = (mlp_out, attended, hidden)
        else:
            hidden, attended = attention_fn(layer, parts, cos, sin, layer_kv, state.new_index, state.backend)
            parts = (mlp_fn(layer, (attended, hidden)), attended + hidden)
    return parts


def final_logits(model, parts):
    """The logits (batch, new, vocab) from the last layer's output terms."""
    return model.embed_out(model.gpt_neox.final_layer_norm(sum_in_order(parts)))


def forward_logits(model, state: StepState):
    """The new tokens' logits (batch, new, vocab)."""
    return final_logits(model, layer_outputs(model, state))


def decode_step(model, state: StepState):
    """``forward_logits``, then the token after each new token (batch, new) by ``next_token``."""
    return next_token(forward_logits(model, state), state.temperature, state.top_k, state.noise)


@torch.no_grad()
def prefill(model, prompts: list[torch.Tensor], press=None,
            prefill_batch: int | None = None) -> tuple[torch.Tensor, list]:
    """Each prompt (1, length) with the press, prompts of one length together as one batch, or
    in micro-batches of at most ``prefill_batch`` of them (None: all together); returns the
    last-position logits (batch, vocab) in input order and the (rows, pressed cache) groups.

    Only the last position goes through the output head (a whole prompt's logits would be batch x
    length x vocab). What a large batch's prefill holds is every sequence's pressed cache plus one
    forward's activations; micro-batches bound the second (a 160 x 2000 prefill of Pythia-2.8B runs
    several GB-sized MLP and QKV tensors per layer) and, with a press, the cache one forward
    holds before its press cuts it. A press scores each sequence on its own, so the tokens are the
    same either way up to floating-point reassociation of the smaller matmuls."""
    if model.config.model_type != "gpt_neox":
        raise ValueError(f"the plain decode step is written for GPT-NeoX, not {model.config.model_type}")
    if prefill_batch is not None and prefill_batch < 1:
        raise ValueError(f"prefill_batch must be at least 1, got {prefill_batch}")
    by_length = {}
    for row, prompt in enumerate(prompts):
        by_length.setdefault(prompt.shape[1], []).append(row)
    chunks = [rows[start : start + (prefill_batch or len(rows))] for rows in by_length.values()
              for start in range(0, len(rows), prefill_batch or len(rows))]
    logits, groups = [None] * len(prompts), []
    for rows in chunks:
        group_logits, cache = reference.prefill(model, torch.cat([prompts[row] for row in rows]), press)
        for offset, row in enumerate(rows):
            logits[row] = group_logits[offset]
        groups.append((rows, cache))
    return torch.stack(logits), groups


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """The model's transformers attention set to ``name`` inside the block, restored after."""
    previous = model.config._attn_implementation
    if name != previous:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if name != previous:
            model.set_attn_implementation(previous)


def _noise(shape, device, generator):
    # Uniform in (0, 1): the open interval keeps log(-log(u)) finite.
    return torch.rand(shape, device=device, generator=generator).clamp_(torch.finfo(torch.float32).tiny, 1.0)



@runtime_checkable
class OwnsBuffer(Protocol):
    """A step that keeps the KV buffer its CUDA graph reads (decoding/neox_cuda_graphs.py's
    ``TwoStreamStep``): ``generate`` loads the pressed caches through it, so that it can refill
    that buffer in place."""

    def load_buffer(self, groups: list[tuple[list[int], DynamicCache]], new_tokens: int,
                    kv_bits: tuple[int, int] | None = None) -> KVBuffer: ...


@torch.no_grad()
def generate(model, prompts: list[torch.Tensor], press, new_tokens: int, step=decode_step, backend: str = "sdpa",
             temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None,
             mark: PhaseMarker = no_mark, prefill_batch: int | None = None,
             kv_bits: tuple[int, int] | None = None) -> Generation:
    """Exactly ``new_tokens`` tokens (no early stop) after each prompt (1, length_i), the press
    applied at prefill; returns the tokens (batch, new_tokens) and the cache sizes (kept: each
    layer's longest kept sequence). ``step``: ``decode_step`` or one from
    decoding/neox_cuda_graphs.py's ``compiled_step``; ``backend``: the attention of the decode step
    and of the prefill. ``mark``: see decoding/reference.py (the first token is marked after the
    copy into the buffer). ``prefill_batch``: see ``prefill``. ``kv_bits``: (key bits, value bits),
    8 or 4: the buffer quantized per (token, head), read by the quantized kernel (``backend``
    then picks the prefill's attention only)."""
    if backend not in ATTENTION_BACKENDS:
        raise unknown_backend(backend)
    if kv_bits is not None:
        check_kv_bits(kv_bits)
    device = model.device
    batch = len(prompts)
    sampled = temperature > 0
    noise_shape = (batch, 1, model.config.vocab_size)
    with attention_implementation(model, PREFILL_ATTENTION[backend]):
        mark(START)
        logits, groups = prefill(model, prompts, press, prefill_batch)
    token = next_token(logits[:, None], temperature, top_k, _noise(noise_shape, device, generator) if sampled else None)
    kept_bytes = sum(kv_bytes(cache) for _, cache in groups)
    load = step.load_buffer if isinstance(step, OwnsBuffer) else load_buffer
    buffer = load(groups, new_tokens, kv_bits=kv_bits)
    mark(FIRST_TOKEN)
    lengths = torch.tensor([[prompt.shape[1]] for prompt in prompts], device=device)
    generated = [token]
    for index in range(new_tokens - 1):
        # Filled on the device: a tensor copied from a Python list waits for the GPU to finish the
        # step before, and the host's per-step work (guards, graph launch) would then add to every
        # step instead of running ahead of the GPU.
        new_index = torch.full((1,), index, device=device)
        noise = _noise(noise_shape, device, generator) if sampled else None
        state = StepState(buffer, token, lengths + index, new_index, noise, backend, temperature, top_k, index + 1)
        # CUDA graphs reuse their output buffers: clone before the next replay overwrites it.
        token = step(model, state).clone()
        generated.append(token)
    mark(END)
    # each layer's longest kept sequence (the batch's prompts alike: every one's)
    kept = (buffer.kept - buffer.first_valid.min(dim=1).values).tolist()
    return Generation(torch.cat(generated, dim=1), kept, kept_bytes, buffer.nbytes())
