"""InfLLM (Xiao et al. 2024, "InfLLM: Training-Free Long-Context Extrapolation for LLMs with an
Efficient Context Memory") as a streaming press on the Hugging Face KV cache.

Rule. Each layer attends to the first ``n_init`` tokens of the stream (attention sinks), a local
window of recent tokens, and the ``top_k`` memory blocks most relevant to its queries. Tokens that leave the local window go, in blocks of ``block_size`` consecutive tokens,
to a block memory; each block is represented, per query head, by the mean of its
``repr_tokens`` keys that received the most attention while they were in the local window.
A block's relevance is the paper's ``sum_i sum_j q_i . k_j`` over queries i, the query heads and
the representative keys j (computed as mean-query . mean-representative, the same ranking). One
choice per layer, shared by all heads (as in the official code).

Which queries rank (``retrieval``):

- ``"causal"`` (default): each query ranks the blocks with the mean of this call's queries up to
  and including itself, so no position's choice depends on a later token. Under teacher forcing
  (the perplexity protocols feed a chunk of C tokens per call) this is what keeps the method from
  seeing the future: with the paper's one choice per chunk, position i's logits depend on tokens
  i+1..C-1 of its chunk. The call attends the union of the blocks its queries chose, and the
  attention mask hides from each query the blocks it did not choose. With one query per call
  (token-by-token generation) it is the paper's rule.
- ``"chunk"``: the paper's rule, one choice per call from the mean of all its queries. Fine for
  generation (a prefill chunk is not scored token by token); it leaks under teacher forcing.

Mechanics (two hooks per attention module, see ``__call__``):

- forward pre-hook: rank the memory blocks with this call's queries, copy the blocks any query
  chose (chronological order) into the layer's cache between the initial tokens and the local
  window, and widen the attention mask (hiding from each query the blocks it did not choose), so
  each query attends to init + its ``top_k`` blocks + local + the chunk up to itself;
- forward hook: accumulate the attention each local token received (softmax over everything the
  call attended, float32), take the retrieved blocks out again, and move the oldest local tokens
  to memory, a whole block at a time, while the local region holds more than ``local`` tokens.

Between calls a layer's cache holds init + local region: at most ``n_init + local`` tokens (the
region keeps between ``local - block_size + 1`` and ``local`` tokens once eviction started: the
paper's partial "remainder" block stays in the local window here). During a call a query
attends at most ``budget + chunk`` keys with ``budget = n_init + top_k * block_size + local``;
the cache then holds the union of the chunk's choices (at most ``min(blocks, chunk * top_k)``
blocks under causal retrieval, ``top_k`` under chunk retrieval).

Positions (``positions``):

- ``"original"``: every key keeps the rotation of the position the caller gave it (the streaming
  protocol's absolute index); retrieved blocks are put back exactly as they were cached. With
  ``top_k`` covering every block the attended cache *is* the dense cache (bit-equal outputs).
  Distances grow with the stream, as in dense attention: no length extrapolation.
- ``"fixed"`` (the paper's rule, default): once memory holds a block, the initial tokens and the
  retrieved blocks are attended at one position ``P = p0 - local``, ``p0`` the position of this
  call's first query: at distance ``local`` from the first query and ``local + C - 1`` from the
  last of a C-token chunk. Keys are re-rotated from their cached position to P on the fly (the
  cache and the memory keep the original rotation). The paper (and its code) gives every query
  exactly distance ``n_local`` by rotating the queries a second time and attending memory in a
  separate pass merged by log-sum-exp; one HF cache pass cannot, hence the spread of C - 1.
  Local tokens keep their true relative distances in both modes.

Other differences from the paper / official code: representative scores are softmax attention
accumulated over all queries that saw the token in the local region (the code's rule; the paper
writes raw q.k over the next ``l_L`` queries), and the softmax includes init and retrieved keys;
the paper's remainder (evicted but not yet a full block) stays in the local region instead of
being attended at the memory position; no GPU LRU cache of blocks (every call copies its
``top_k`` blocks from ``memory_device``); the chunk is the caller's (the paper's
``exc_block_size``): within one call everything fed together is attended in full.

Memory location (``memory_device``): ``"cpu"`` (default, the paper's offloading) or ``"model"``
(the model's device), or any torch device string. Per layer, with ``b`` bytes per element, H_kv
key/value heads, head size D and N evicted tokens:

- memory_device holds the evicted keys and values: ``2 * N * H_kv * D * b`` bytes (grown by
  doubling, so up to twice that is allocated);
- the model's device always holds the attended cache (at most ``budget + chunk`` tokens during
  a call), the representative keys ``(N / block_size) * H_q * D * 4`` bytes and their token
  indices ``(N / block_size) * H_q * repr_tokens * 8``, positions ``8 * N`` bytes, and
  local-token scores ``H_q * local * 4`` bytes (all times the batch size);
- transfer per call (chunk) and layer when memory is on the CPU: host-to-device
  ``2 * U * block_size * H_kv * D * b`` bytes (the U retrieved blocks: ``top_k`` with one query
  per call or chunk retrieval, up to ``chunk * top_k`` with causal retrieval), device-to-host
  ``2 * H_kv * D * b`` per evicted token (on average the chunk's C tokens). Example, Pythia-2.8B
  in fp16 (32 layers, 32 heads, D = 80): 10 KiB per token and layer, so top_k * block_size =
  2048 retrieved tokens move 20 MiB per layer, 640 MiB per call over the 32 layers.

Extra compute per call and layer: this call's queries once more (projection), their logits
against the attended keys once more (float32, B x H_q x C x K, for the representative scores),
and a B x H_q x C x (N / block_size) relevance product.

Batches: block choices are per batch row and query (the union over rows is retrieved, the mask
hides the rest); positions are read from the first row (unpadded batches share them). The streaming protocol must use the caller's positions as given
(``positions_in_cache`` is False).
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from kvpress import DecodingPress
from kvpress.presses.base_press import BasePress
from kvpress.utils import get_prerope_query_states
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from patches.attention_mask import fit_mask_to_keys

POSITION_MODES = ("original", "fixed")
RETRIEVAL_MODES = ("causal", "chunk")


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move RoPE-rotated ``keys`` (..., D) by ``delta`` positions (broadcastable to keys.shape[:-1]):
    the Llama-convention rotary of kvpress's ``KeyRerotationPress``, in float32. On GPT-NeoX the
    patch's reordered basis and zero-padded frequencies make this the partial rotary."""
    freqs = delta.to(keys.device, torch.float32)[..., None] * inv_freq.to(keys.device, torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    rotated = keys.float() * emb.cos() + rotate_half(keys.float()) * emb.sin()
    return rotated.to(keys.dtype)


class _Rows:
    """Rows appended along dim 0 into a buffer that doubles when full (amortised O(1) append)."""

    def __init__(self, device: torch.device, pin: bool = False):
        self.device, self.pin, self.data, self.n = device, pin, None, 0

    def append(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.device)
        needed = self.n + rows.shape[0]
        if self.data is None or needed > self.data.shape[0]:
            capacity = max(16, needed, 2 * (0 if self.data is None else self.data.shape[0]))
            grown = torch.empty((capacity, *rows.shape[1:]), dtype=rows.dtype, device=self.device,
                                pin_memory=self.pin)
            if self.data is not None:
                grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n : needed] = rows
        self.n = needed

    def view(self) -> torch.Tensor:
        return self.data[: self.n]


