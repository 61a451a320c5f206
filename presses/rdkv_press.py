"""RD-KV: each cached token gets the precision its expected effect on attention pays for."""

import math
from dataclasses import dataclass, field

import torch
from kvpress import BasePress
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv

from presses.attention import attention_rows, current_attention, per_kv_head, rotated_queries
from presses.errors import PressConfigError
from presses.quantize import (check_channel_widths, check_levels, CHANNEL_STATS_BYTES, FP16_BYTES, GROUP_SIDE_BYTES, WIDTH_TABLE_BITS, WIDTHS, channel_stats,
                              per_channel_bytes, quantize_per_channel, quantize_per_token, query_weighted_widths,
                              token_bytes)

GRID = 64  # lambdas tried at once


def output_head_weights(module: nn.Module, heads: int, head_dim: int) -> torch.Tensor:
    """(heads,) each query head's block of the attention's output projection ``o_proj`` (GPT-NeoX's
    ``dense`` under that name: patches/gpt_neox.py): its squared Frobenius norm, over the heads' mean."""
    weight = module.o_proj.weight
    energy = weight.float().view(weight.shape[0], heads, head_dim).pow(2).sum(dim=(0, 2))
    return energy / energy.mean()


@dataclass
class RDKVPress(BasePress):
    """Rate-distortion KV compression (ours): after prefill, every (token, KV head) of a layer is
    stored in fp16, in ``bits``-bit integers (values per token; keys per token after per-channel
    centring and scaling, or with ``key_layout="channel"`` in KIVI's per-channel groups among the
    tokens of one width; presses/quantize.py) or not at all (the token evicted from every head), whichever the
    layer's byte budget, ``1 - compression_ratio`` of its fp16 KV bytes, pays for best.

    The price of an option is its bytes; its distortion is the expected squared change of the
    attention outputs of the last ``window_size`` queries (SnapKV's observation window), to
    first order and with independent errors: a value error dv moves an output by p * dv, a key
    error dk moves the logit by q.dk / sqrt(d) and the output by p * (q.dk / sqrt(d)) * (v - o),
    evicting moves it by p * (v - o), where p is the query's attention to the token and o its
    output; with ``accumulated`` = a, p is (1 - a) times the window query's own attention plus a
    times the mean attention the token received from every query of the call (H2O's evidence: a
    token many queries attended is likely attended again, and a 16-query window alone misses the
    tokens it happens not to look at; with ``accumulated_over="visible"`` the mean runs over the
    queries that see the token, so that the newest tokens, seen by few queries, are not taken for
    unimportant, H2O's bias toward old tokens that its recent half corrects); p is widened by a prior of total mass ``prior`` (later queries look elsewhere than the
    window), spread evenly over the n tokens or, with ``prior_shape="recency"``, as 1 / distance
    from the newest token (attention is local: the next queries favour the nearest tokens, the
    rule behind H2O's and StreamingLLM's recent windows). The
    options minimising distortion + lambda * bytes, with the smallest lambda that fits the layer's
    budget (``_allocate``), solve the allocation exactly on the lower convex hull of each token's
    (bytes, distortion) options: one rule decides keep-or-drop and bits together, where
    eviction presses only drop and quantizers give every token the same bits. The newest
    ``recent_tokens`` (default: the window's) stay in fp16, as far as the budget pays for them;
    the newest ``protect_recent`` of the tokens are never evicted but take any width (H2O keeps
    half its tokens recent; here they may be kept at few bits).
    With ``separate_widths`` keys and values choose their widths apart (their distortions add,
    so the pair is the best key option plus the best value option at the same lambda): keys, whose
    errors move every logit, may then stay wider than values. With ``evict_per_head`` each KV head
    keeps its own tokens (the same number in every head, as a cache holds), as score-based
    eviction presses do, instead of a token being kept or dropped in every head at once.
    With ``rotate`` every per-token group (values, per-token keys) is quantized after a fixed random
    rotation (QuaRot's; presses/quantize.py), at the same bytes. ``evict_weight`` scales the
    eviction distortion: the first-order model prices each eviction alone, while evicting many
    tokens also renormalises the attention over the rest.
    With ``merge_evicted`` an evicted token's value is not thrown away but folded into the kept
    token of the same KV head whose key is most similar (cosine; CaM's and D2O's idea), weighted by
    the expected attention p the allocation priced: v_k <- (p_k v_k + sum_j p_j v_j) / (p_k + sum_j p_j)
    over the tokens j merged into k, so that the output a near-duplicate key would have drawn from j
    is kept in the value mix instead of lost; it happens before the kept values are quantized, at
    the widths already chosen, so the stored bytes are the same.
    With ``allocate_over="model"`` one lambda serves every layer instead of one per layer: the
    model's bytes (the sum of the layers' budgets) go where a byte removes the most distortion, so
    a layer whose tokens matter more keeps more of them. The allocation then waits for the last
    layer's prefill (the earlier layers' caches are compressed then; the prefill's own attention
    never reads a compressed cache, so nothing it computes changes). A layer's distortions are
    first divided by its window outputs' energy (sum of |o|^2, ``layer_scale="output"``: an output
    moved by 1% costs the same in every layer) or left as they are (``"none"``).
    With ``channel_widths="query"`` (KIVI's key layout) a key width b is an average: each channel
    of a head takes the width the prefill's queries' energy on it pays for, dim * b bits in all
    (presses/quantize.py, ``query_weighted_widths``; the widths' table is counted in the bytes).
    With ``head_weights="output"`` each query head's distortions are weighted by the energy of its
    block of the output projection W_o (its squared Frobenius norm over the head dim, the mean over
    heads 1): an error e in head h's output moves the layer's output by W_o,h e, whose expected
    square for an error spread over the head's channels is |W_o,h|_F^2 / d |e|^2, so bytes go to the
    heads whose outputs the layer amplifies (the window outputs' energy of ``layer_scale`` is weighted
    the same way).
    With ``levels="gaussian"`` (rotated groups) the per-token groups round to the levels that
    err least on Gaussian entries where they beat uniform ones (2 and 3 bits; presses/quantize.py
    ``gaussian_levels``), at the same bytes; with ``levels="symmetric"`` to levels symmetric about
    zero with a scale and no zero point (``symmetric_quantize``), 2 bytes fewer per group.
    Prefill only; one sequence per call."""

    compression_ratio: float = 0.0  # fraction of the layer's fp16 KV bytes removed
    # Defaults: the best setting at 25% of the bytes on WikiText-2 windows 32-39 (SmolLM2), a
    # tuning set apart from the reported windows (results/smollm2-135m_equal_bytes_h200/call9/,
    # call11/ for accumulated).
    window_size: int = 16  # the last queries whose attention predicts the distortion (the whole call: H2O's evidence)
    recent_tokens: int | None = None  # the newest tokens held in fp16 (None: the window's own tokens)
    bits: tuple[int, ...] = (3, 4, 8)
    key_layout: str = "channel"  # "channel": KIVI's per-channel key groups among the tokens stored at one width
    group_tokens: int = 32
    prior: float = 2.0  # attention mass spread evenly over the tokens, added to the window's: later queries look elsewhere
    prior_shape: str = "uniform"  # "recency": the prior's mass falls as 1 / distance from the newest token
    accumulated: float = 0.5  # share of p from the attention received from every query of the call (H2O's)
    accumulated_over: str = "all"  # "visible": the received attention averaged over the queries that see the token
    protect_recent: float = 0.0  # fraction of the newest tokens never evicted (their widths still chosen)
    query_chunk: int = 512  # queries per attention block when accumulating (memory: heads x chunk x tokens)
    separate_widths: bool = True  # keys and values choose their widths apart
    evict_weight: float = 4.0  # multiplies the eviction distortion
    evict_per_head: bool = False  # each head evicts its own tokens (as many per head), not every head the same
    rotate: bool = False  # per-token groups quantized after a fixed random rotation (QuaRot's; presses/quantize.py)
    merge_evicted: bool = False  # evicted values folded into the most key-similar kept token (CaM's, D2O's), same bytes
    allocate_over: str = "layer"  # "model": one lambda for all layers, the bytes of all their budgets
    layer_scale: str = "output"  # with allocate_over="model": each layer's distortions over its outputs' energy, or "none"
    channel_widths: str = "uniform"  # "query": KIVI key channels take widths by the queries' energy on them (ours)
    levels: str = "uniform"  # rotated per-token groups: "gaussian" (Lloyd-Max levels, 2-3 bits), "symmetric" (no zero point)
    head_weights: str = "uniform"  # "output": each query head's distortions times its W_o block's energy (worse on SmolLM2)
    stored_bytes: dict = field(default_factory=dict, repr=False)
    chosen_bits: dict = field(default_factory=dict, repr=False)  # per layer, keys and values: share of (token, head) entries at each width (0: evicted)

    def __post_init__(self):
        if not 0 <= self.compression_ratio < 1:
            raise PressConfigError(f"compression_ratio must be in [0, 1), got {self.compression_ratio}")
        if not self.bits or any(b not in WIDTHS for b in self.bits) or len(set(self.bits)) != len(self.bits):
            raise PressConfigError(f"bits must be distinct widths from {', '.join(map(str, WIDTHS))}; got {self.bits}")
        if self.key_layout not in ("token", "channel"):
            raise PressConfigError(f"key_layout must be 'token' or 'channel', got {self.key_layout!r}")
        if self.prior_shape not in ("uniform", "recency"):
            raise PressConfigError(f"prior_shape must be 'uniform' or 'recency', got {self.prior_shape!r}")
        if not 0 <= self.accumulated <= 1:
            raise PressConfigError(f"accumulated must be in [0, 1], got {self.accumulated}")
        if self.accumulated_over not in ("all", "visible"):
            raise PressConfigError(f"accumulated_over must be 'all' or 'visible', got {self.accumulated_over!r}")
        if not 0 <= self.protect_recent <= 1:
            raise PressConfigError(f"protect_recent must be in [0, 1], got {self.protect_recent}")
        if self.evict_weight <= 0:
            raise PressConfigError(f"evict_weight must be positive, got {self.evict_weight}")
        if not isinstance(self.merge_evicted, bool):
            raise PressConfigError(f"merge_evicted must be True or False, got {self.merge_evicted!r}")
        if self.allocate_over not in ("layer", "model"):
            raise PressConfigError(f"allocate_over must be 'layer' or 'model', got {self.allocate_over!r}")
        if self.layer_scale not in ("output", "none"):
            raise PressConfigError(f"layer_scale must be 'output' or 'none', got {self.layer_scale!r}")
        if self.head_weights not in ("uniform", "output"):
            raise PressConfigError(f"head_weights must be 'uniform' or 'output', got {self.head_weights!r}")
        check_channel_widths(self.channel_widths, self.key_layout)
        check_levels(self.levels, self.rotate)
        self._waiting = {}  # allocate_over="model": layer index -> (plan, cache), until the last layer

    def compress(self, module: nn.Module, hidden_states, keys: torch.Tensor, values: torch.Tensor, attentions, kwargs):
        batch, kv_heads, tokens, head_dim = keys.shape
        if batch != 1:
            raise PressConfigError(f"RDKVPress compresses one sequence per call, got a batch of {batch}")
        dense_bytes = kv_heads * tokens * 2 * FP16_BYTES * head_dim
        if self.compression_ratio == 0:
            self.stored_bytes[module.layer_idx] = dense_bytes
            return keys, values
        plan = self._plan(module, hidden_states, keys, values, kwargs, dense_bytes)
        if self.allocate_over == "layer":
            keep, choice = _allocate(plan.distortion, plan.evict, plan.price, plan.budget, self.evict_per_head,
                                     plan.protected)
            return self._store(module.layer_idx, plan, keep, choice)
        self._waiting[module.layer_idx] = plan, kwargs["past_key_values"]
        if module.layer_idx < module.config.num_hidden_layers - 1:
            return keys, values  # compressed with the last layer
        return self._allocate_model(module.layer_idx)

    @property
    def layer_scale_needed(self) -> bool:
        """Whether the layers' output energies are measured (a host sync per layer, so only when used)."""
        return self.allocate_over == "model" and self.layer_scale == "output"

    def _allocate_model(self, last: int):
        """``allocate_over="model"``: one lambda for every waiting layer, each stored; the earlier
        layers written into their caches, the last one's returned."""
        waiting, self._waiting = self._waiting, {}
        if sorted(waiting) != list(range(last + 1)):
            raise PressConfigError(f"RD-KV's model-wide allocation needs every layer's prefill in one call, "
                                   f"got layers {sorted(waiting)}")
        plans = [plan for plan, _ in waiting.values()]
        scales = [1 / plan.energy if self.layer_scale_needed else 1.0 for plan in plans]
        # side by side along the token axis: a token is still kept or dropped within its own layer's heads
        keep, choice = _allocate(torch.cat([plan.distortion * scale for plan, scale in zip(plans, scales)], 1),
                                 torch.cat([plan.evict * scale for plan, scale in zip(plans, scales)], 1),
                                 plans[0].price, sum(plan.budget for plan in plans), self.evict_per_head,
                                 torch.cat([plan.protected for plan in plans]))
        offsets = [0]
        for plan in plans:
            offsets.append(offsets[-1] + plan.keys.shape[2])
        for index, (plan, cache) in waiting.items():
            part = slice(offsets[index], offsets[index + 1])
            stored = self._store(index, plan, keep[:, part], choice[:, part])
            if index == last:
                return stored
            cache.layers[index].keys, cache.layers[index].values = stored

    def _plan(self, module, hidden_states, keys, values, kwargs, dense_bytes: float) -> "_Plan":
        """A layer's options, their prices and distortions, its budget and the tokens it must keep."""
        kv_heads, tokens, head_dim = keys.shape[1:]
        stats = channel_stats(keys)
        side_bytes = kv_heads * head_dim * CHANNEL_STATS_BYTES  # the keys' channel statistics
        key_widths = list(self.bits)  # per width on offer: it, or its channel widths
        if self.channel_widths == "query":
            queries = rotated_queries(module, hidden_states, kwargs)
            key_widths = [query_weighted_widths(keys, queries, b, self.group_tokens) for b in self.bits]
            side_bytes += len(self.bits) * kv_heads * head_dim * WIDTH_TABLE_BITS / 8
        if self.key_layout == "channel":  # the error of KIVI's layout over the whole context, as the proxy
            key_options = [quantize_per_channel(keys, widths, self.group_tokens) for widths in key_widths]
            # a width's last partial group is stored per token: the dearer of the two prices keeps the budget
            key_price = [max(head_dim * (b / 8 + GROUP_SIDE_BYTES / self.group_tokens), token_bytes(b, head_dim, self.levels))
                         for b in self.bits]
        else:
            key_options = [quantize_per_token(keys, b, stats, self.rotate, self.levels) for b in self.bits]
            key_price = [token_bytes(b, head_dim, self.levels) for b in self.bits]
        value_options = [quantize_per_token(values, b, rotate=self.rotate, levels=self.levels) for b in self.bits]
        distortions = self._distortions(module, hidden_states, keys, values, key_options, value_options, kwargs,
                                        with_mass=self.merge_evicted, with_energy=self.layer_scale_needed)
        key_error, value_error, evict = distortions[:3]
        mass = distortions[3][0] if self.merge_evicted else None
        energy = distortions[-1] if self.layer_scale_needed else None
        widths = len(self.bits) + 1  # the last: fp16, no error
        pairs = [(k, v) for k in range(widths) for v in range(widths)] if self.separate_widths else [(w, w) for w in range(widths)]
        tag = math.ceil(math.log2(len(pairs))) / 8  # per kept (token, head): which option its key and value took
        fp16 = FP16_BYTES * head_dim
        key_price = torch.tensor(key_price + [fp16], device=keys.device)
        value_price = torch.tensor([token_bytes(b, head_dim, self.levels) for b in self.bits] + [fp16], device=keys.device) + tag
        key_of, value_of = (torch.tensor(side, device=keys.device) for side in zip(*pairs))  # per option: its key and value width
        no_error = torch.zeros_like(key_error[..., :1])
        distortion = torch.cat([key_error, no_error], -1)[..., key_of] + torch.cat([value_error, no_error], -1)[..., value_of]
        price = key_price[key_of] + value_price[value_of]  # the last option: fp16 keys and values
        budget = (1 - self.compression_ratio) * dense_bytes - side_bytes
        recent = self.window_size if self.recent_tokens is None else self.recent_tokens
        recent = min(recent, tokens, int(budget // (kv_heads * price[-1].item())))
        if recent:
            distortion[:, :, tokens - recent :, :-1] = float("inf")  # the newest stay in fp16 (as far as the budget goes)
        # protected tokens at the cheapest option beside the fp16 recent ones: as many as the budget pays for
        affordable = recent + int((budget - recent * kv_heads * price[-1].item()) // (kv_heads * price.min().item()))
        protected = torch.zeros(tokens, dtype=torch.bool, device=keys.device)
        protected[tokens - min(max(int(self.protect_recent * tokens), recent), affordable) :] = True
        return _Plan(keys, values, stats, key_widths, key_options, value_options, key_of, value_of, key_price, value_price,
                     distortion[0], self.evict_weight * evict[0], mass, price, budget, side_bytes, protected, energy)

    def _store(self, layer: int, plan: "_Plan", keep: torch.Tensor, choice: torch.Tensor):
        """The layer's keys and values as stored for the allocation ``keep``, ``choice`` (heads,
        tokens); records their bytes and widths."""
        keys, values, value_options = plan.keys, plan.values, plan.value_options
        key_choice, value_choice = plan.key_of[choice], plan.value_of[choice]
        self.chosen_bits[layer] = {
            side: {b: ((chosen == i) & keep).float().mean().item() for i, b in enumerate(list(self.bits) + [16])}
            | {0: 1 - keep.float().mean().item()} for side, chosen in (("keys", key_choice), ("values", value_choice))}
        kept = keep.nonzero()[:, 1].view(keys.shape[1], -1)  # (heads, kept) token indices, in cache order: as many per head
        if self.merge_evicted and not bool(keep.all()):  # the kept values absorb the evicted, then are quantized
            values = _merge_evicted(keys, values, keep, plan.mass)
            value_options = [quantize_per_token(values, b, rotate=self.rotate, levels=self.levels) for b in self.bits]
        values = _pick(values, value_options, value_choice, kept)
        value_bytes = plan.value_price[value_choice].gather(1, kept).sum().item()  # the precision tags ride with the values
        if self.key_layout == "channel":  # the key bytes as the width groups really fall
            keys, key_bytes = _keys_by_precision(_gather(keys, kept), plan.stats, key_choice.gather(1, kept), self.bits,
                                                 self.group_tokens, self.rotate,
                                                 plan.key_widths if self.channel_widths == "query" else None, self.levels)
        else:
            keys = _pick(keys, plan.key_options, key_choice, kept)
            key_bytes = plan.key_price[key_choice].gather(1, kept).sum().item()
        self.stored_bytes[layer] = key_bytes + value_bytes + plan.side_bytes
        return keys, values

    def _distortions(self, module, hidden_states, keys, values, key_options, value_options, kwargs, received=None,
                     with_mass=False, with_energy=False):
        """(batch, kv_heads, tokens, len(bits)) distortions of each quantized key and of each
        quantized value, and (batch, kv_heads, tokens) of eviction, summed over the window's
        queries and the query heads that share each KV head. ``received`` (batch, heads, tokens),
        when given, is the accumulated evidence in place of the call's own (``_received``): the
        streaming press's, carried over its calls. With ``with_mass`` also (batch, kv_heads, tokens)
        the expected attention p (prior included) summed the same way: ``merge_evicted``'s weights;
        with ``with_energy`` also the window outputs' sum of |o|^2 (a float: ``layer_scale``'s)."""
        window = min(self.window_size, hidden_states.shape[1])
        cos, sin = kwargs["position_embeddings"]
        window_kwargs = {**kwargs, "position_embeddings": (cos[:, -window:], sin[:, -window:])}
        probs = current_attention(module, hidden_states[:, -window:], keys, window_kwargs)  # (b, h, w, n) float32
        queries = rotated_queries(module, hidden_states[:, -window:], window_kwargs).float()
        groups = probs.shape[1] // keys.shape[1]
        values_per_head = repeat_kv(values, groups).float()
        outputs = probs @ values_per_head
        # |v - o|^2 for every (query, token): how far the output moves per unit of lost weight
        spread = ((values_per_head**2).sum(-1).unsqueeze(2) - 2 * outputs @ values_per_head.transpose(2, 3)
                  + (outputs**2).sum(-1, keepdim=True)).clamp(min=0)
        expected = probs  # the attention the next queries are expected to pay each token
        if self.accumulated:
            if received is None:
                received = self._received(module, hidden_states, keys, kwargs)
            expected = (1 - self.accumulated) * probs + self.accumulated * received.unsqueeze(2)  # (b, h, 1, n)
        expected = expected + self._prior(keys.shape[2], probs.device)
        head_weight = (output_head_weights(module, probs.shape[1], keys.shape[-1])[None, :, None, None]
                       if self.head_weights == "output" else 1.0)
        weight = expected**2 * head_weight
        evict = per_kv_head((weight * spread).sum(2), keys.shape[1])
        key_error, value_error = [], []
        for quantized_keys, quantized_values in zip(key_options, value_options):
            value_sq = ((quantized_values - values).float() ** 2).sum(-1)
            logit_error = queries @ repeat_kv(quantized_keys - keys, groups).float().transpose(2, 3) / math.sqrt(keys.shape[-1])
            value_error.append(per_kv_head(weight.sum(2) * repeat_kv(value_sq.unsqueeze(-1), groups).squeeze(-1), keys.shape[1]))
            key_error.append(per_kv_head((weight * logit_error**2 * spread).sum(2), keys.shape[1]))
        distortions = torch.stack(key_error, dim=-1), torch.stack(value_error, dim=-1), evict
        if with_mass:
            distortions += (per_kv_head(expected.expand_as(probs).sum(2), keys.shape[1]),)
        if with_energy:
            distortions += (((outputs**2) * head_weight).sum().clamp(min=1e-30).item(),)
        return distortions

    def _received(self, module, hidden_states, keys, kwargs) -> torch.Tensor:
        """(batch, heads, tokens): the mean attention each token received from the call's queries."""
        q_len = hidden_states.shape[1]
        if keys.shape[2] < q_len:  # the queries' causal reach is only known over the call's own cache
            raise PressConfigError(f"RD-KV's accumulated evidence needs the whole prefill's keys, but an earlier press "
                                   f"left {keys.shape[2]} of {q_len}: after another press use accumulated=0")
        total = self.received_sum(module, hidden_states, keys, kwargs)
        if self.accumulated_over == "all":
            return total / q_len
        k_len = keys.shape[2]
        past = torch.arange(k_len, device=keys.device) - (k_len - q_len)  # a token's index among the queries
        return total / (q_len - past.clamp(min=0))  # the queries at or after it see it

    def received_sum(self, module, hidden_states, keys, kwargs) -> torch.Tensor:
        """(batch, heads, tokens): the attention each token received, summed over the call's queries
        (``query_chunk`` queries at a time)."""
        total = 0
        for start in range(0, hidden_states.shape[1], self.query_chunk):
            total = total + attention_rows(module, hidden_states, keys, None, kwargs, start, start + self.query_chunk).sum(2)
        return total

    def _prior(self, tokens: int, device) -> torch.Tensor:
        """(tokens,) the prior's attention mass per token, oldest first."""
        if self.prior_shape == "uniform":
            return torch.full((tokens,), self.prior / tokens, device=device)
        closeness = 1 / torch.arange(tokens, 0, -1, device=device, dtype=torch.float32)
        return self.prior * closeness / closeness.sum()


@dataclass
class _Plan:
    """One layer's allocation problem (``RDKVPress._plan``) and what storing its answer needs."""

    keys: torch.Tensor
    values: torch.Tensor
    stats: tuple
    key_widths: list  # per width on offer: it, or with channel_widths="query" its (1, heads, dim) channel widths
    key_options: list
    value_options: list
    key_of: torch.Tensor  # per option: its key width's index
    value_of: torch.Tensor
    key_price: torch.Tensor  # bytes per (token, head) of each key width
    value_price: torch.Tensor
    distortion: torch.Tensor  # (heads, tokens, options)
    evict: torch.Tensor  # (heads, tokens), evict_weight applied
    mass: torch.Tensor | None  # (heads, tokens) the expected attention p (merge_evicted only)
    price: torch.Tensor  # (options,)
    budget: float
    side_bytes: float
    protected: torch.Tensor  # (tokens,)
    energy: float | None  # the window outputs' sum of |o|^2 (allocate_over="model" with layer_scale="output" only)


def _allocate(distortion: torch.Tensor, evict: torch.Tensor, price: torch.Tensor, budget: float, per_head: bool = False,
              protected: torch.Tensor | None = None):
    """Per token, keep (in every head) or evict, or with ``per_head`` the same number of tokens
    in every head, each head keeping the ones it gains most from; per kept (head, token), the
    option to store.
    ``distortion`` (heads, tokens, options), ``evict`` (heads, tokens), ``price`` (options,)
    bytes. Minimises total distortion + lambda * bytes for the smallest lambda whose choice fits
    ``budget``, found on a log grid of ``GRID`` values at once, then on a finer grid between
    the two around it (two host syncs per layer, not one per bisection step). Tokens ``protected``
    (tokens,) are kept, at the options the same rule chooses.
    Returns keep (heads, tokens) and choice (heads, tokens)."""
    scale = (evict.mean() / price.mean()).clamp(min=1e-30).log().item()
    forced = torch.isinf(distortion[..., 0]).any(0)  # forced tokens are always kept
    if protected is not None:
        forced = forced | protected
    heads = distortion.shape[0]

    def choose(log_lambdas: torch.Tensor):
        cost = distortion + log_lambdas.exp().view(-1, 1, 1, 1) * price  # (grid, heads, tokens, options)
        best, choice = cost.min(dim=-1)  # (grid, heads, tokens)
        if per_head:  # a cache holds as many tokens per head: each keeps its count's most gainful ones
            gain = (evict - best).masked_fill(forced, float("inf"))
            count = ((gain > 0).sum((1, 2)) / heads).round().clamp(min=int(forced.sum()))
            rank = gain.argsort(-1, descending=True).argsort(-1)
            keep = rank < count.view(-1, 1, 1)
        else:
            keep = ((best.sum(1) < evict.sum(0)) | forced).unsqueeze(1).expand_as(best)
        return keep, choice, (price[choice] * keep).sum((1, 2))

    low, high = scale - 40.0, scale + 40.0
    for _ in range(2):
        grid = torch.linspace(low, high, GRID, device=distortion.device)
        fits = choose(grid)[2] <= budget
        first = int(fits.float().argmax()) if bool(fits.any()) else GRID - 1
        low, high = grid[max(first - 1, 0)].item(), grid[first].item()
    keep, choice, _ = choose(torch.tensor([high], device=distortion.device))
    return keep[0], choice[0]


def _keys_by_precision(keys: torch.Tensor, stats, choice: torch.Tensor, bits: tuple[int, ...], group_tokens: int,
                       rotate: bool = False, channel_widths: list | None = None, levels: str = "uniform"):
    """Kept keys (1, heads, kept, dim) stored in KIVI's layout: per head, the tokens given one
    width form groups of ``group_tokens`` in cache order, each channel quantized over its group
    (with ``channel_widths``, per width on offer its (1, heads, dim) channel widths, averaging at
    most that width); the last partial group of a width is quantized per token (centred and
    scaled per channel, and rotated with ``rotate``, to ``levels``).
    Returns the stored keys and their bytes (packed integers and group scales; fp16 ones as they are)."""
    stored, head_dim, total = keys.clone(), keys.shape[-1], 0.0
    for head in range(keys.shape[1]):
        for index, b in enumerate(list(bits) + [16]):
            members = (choice[head] == index).nonzero().squeeze(1)
            if members.numel() == 0:
                continue
            if b == 16:
                total += members.numel() * FP16_BYTES * head_dim
                continue
            widths, packed = b, b  # the channels' widths, and their mean: the bits a group's channels hold
            if channel_widths is not None:
                widths = channel_widths[index][:, head : head + 1]
                packed = widths.float().mean().item()
            part = keys[:, head : head + 1, members]
            whole = members.numel() // group_tokens * group_tokens
            quantized = quantize_per_channel(part, widths, group_tokens)
            head_stats = tuple(stat[:, head : head + 1] for stat in stats)
            quantized[:, :, whole:] = quantize_per_token(part[:, :, whole:], b, head_stats, rotate, levels)
            stored[:, head : head + 1, members] = quantized
            total += per_channel_bytes(whole, packed, head_dim, group_tokens) + (members.numel() - whole) * token_bytes(b, head_dim, levels)
    return stored, total


def _merge_evicted(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """``values`` (1, heads, tokens, dim) with each evicted (head, token) j folded into the kept
    token k of its head whose key has the highest cosine with j's: v_k <- (p_k v_k + sum_j p_j v_j)
    / (p_k + sum_j p_j), ``mass`` (heads, tokens) the p; ``keep`` (heads, tokens). Kept tokens that
    absorb nothing, and the evicted ones, are returned as they were."""
    unit = nn.functional.normalize(keys[0].float(), dim=-1)
    similarity = (unit @ unit.transpose(1, 2)).masked_fill(~keep.unsqueeze(1), float("-inf"))  # (heads, from, to)
    own = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    into = torch.where(keep, own, similarity.argmax(-1))  # (heads, tokens): where each token's value goes
    weighted = mass.unsqueeze(-1) * values[0].float()
    total = torch.zeros_like(weighted).scatter_add_(1, into.unsqueeze(-1).expand_as(weighted), weighted)
    weights = torch.zeros_like(mass).scatter_add_(1, into, mass)
    absorbed = torch.zeros_like(mass).scatter_add_(1, into, (~keep).float()) > 0  # kept tokens some value went into
    merged = (total / weights.unsqueeze(-1)).to(values.dtype)
    return torch.where(absorbed.unsqueeze(-1), merged, values[0]).unsqueeze(0)


def _gather(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(1, heads, tokens, dim) -> (1, heads, kept, dim): each head's kept tokens (``kept`` (heads, kept) indices)."""
    return x.gather(2, kept[None, :, :, None].expand(-1, -1, -1, x.shape[-1]))


def _pick(full: torch.Tensor, options: list[torch.Tensor], choice: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The stored tensor: each (head, token) from its chosen option (the last, fp16, is ``full``), kept tokens only."""
    picked = full.clone()
    for index, option in enumerate(options):
        chosen = (choice == index).unsqueeze(0).unsqueeze(-1)
        picked = torch.where(chosen, option, picked)
    return _gather(picked, kept)
