"""GPT-NeoX decoding written out plainly (gpt-fast style): the whole decode step in one function.

Why a second decode path next to ``decoding/static_cache.py`` (Hugging Face model + StaticCache):
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
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers import DynamicCache
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from decoding import reference
from decoding.kv_cache import kv_bytes, tensor_bytes
from decoding.reference import END, FIRST_TOKEN, START, Generation, PhaseMarker, no_mark
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


def load_buffer(groups: list[tuple[list[int], DynamicCache]], new_tokens: int,
                into: KVBuffer | None = None) -> KVBuffer:
    """Right-align the pressed caches into one buffer with ``new_tokens`` free slots. ``groups``:
    (rows of the batch, the cache prefilled for them together). Each source layer is emptied once
    copied, so the pressed caches and the buffer never both hold everything (large batches fit).
    ``into``: a buffer to refill rather than allocate (a CUDA graph captured over it reads the same
    addresses again); used if every layer has the shape needed, else dropped before allocating."""
    batch = sum(len(rows) for rows, _ in groups)
    layers = len(groups[0][1].layers)
    lengths = torch.zeros(layers, batch, dtype=torch.long)
    for rows, cache in groups:
        for layer in range(layers):
            lengths[layer, rows] = cache.layers[layer].keys.shape[2]
    kept = lengths.max(dim=1).values
    sample = groups[0][1].layers[0].keys
    shapes = [(batch, sample.shape[1], int(end) + new_tokens, sample.shape[3]) for end in kept]
    if into is not None and [(tuple(keys.shape), keys.dtype) for keys in into.keys] != [
            (shape, sample.dtype) for shape in shapes]:
        into = None  # the caller handed over its reference: the old buffer is freed here
    keys, values = [], []
    for layer, shape in enumerate(shapes):
        end = int(kept[layer])
        if into is None:
            layer_keys, layer_values = sample.new_zeros(shape), sample.new_zeros(shape)
            # Fixed addresses: the compiled step writes into these in place, replay after replay.
            torch._dynamo.mark_static_address(layer_keys)
            torch._dynamo.mark_static_address(layer_values)
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
        return KVBuffer(keys, values, kept.to(sample.device), first_valid.to(sample.device))
    into.kept.copy_(kept)  # in place too: the captured graph reads these tensors
    into.first_valid.copy_(first_valid)
    return into


def unknown_backend(backend: str) -> ValueError:
    return ValueError(f"unknown attention back end {backend!r}; choose from {', '.join(ATTENTION_BACKENDS)}")


def attend(query, keys, values, visible, scaling: float, backend: str):
    """Attention of the new tokens' queries (batch, heads, new, dim) over the buffer's slots
    where ``visible`` (batch, new, slots) is True."""
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


def attention_branch(layer, parts, cos, sin, keys, values, kept, first_valid, new_index, backend: str):
    """One layer's attention. ``parts``: the terms whose sum is the layer's input (the previous
    layer's outputs and residual, summed here so the sum fuses into the layer norm's kernel);
    ``keys``/``values``: the layer's buffer, ``kept``/``first_valid``: its rows of the KVBuffer.
    Writes the new tokens' keys and values; returns (the layer's input, the attention output)."""
    hidden = sum_in_order(parts)
    attention = layer.attention
    query, key, value = split_qkv(attention, layer.input_layernorm(hidden))
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    slot = kept + new_index
    keys.index_copy_(2, slot, key)
    values.index_copy_(2, slot, value)
    slots = torch.arange(keys.shape[2], device=keys.device)
    # (batch, new, slots): a real token (not padding in front of a shorter sequence) already written
    visible = (slots <= slot[:, None]) & (slots >= first_valid[:, None, None])
    attended = attend(query, keys, values, visible, attention.scaling, backend)
    return hidden, attention.dense(attended.transpose(1, 2).reshape(hidden.shape))


def mlp_branch(layer, parts):
    """One layer's MLP on the sum of ``parts`` (see ``attention_branch``)."""
    return layer.mlp(layer.post_attention_layernorm(sum_in_order(parts)))


