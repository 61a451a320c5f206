"""GPT-NeoX decoding written out plainly (gpt-fast style): the whole decode step in one function.

Why a second decode path next to ``decoding/generate.py`` (Hugging Face model + StaticCache):
the HF step carries cache objects, mask builders and hooks that torch.compile cannot fold into
one graph, so the compiled step still costs twice the memory-bandwidth floor on an H100. Here
the step is a few tensor operations per layer over the model's own weights (nothing copied),
compiled whole (``fullgraph=True``), replayed as one CUDA graph.

The KV buffer is preallocated per layer for what the press kept there plus the new tokens.
Layers may keep different numbers of tokens (PyramidKV budgets): each layer's buffer is as long
as its own longest sequence. Sequences may too (different prompt lengths in one batch): within a
layer each sequence is right-aligned, so that every sequence's n-th new token goes to the same
slot, and the slots in front of a shorter cache are masked out. Positions continue from each
sequence's own prompt length.

Attention back ends by name: ``sdpa`` (torch's scaled_dot_product_attention with a boolean
mask), ``flex`` (FlexAttention; compiled on CUDA it runs its split-KV decoding kernel,
Flash-Decoding style) and ``eager`` (matmul, fp32 softmax, matmul, as transformers' eager).
``generate`` runs the prompt's prefill through transformers' attention of the same name, so one
name picks the back end of both phases.
Greedy or sampled (temperature, top-k), sampling through the Gumbel-max trick so the random
draw is an input of the step and the same noise gives the same tokens on any path.
"""

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention
from transformers import DynamicCache
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from decoding import generate as hf_static
from decoding.kv_cache import kv_bytes, tensor_bytes
from patches.gpt_neox import split_qkv

ATTENTION_BACKENDS = ("sdpa", "flex", "eager")
PREFILL_ATTENTION = {"sdpa": "sdpa", "flex": "flex_attention", "eager": "eager"}  # transformers' names


@dataclass
class KVBuffer:
    """Per layer (batch, heads, slots, head_dim) keys and values, in the patched (kvpress)
    head basis; ``kept`` (layers,): slots filled after prefill, where the first new token goes;
    ``first_valid`` (layers, batch): the first slot holding a real token."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    kept: torch.Tensor
    first_valid: torch.Tensor

    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for t in self.keys + self.values)


def load_buffer(groups: list[tuple[list[int], DynamicCache]], new_tokens: int) -> KVBuffer:
    """Right-align the pressed caches into one buffer with ``new_tokens`` free slots. ``groups``:
    (rows of the batch, the cache prefilled for them together). Each source layer is emptied once
    copied, so the pressed caches and the buffer never both hold everything (large batches fit)."""
    batch = sum(len(rows) for rows, _ in groups)
    layers = len(groups[0][1].layers)
    lengths = torch.zeros(layers, batch, dtype=torch.long)
    for rows, cache in groups:
        for layer in range(layers):
            lengths[layer, rows] = cache.layers[layer].keys.shape[2]
    kept = lengths.max(dim=1).values
    sample = groups[0][1].layers[0].keys
    keys, values = [], []
    for layer in range(layers):
        end = int(kept[layer])
        shape = (batch, sample.shape[1], end + new_tokens, sample.shape[3])
        layer_keys, layer_values = sample.new_zeros(shape), sample.new_zeros(shape)
        for rows, cache in groups:
            source = cache.layers[layer]
            length = source.keys.shape[2]
            layer_keys[rows, :, end - length : end] = source.keys
            layer_values[rows, :, end - length : end] = source.values
            source.keys, source.values = source.keys.new_empty(0), source.values.new_empty(0)
        # Fixed addresses: the compiled step writes into these in place, replay after replay.
        torch._dynamo.mark_static_address(layer_keys)
        torch._dynamo.mark_static_address(layer_values)
        keys.append(layer_keys)
        values.append(layer_values)
    return KVBuffer(keys, values, kept.to(sample.device), (kept[:, None] - lengths).to(sample.device))


def unknown_backend(backend: str) -> ValueError:
    return ValueError(f"unknown attention back end {backend!r}; choose from {', '.join(ATTENTION_BACKENDS)}")


def attend(query, keys, values, visible, scaling: float, backend: str):
    """Attention of the new tokens' queries (batch, heads, new, dim) over the buffer's slots
    where ``visible`` (batch, new, slots) is True."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=visible[:, None], scale=scaling)
    if backend == "flex":
        def hide_padding(score, batch, head, query_index, slot):
            return torch.where(visible[batch, query_index, slot], score, -float("inf"))
        return flex_attention(query, keys, values, score_mod=hide_padding, scale=scaling)
    if backend == "eager":
        scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
        scores = scores.masked_fill(~visible[:, None], torch.finfo(scores.dtype).min)
        return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), values)
    raise unknown_backend(backend)


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None, noise: torch.Tensor | None):
    """The token after each position of ``logits`` (..., vocab): greedy when ``temperature`` is
    0; else a draw from softmax(logits / temperature) over the ``top_k`` best, using ``noise``
    (uniform in (0, 1), logits' shape) by the Gumbel-max trick."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_best = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, -float("inf"))
    return (logits - torch.log(-torch.log(noise))).argmax(-1)


def forward_logits(model, token, buffer: KVBuffer, position, new_index, backend: str = "sdpa"):
    """New tokens through the model, returning their logits (batch, new, vocab): ``token`` and
    ``position`` (batch, new); ``new_index`` (new,): how many tokens were generated before each
    (they go to slot kept + new_index of every layer); each new token sees the ones before it.
    One token per sequence is a decode step; several are a speculative verify pass. A model
    view running fewer layers (decoding/layer_skip.py) reads and writes only its layers' buffers."""
    neox = model.gpt_neox
    hidden = neox.embed_in(token)
    cos, sin = neox.rotary_emb(hidden, position_ids=position)
    for layer in neox.layers:
        attention = layer.attention
        index = attention.layer_idx
        query, key, value = split_qkv(attention, layer.input_layernorm(hidden))
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        slot = buffer.kept[index] + new_index
        buffer.keys[index].index_copy_(2, slot, key)
        buffer.values[index].index_copy_(2, slot, value)
        slots = torch.arange(buffer.keys[index].shape[2], device=token.device)
        # (batch, new, slots): a real token (not padding in front of a shorter sequence) already written
        visible = (slots <= slot[:, None]) & (slots >= buffer.first_valid[index][:, None, None])
        attended = attend(query, buffer.keys[index], buffer.values[index], visible, attention.scaling, backend)
        attended = attention.dense(attended.transpose(1, 2).reshape(hidden.shape))
        # The same residual arithmetic, in the same order, as transformers' GPTNeoXLayer.
        if layer.use_parallel_residual:
            hidden = layer.mlp(layer.post_attention_layernorm(hidden)) + attended + hidden
        else:
            attended = attended + hidden
            hidden = layer.mlp(layer.post_attention_layernorm(attended)) + attended
    return model.embed_out(neox.final_layer_norm(hidden))