@dataclass
class _LayerState:
    init_len: int = 0  # initial tokens at the front of the cache
    positions: torch.Tensor | None = None  # (init_len + region,) positions of the cached tokens
    scores: torch.Tensor | None = None  # (B, H_q, region) attention received in the local region
    keys: _Rows | None = None  # (blocks, B, H_kv, block_size, D) on memory_device
    values: _Rows | None = None
    block_positions: _Rows | None = None  # (blocks, block_size) on the model's device
    representatives: _Rows | None = None  # (blocks, B, H_q, D) float32 on the model's device
    representative_index: _Rows | None = None  # (blocks, B, H_q, repr_tokens): token in block
    # per call
    queries: torch.Tensor | None = None  # (B, H_q, C, D) post-RoPE
    new_positions: torch.Tensor | None = None  # (C,)
    n_retrieved: int = 0
    hidden_blocks: torch.Tensor | None = None  # (B, C, n_retrieved) True where a query did not choose the key's block
    cached_init_keys: torch.Tensor | None = None  # init keys at their own rotation
    last_retrieved: torch.Tensor | None = None  # (B, C, k) block ids each query of the last call chose
    last_relevance: torch.Tensor | None = None  # (B, C, blocks)

    @property
    def n_blocks(self) -> int:
        return 0 if self.keys is None else self.keys.n