def sum_in_order(parts):
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def forward_logits(model, token, buffer: KVBuffer, position, new_index, backend: str = "sdpa",
                   attention_fn=attention_branch, mlp_fn=mlp_branch, side_stream=None):
    """New tokens through the model, returning their logits (batch, new, vocab): ``token`` and
    ``position`` (batch, new); ``new_index`` (new,): how many tokens were generated before each
    (they go to slot kept + new_index of every layer); each new token sees the ones before it.
    One token per sequence is a decode step; several are a speculative verify pass. A model
    view running fewer layers (decoding/layer_skip.py) reads and writes only its layers' buffers.
    With ``side_stream`` (CUDA) each parallel-residual layer's MLP runs on that stream beside its
    attention: both read the same input and meet only in the residual sum (``TwoStreamStep``)."""
    neox = model.gpt_neox
    parts = (neox.embed_in(token),)
    cos, sin = neox.rotary_emb(parts[0], position_ids=position)
    main_stream = torch.cuda.current_stream() if side_stream is not None else None
    beside_attention = torch.cuda.stream(side_stream) if side_stream is not None else contextlib.nullcontext()
    for layer in neox.layers:
        index = layer.attention.layer_idx
        layer_buffer = (buffer.keys[index], buffer.values[index], buffer.kept[index], buffer.first_valid[index])
        if layer.use_parallel_residual:
            if side_stream is not None:
                side_stream.wait_stream(main_stream)  # the previous layer's attention output
                main_stream.wait_stream(side_stream)  # the previous layer's MLP output
            with beside_attention:
                mlp_out = mlp_fn(layer, parts)
            hidden, attended = attention_fn(layer, parts, cos, sin, *layer_buffer, new_index, backend)
            # The same residual arithmetic, in the same order, as transformers' GPTNeoXLayer.
            parts = (mlp_out, attended, hidden)
        else:
            hidden, attended = attention_fn(layer, parts, cos, sin, *layer_buffer, new_index, backend)
            parts = (mlp_fn(layer, (attended, hidden)), attended + hidden)
    if side_stream is not None:
        main_stream.wait_stream(side_stream)
    return model.embed_out(neox.final_layer_norm(sum_in_order(parts)))


def decode_step(model, token, position, new_index, buffer: KVBuffer, noise=None, backend: str = "sdpa",
                temperature: float = 0.0, top_k: int | None = None):
    """``forward_logits``, then the token after each new token (batch, new) by ``next_token``."""
    return next_token(forward_logits(model, token, buffer, position, new_index, backend), temperature, top_k, noise)


COMPILE_MODES = ("two-stream", "reduce-overhead", "max-autotune")


def compiled_step(compile: bool, mode: str = "reduce-overhead", keep_buffer: bool = True):
    """The decode step compiled whole (CUDA-graph replay with ``reduce-overhead`` and
    ``max-autotune``), or as is. ``max-autotune`` also benchmarks Triton matmul templates
    against cuBLAS and, as gpt-fast does, tunes the fused kernels' launch shapes.
    ``two-stream``: each layer's two branches compiled, in one hand-captured graph on two
    streams (``TwoStreamStep``, which ``keep_buffer`` is passed to). One step object can serve
    several models and buffers in turn only whole-compiled (the speculative decoders do)."""
    if not compile:
        return decode_step
    if mode == "two-stream":
        return TwoStreamStep(keep_buffer)
    if mode == "max-autotune":
        torch._inductor.config.coordinate_descent_tuning = True
    return torch.compile(decode_step, mode=mode, fullgraph=True)