def decode_step(model, token, position, new_index, buffer: KVBuffer, noise=None, backend: str = "sdpa",
                temperature: float = 0.0, top_k: int | None = None):
    """``forward_logits``, then the token after each new token (batch, new) by ``next_token``."""
    return next_token(forward_logits(model, token, buffer, position, new_index, backend), temperature, top_k, noise)


def compiled_step(compile: bool, mode: str = "reduce-overhead"):
    """The decode step compiled whole (CUDA-graph replay with ``reduce-overhead`` and
    ``max-autotune``), or as is. ``max-autotune`` also benchmarks Triton matmul templates
    against cuBLAS and, as gpt-fast does, tunes the fused kernels' launch shapes."""
    if not compile:
        return decode_step
    if mode == "max-autotune":
        torch._inductor.config.coordinate_descent_tuning = True
    return torch.compile(decode_step, mode=mode, fullgraph=True)


@torch.no_grad()
def prefill(model, prompts: list[torch.Tensor], press=None) -> tuple[torch.Tensor, list]:
    """Each prompt (1, length) with the press, prompts of one length together as one batch;
    returns the last-position logits (batch, vocab) in input order and the (rows, pressed
    cache) groups."""
    if model.config.model_type != "gpt_neox":
        raise ValueError(f"the plain decode step is written for GPT-NeoX, not {model.config.model_type}")
    by_length = {}
    for row, prompt in enumerate(prompts):
        by_length.setdefault(prompt.shape[1], []).append(row)
    logits, groups = [None] * len(prompts), []
    for rows in by_length.values():
        group_logits, cache = hf_static.prefill(model, torch.cat([prompts[row] for row in rows]), press)
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


@torch.no_grad()
def generate(model, prompts: list[torch.Tensor], press, new_tokens: int, step=decode_step, backend: str = "sdpa",
             temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None,
             timings: dict | None = None) -> torch.Tensor:
    """Exactly ``new_tokens`` tokens (no early stop) after each prompt (1, length_i), the press
    applied at prefill; returns (batch, new_tokens). ``step``: ``decode_step`` or
    ``compiled_step(True)``; ``backend``: the attention of the decode step and of the prefill.
    ``timings``, if given, receives ttft_s (prefill, first token and the copy into the buffer),
    decode_s, kept tokens and KV bytes."""
    if backend not in ATTENTION_BACKENDS:
        raise unknown_backend(backend)
    device = model.device
    batch = len(prompts)
    sampled = temperature > 0
    noise_shape = (batch, 1, model.config.vocab_size)
    with attention_implementation(model, PREFILL_ATTENTION[backend]):
        hf_static.synchronize(device)
        start = time.perf_counter()
        logits, groups = prefill(model, prompts, press)
    token = next_token(logits[:, None], temperature, top_k, _noise(noise_shape, device, generator) if sampled else None)
    kept_bytes = sum(kv_bytes(cache) for _, cache in groups)
    buffer = load_buffer(groups, new_tokens)
    hf_static.synchronize(device)
    first_token_at = time.perf_counter()
    lengths = torch.tensor([[prompt.shape[1]] for prompt in prompts], device=device)
    generated = [token]
    for index in range(new_tokens - 1):
        # Filled on the device: a tensor copied from a Python list waits for the GPU to finish the
        # step before, and the host's per-step work (guards, graph launch) would then add to every
        # step instead of running ahead of the GPU.
        new_index = torch.full((1,), index, device=device)
        noise = _noise(noise_shape, device, generator) if sampled else None
        # CUDA graphs reuse their output buffers: clone before the next replay overwrites it.
        token = step(model, token, lengths + index, new_index, buffer, noise, backend, temperature, top_k).clone()
        generated.append(token)
    hf_static.synchronize(device)
    if timings is not None:
        timings.update(ttft_s=first_token_at - start, decode_s=time.perf_counter() - first_token_at,
                       kept_tokens_layer0=int(buffer.kept[0] - buffer.first_valid[0].min()),
                       kv_bytes_after_prefill=kept_bytes, kv_bytes_final=buffer.nbytes())
    return torch.cat(generated, dim=1)