@dataclass
class InfLLMPress(DecodingPress):
    """InfLLM streaming press (module docstring): init + top-k retrieved blocks + local window.

    ``budget`` (attended tokens besides the current chunk) = ``n_init + top_k * block_size +
    local``; ``from_budget`` picks ``top_k`` from a budget."""

    base_press: None = None  # DecodingPress fields, unused: InfLLM has its own rule
    n_init: int = 4
    local: int = 64
    block_size: int = 32
    top_k: int = 4
    repr_tokens: int = 4
    positions: str = "fixed"
    retrieval: str = "causal"
    memory_device: str = "cpu"
    positions_in_cache: bool = False  # the caller gives true positions (evaluation/protocols.py)
    _layers: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")
        if self.retrieval not in RETRIEVAL_MODES:
            raise ValueError(f"retrieval must be one of {RETRIEVAL_MODES}, got {self.retrieval!r}")
        if min(self.block_size, self.repr_tokens) < 1 or min(self.n_init, self.top_k) < 0:
            raise ValueError(f"InfLLM needs block_size, repr_tokens >= 1 and n_init, top_k >= 0: {self}")
        if self.repr_tokens > self.block_size:
            raise ValueError(f"repr_tokens {self.repr_tokens} exceeds block_size {self.block_size}")
        if self.local < self.block_size:
            raise ValueError(f"local window {self.local} must hold at least one block of {self.block_size}")
        self.target_size = self.budget
        self.hidden_states_buffer_size = 0

    @classmethod
    def from_budget(cls, budget: int, n_init: int, local: int, block_size: int = 32, **kwargs) -> "InfLLMPress":
        """The press whose ``n_init + top_k * block_size + local`` is the largest that fits ``budget``."""
        top_k = (budget - n_init - local) // block_size
        if top_k < 1:
            raise ValueError(
                f"InfLLM budget {budget} leaves no room for one memory block of {block_size} tokens beside "
                f"{n_init} initial and {local} local tokens"
            )
        return cls(n_init=n_init, local=local, block_size=block_size, top_k=top_k, **kwargs)

    @property
    def budget(self) -> int:
        return self.n_init + self.top_k * self.block_size + self.local

    # ----------------------------------------------------------------------------------- state

    def post_init_from_model(self, model):
        pass

    def reset(self):
        self._layers = {}

    def memory(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values (B, H_kv, N, D) and positions (N,) of the evicted tokens, oldest first,
        as they were cached (original rotation)."""
        state = self._layers[layer_idx]
        keys, values = state.keys.view(), state.values.view()
        flat = lambda x: x.permute(1, 2, 0, 3, 4).flatten(2, 3)  # noqa: E731
        return flat(keys), flat(values), state.block_positions.view().flatten()

    def _memory_device(self, like: torch.Tensor) -> torch.device:
        return like.device if self.memory_device == "model" else torch.device(self.memory_device)

    def _queries(self, module: nn.Module, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
        cos, sin = kwargs["position_embeddings"]
        queries = get_prerope_query_states(module, hidden_states)
        return queries * cos.unsqueeze(1) + rotate_half(queries) * sin.unsqueeze(1)

    @staticmethod
    def _call_positions(kwargs: dict, q_len: int) -> torch.Tensor:
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = kwargs["cache_position"]
        positions = positions.reshape(-1, positions.shape[-1])[0]
        return positions[-q_len:]

    # ----------------------------------------------------------------------------------- hooks

    def forward_pre_hook(self, module: nn.Module, args, kwargs: dict):
        hidden_states = kwargs["hidden_states"]
        state = self._layers.setdefault(module.layer_idx, _LayerState())
        q_len = hidden_states.shape[1]
        state.queries = self._queries(module, hidden_states, kwargs)
        state.new_positions = self._call_positions(kwargs, q_len).to(hidden_states.device)
        state.n_retrieved, state.cached_init_keys, state.hidden_blocks = 0, None, None
        if state.n_blocks == 0:
            return None

        cache_layer = kwargs["past_key_values"].layers[module.layer_idx]
        keys, values = cache_layer.keys, cache_layer.values
        device, init = keys.device, state.init_len
        representatives = state.representatives.view()  # (blocks, B, H_q, D)
        fixed_position = state.new_positions[0] - self.local
        if self.positions == "fixed":  # representatives are pre-RoPE there: rotate them to P
            representatives = rotate_keys(representatives, fixed_position, module.rotary_emb.inv_freq)
        relevance = torch.einsum("bhcd,nbhd->bcn", self._ranking_queries(state.queries), representatives.float())
        k = min(self.top_k, state.n_blocks)
        chosen = relevance.topk(k, dim=-1).indices.sort(dim=-1).values  # (B, C or 1, k), oldest first
        state.last_relevance, state.last_retrieved = relevance, chosen.expand(-1, q_len, -1)
        union = chosen.unique()  # sorted: chronological; every row and query attends within it
        picked = (chosen[..., None] == union).any(dim=-2)  # (B, C or 1, U)
        if not bool(picked.all()):  # some query did not choose some retrieved block: hide it from that query
            state.hidden_blocks = (~picked).repeat_interleave(self.block_size, dim=-1).expand(-1, q_len, -1)

        def gather(rows: _Rows) -> torch.Tensor:
            blocks = rows.view()[union.to(rows.device)]  # (U, B, H_kv, block_size, D)
            return blocks.permute(1, 2, 0, 3, 4).flatten(2, 3).to(device, non_blocking=True)

        retrieved_keys, retrieved_values = gather(state.keys), gather(state.values)
        init_keys = keys[:, :, :init]
        attended_init_keys = init_keys
        if self.positions == "fixed":
            inv_freq = module.rotary_emb.inv_freq
            retrieved_positions = state.block_positions.view()[union].flatten()  # (U * block_size,)
            retrieved_keys = rotate_keys(retrieved_keys, fixed_position - retrieved_positions, inv_freq)
            attended_init_keys = rotate_keys(init_keys, fixed_position - state.positions[:init], inv_freq)
        cache_layer.keys = torch.cat([attended_init_keys, retrieved_keys, keys[:, :, init:]], dim=2)
        cache_layer.values = torch.cat([values[:, :, :init], retrieved_values, values[:, :, init:]], dim=2)
        state.n_retrieved, state.cached_init_keys = retrieved_keys.shape[2], init_keys
        # The mask was built from the cache length before retrieval: widen its all-visible past,
        # then hide from each query the retrieved blocks it did not choose.
        mask = fit_mask_to_keys(kwargs.get("attention_mask"), cache_layer.keys.shape[2] + q_len)
        if state.hidden_blocks is not None:
            mask = self._hide(self._causal(q_len, cache_layer.keys.shape[2] + q_len, device) if mask is None else mask,
                              state.hidden_blocks, init)
        kwargs["attention_mask"] = mask
        return args, kwargs

    def _ranking_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """The query (B, H_q, C or 1, D), float32, each position ranks the memory blocks with:
        the mean of this call's queries up to it (causal), or of all of them (chunk)."""
        queries = queries.float()
        if self.retrieval == "chunk":
            return queries.mean(2, keepdim=True)
        counts = torch.arange(1, queries.shape[2] + 1, device=queries.device, dtype=queries.dtype)
        return queries.cumsum(2) / counts[:, None]

    @staticmethod
    def _causal(q_len: int, key_length: int, device) -> torch.Tensor:
        """A boolean (1, 1, q_len, key_length) mask, True where visible: the past, then the causal chunk."""
        return torch.ones(q_len, key_length, dtype=torch.bool, device=device).tril(key_length - q_len)[None, None]

    @staticmethod
    def _hide(mask: torch.Tensor, hidden: torch.Tensor, init: int) -> torch.Tensor:
        """``mask`` with the retrieved keys at ``hidden`` (B, C, n_retrieved) made invisible."""
        region = slice(init, init + hidden.shape[-1])
        mask = mask.expand(hidden.shape[0], -1, -1, -1).clone()
        invisible = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
        mask[..., region] = mask[..., region].masked_fill(hidden[:, None], invisible)
        return mask

    def _attention(self, module: nn.Module, state: _LayerState, keys: torch.Tensor) -> torch.Tensor:
        """Softmax (B, H_q, C, K), float32, of this call's queries over the keys each attended."""
        queries = state.queries
        q_len, k_len = queries.shape[2], keys.shape[2]
        keys = repeat_kv(keys, queries.shape[1] // keys.shape[1])
        scaling = getattr(module, "scaling", 1 / math.sqrt(module.head_dim))
        logits = torch.matmul(queries.float(), keys.float().transpose(2, 3)) * scaling
        visible = self._causal(q_len, k_len, keys.device)
        if state.hidden_blocks is not None:
            visible = self._hide(visible, state.hidden_blocks, state.init_len)
        return logits.masked_fill(visible.logical_not(), float("-inf")).softmax(dim=-1)

    def forward_hook(self, module: nn.Module, input, kwargs: dict, output):
        state = self._layers[module.layer_idx]
        cache_layer = kwargs["past_key_values"].layers[module.layer_idx]
        keys, values = cache_layer.keys, cache_layer.values
        init, start = state.init_len, state.init_len + state.n_retrieved

        # Attention each local-region token received from this call's queries.
        received = self._attention(module, state, keys)[..., start:].sum(dim=2)  # (B, H_q, region)
        if state.scores is not None:
            received[..., : state.scores.shape[-1]] += state.scores
        init_keys = keys[:, :, :init] if state.cached_init_keys is None else state.cached_init_keys
        keys = torch.cat([init_keys, keys[:, :, start:]], dim=2)  # retrieved blocks out again
        values = torch.cat([values[:, :, :init], values[:, :, start:]], dim=2)
        positions = state.new_positions
        if state.positions is not None:
            positions = torch.cat([state.positions, positions])
        state.queries, state.cached_init_keys, state.n_retrieved, state.hidden_blocks = None, None, 0, None

        # The first n_init tokens of the stream stay as initial tokens.
        new_init = min(self.n_init, keys.shape[2])
        received = received[..., new_init - init :]
        state.init_len = new_init

        # Oldest local tokens to memory, whole blocks, until the region fits the local window.
        region = keys.shape[2] - new_init
        n_blocks = max(0, math.ceil((region - self.local) / self.block_size))
        if n_blocks:
            evicted = slice(new_init, new_init + n_blocks * self.block_size)
            self._to_memory(module, state, keys[:, :, evicted], values[:, :, evicted], positions[evicted],
                            received[..., : n_blocks * self.block_size])
            kept = torch.cat([torch.arange(new_init), torch.arange(evicted.stop, keys.shape[2])]).to(keys.device)
            keys, values, positions = keys[:, :, kept], values[:, :, kept], positions[kept]
            received = received[..., n_blocks * self.block_size :]
        cache_layer.keys, cache_layer.values = keys.contiguous(), values.contiguous()
        state.positions, state.scores = positions, received
        return output

    def _to_memory(self, module, state: _LayerState, keys, values, positions, scores) -> None:
        """Append blocks of evicted tokens with their representative keys (per query head: mean of
        the ``repr_tokens`` keys with the highest accumulated attention in the block)."""
        batch, kv_heads, n_tokens, head_dim = keys.shape
        n_blocks, heads = n_tokens // self.block_size, scores.shape[1]
        if state.keys is None:
            memory_device = self._memory_device(keys)
            pin = memory_device.type == "cpu" and keys.device.type == "cuda"
            state.keys, state.values = _Rows(memory_device, pin), _Rows(memory_device, pin)
            state.block_positions, state.representatives, state.representative_index = (
                _Rows(keys.device), _Rows(keys.device), _Rows(keys.device))
        blocks = lambda x: x.unflatten(2, (n_blocks, self.block_size)).permute(2, 0, 1, 3, 4)  # noqa: E731
        block_positions = positions.view(n_blocks, self.block_size)
        top = scores.unflatten(-1, (n_blocks, self.block_size)).topk(self.repr_tokens, dim=-1).indices
        top = top.sort(dim=-1).values  # (B, H_q, blocks, repr_tokens)
        head_keys = repeat_kv(keys, heads // kv_heads).unflatten(2, (n_blocks, self.block_size))
        chosen = head_keys.gather(3, top[..., None].expand(-1, -1, -1, -1, head_dim))  # (B, H_q, blocks, r, D)
        if self.positions == "fixed":  # representatives pre-RoPE (position 0), rotated to P when ranked
            token_positions = block_positions.expand(batch, heads, -1, -1).gather(-1, top)
            chosen = rotate_keys(chosen, -token_positions, module.rotary_emb.inv_freq)
        state.keys.append(blocks(keys))
        state.values.append(blocks(values))
        state.block_positions.append(block_positions)
        state.representatives.append(chosen.float().mean(3).permute(2, 0, 1, 3))
        state.representative_index.append(top.permute(2, 0, 1, 3))

    @contextmanager
    def __call__(self, model):
        """Forward pre-hooks (retrieval) and forward hooks (eviction) on every attention module;
        memory is emptied on entry and on exit."""
        self.reset()
        language_model = model.model.language_model if hasattr(model.model, "language_model") else model.model
        hooks = [layer.self_attn.register_forward_pre_hook(self.forward_pre_hook, with_kwargs=True)
                 for layer in language_model.layers]
        try:
            with BasePress.__call__(self, model):  # rotary_emb on each module + the forward hooks
                yield
        finally:
            for hook in hooks:
                hook.remove()
            self.reset()