class TwoStreamStep:
    """The decode step as one CUDA graph captured by hand, in which each layer's MLP runs on a
    second stream beside its attention (GPT-NeoX's parallel residual: both branches read the
    layer's input and meet only in the residual sum). At batch 1 no single kernel keeps the
    GPU's memory busy (cuDNN's decode attention runs one block per head, each GEMV has a ramp-up
    and a tail), so the branches' kernels can overlap. Each branch is compiled by torch.compile
    (no CUDA graphs of its own); the graph is captured at the first call for a buffer, after
    warm-up runs, and replayed after that. CUDA only; called like ``decode_step``.

    The graph reads the buffer's addresses, so a new buffer means a new capture (about 90 ms for
    Pythia-2.8B on the H100).
    With ``keep_buffer`` the step keeps its buffer between generations, as transformers keeps
    its StaticCache between generate calls, and ``load_buffer`` refills it when the shapes
    match: the next generation of the same shape replays the same graph. The price is the
    buffer's memory held from one generation's end through the next one's prefill; at batch 64
    with 2k tokens that is 44 GiB, so large-batch runs pass ``keep_buffer=False``."""

    def __init__(self, keep_buffer: bool = True):
        self.attention_fn = torch.compile(attention_branch, fullgraph=True)
        self.mlp_fn = torch.compile(mlp_branch, fullgraph=True)
        self.keep_buffer = keep_buffer
        self.kept_buffer = None  # with keep_buffer: the last generation's buffer
        self.captured_for = None  # a weak reference to the buffer the graph was captured over

    def load_buffer(self, groups, new_tokens: int) -> KVBuffer:
        """``load_buffer`` into the kept buffer where it fits (see the class docstring)."""
        buffer = load_buffer(groups, new_tokens, self._hand_over_kept_buffer())
        if self.keep_buffer:
            self.kept_buffer = buffer
        return buffer

    def _hand_over_kept_buffer(self):
        # Not held here while load_buffer runs, so that it can free a buffer that does not fit.
        buffer, self.kept_buffer = self.kept_buffer, None
        return buffer

    def _step(self, model, inputs, buffer, backend, temperature, top_k):
        token, position, new_index, noise = inputs
        logits = forward_logits(model, token, buffer, position, new_index, backend, self.attention_fn, self.mlp_fn,
                                self.side_stream)
        return next_token(logits, temperature, top_k, noise)

    def _capture(self, model, inputs, buffer, backend, temperature, top_k):
        if not all(layer.use_parallel_residual for layer in model.gpt_neox.layers):
            raise ValueError("the two-stream step needs GPT-NeoX's parallel residual (use_parallel_residual)")
        self.graph = self.output = None  # the old graph's memory pool, freed before the new capture
        self.inputs = [None if tensor is None else tensor.clone() for tensor in inputs]
        self.side_stream = torch.cuda.Stream()
        # Compile and warm up (cuBLAS and cuDNN set up their workspaces) off the capture.
        warmup_stream = torch.cuda.Stream()
        warmup_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warmup_stream):
            for _ in range(3):  # rewrites the slot this step writes anyway, with the same values
                self._step(model, self.inputs, buffer, backend, temperature, top_k)
        torch.cuda.current_stream().wait_stream(warmup_stream)
        # cuBLAS keeps one workspace per (handle, stream), and a graph replays the raw address it
        # captured. Others' CUDA graphs (torch.compile's cudagraph trees, which record with their
        # own clear) drop those cached workspaces; one shared with the eager pool is then reused
        # while this graph still writes to it (an illegal memory access on the H100, pytorch issue
        # 193402). Dropped here, so the capture allocates its own in this graph's private pool,
        # where nothing else allocates.
        torch.cuda.synchronize()
        torch._C._cuda_clearCublasWorkspaces()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self._step(model, self.inputs, buffer, backend, temperature, top_k)
        # A weak reference: without keep_buffer, holding the buffer here would keep a finished
        # generation's KV alive while the next one prefills.
        self.captured_for, self.settings = weakref.ref(buffer), (backend, temperature, top_k)

    def __call__(self, model, token, position, new_index, buffer: KVBuffer, noise=None, backend: str = "sdpa",
                 temperature: float = 0.0, top_k: int | None = None):
        inputs = (token, position, new_index, noise)
        captured = self.captured_for is not None and self.captured_for() is buffer
        if not captured or (backend, temperature, top_k) != self.settings:
            self._capture(model, inputs, buffer, backend, temperature, top_k)
        for static, tensor in zip(self.inputs, inputs):
            if tensor is not None:
                static.copy_(tensor)
        self.graph.replay()
        return self.output


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


@torch.no_grad()
def generate(model, prompts: list[torch.Tensor], press, new_tokens: int, step=decode_step, backend: str = "sdpa",
             temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None,
             mark: PhaseMarker = no_mark) -> Generation:
    """Exactly ``new_tokens`` tokens (no early stop) after each prompt (1, length_i), the press
    applied at prefill; returns the tokens (batch, new_tokens) and the cache sizes (kept: each
    layer's longest kept sequence). ``step``: ``decode_step`` or ``compiled_step(True)``;
    ``backend``: the attention of the decode step and of the prefill. ``mark``: see
    decoding/reference.py (the first token is marked after the copy into the buffer)."""
    if backend not in ATTENTION_BACKENDS:
        raise unknown_backend(backend)
    device = model.device
    batch = len(prompts)
    sampled = temperature > 0
    noise_shape = (batch, 1, model.config.vocab_size)
    with attention_implementation(model, PREFILL_ATTENTION[backend]):
        mark(START)
        logits, groups = prefill(model, prompts, press)
    token = next_token(logits[:, None], temperature, top_k, _noise(noise_shape, device, generator) if sampled else None)
    kept_bytes = sum(kv_bytes(cache) for _, cache in groups)
    if isinstance(step, TwoStreamStep):  # refills the step's kept buffer where it fits
        buffer = step.load_buffer(groups, new_tokens)
    else:
        buffer = load_buffer(groups, new_tokens)
    mark(FIRST_TOKEN)
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
    mark(END)
    # each layer's longest kept sequence (the batch's prompts alike: every one's)
    kept = (buffer.kept - buffer.first_valid.min(dim=1).values).tolist()
    return Generation(torch.cat(generated, dim=1), kept, kept_bytes, buffer.nbytes())
