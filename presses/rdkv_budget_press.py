"""RD-KV while text streams in: each layer's cache held under a byte budget, re-allocated over the
whole cache whenever new tokens push it past the budget."""

import contextlib
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from kvpress import BasePress
from torch import nn

from presses.attention import keep_recent, per_kv_head
from presses.errors import PressConfigError
from presses.quantize import (CHANNEL_STATS_BYTES, FP16_BYTES, GROUP_SIDE_BYTES, channel_stats, quantize_per_channel,
                              quantize_per_token, token_bytes)
from presses.rdkv_press import RDKVPress, _allocate, _gather
from presses.stored_kv import FP16_WIDTH, StoredLayer, narrowed


@dataclass
class RDKVBudgetPress(BasePress):
    """RD-KV (presses/rdkv_press.py) at decode time: after a layer's attention, whenever its cache
    takes more than ``budget_tokens`` tokens' keys and values in fp16 (bytes counted as stored:
    presses/stored_kv.py), RD-KV allocates again over every cached (token, KV head) with
    ``rdkv``'s settings: the same distortions (the current call's last ``window_size`` queries,
    its prior and eviction weight) and the same lambda search (``_allocate``), so that the store
    fits the budget. What a cached token may become depends on how it is stored: a new (fp16)
    token may take any option; a stored token may keep its width (no new error: it keeps its
    values bit for bit), narrow (quantized from its stored values, which the distortion
    measures) or be evicted, never widen. The newest tokens still in fp16 (``recent_tokens``,
    default the window's) stay so while the budget pays for them.

    Allocation prices each option as RD-KV's prefill does; the store then forms KIVI's key groups
    among the keys newly given a width, and keys left in a group whose other members went keep
    paying for its scales. The bytes are counted as the groups really fall: if they exceed the
    budget, the allocation runs again with its budget lowered by the excess, so the store never
    exceeds the budget after a call. ``stored_bytes`` holds each layer's bytes after the last call.

    RD-KV's accumulated evidence (``rdkv.accumulated``) spans the stream, as H2O's scores do: per
    (query head, cached token) the press carries the attention the token has received from every
    query since it entered the cache (its own included), kept and dropped with the token; with
    ``rdkv.accumulated_over="all"`` the evidence is that sum over the queries so far (the mean
    attention of the stream's queries), with ``"visible"`` over the queries that have seen the
    token. With ``carry_received=False`` it is the current call's only (the mean over its
    queries), as RD-KV's prefill has it. The window's attention still comes from the current
    call's last ``window_size`` queries (one, when text streams in token by token).

    A call of fewer than ``realloc_slack`` tokens that pushes the store past the budget has RD-KV
    allocate down to ``realloc_slack`` (at most half the budget's) fewer fp16 tokens' bytes, so that the next calls fit
    without allocating again (token-by-token streaming allocates once every ``realloc_slack``
    tokens, not at every token); longer calls allocate down to the budget itself.

    With ``h2o_keep`` = x, H2O's rule picks the tokens first: before each allocation every KV
    head keeps at most x * ``budget_tokens`` tokens, the newest half and the rest with the most
    attention received since entering (the carried sums over its query heads, H2O's score), and
    RD-KV then chooses widths among them (and may still evict), as ``after_h2o`` composes them
    after prefill (evaluation/equal_bytes.py), where that composition won at tight budgets (H2O's
    stream-long sums and recent half may pick tokens that RD-KV's window of queries misses). On
    the streaming tuning stretch it did not beat RD-KV's own rule (results/
    smollm2-135m_streaming_tuning_cpu/); 0 (off) stays the default.

    With ``key_layout="channel"`` the keys newly given one width that fall short of a whole
    group of ``group_tokens`` keep their stored width until a later allocation fills the group
    (``whole_key_groups``, KIVI's residual), instead of being quantized per token: a per-token key
    is centred and scaled by the channel statistics, fixed at the first allocation, which fit
    later keys ever worse as the stream goes on (rotary positions turn the channels' offsets),
    and the allocation, pricing keys by per-channel groups, does not see that error (at 3 bits
    after 4096 tokens of Frankenstein, 10-20x a group's: results/
    smollm2-135m_streaming_tuning_cpu/, "Long streams"). ``whole_key_groups=False`` is the press as it
    was.

    Positions are the tokens' places in the text (BudgetPress's default); keys are never
    re-rotated. One sequence per call.
    """

    rdkv: RDKVPress = field(default_factory=RDKVPress)  # the allocation's settings (its compression_ratio is unused)
    budget_tokens: int = 512  # the byte budget per layer: this many tokens' keys and values in fp16
    carry_received: bool = True  # the accumulated evidence from every query since a token entered (False: the call's)
    realloc_slack: int = 32  # calls shorter than this allocate down to this many fp16 tokens' bytes below the budget
    h2o_keep: float = 0.0  # H2O keeps at most this many budgets' tokens first, RD-KV allocating among them (0: off)
    whole_key_groups: bool = True  # channel layout: a width's keys short of a whole group wait at their width
    stored_bytes: dict = field(default_factory=dict, repr=False)
    layers: dict = field(default_factory=dict, init=False, repr=False)  # layer -> StoredLayer
    received: dict = field(default_factory=dict, init=False, repr=False)  # layer -> (heads, tokens) attention summed

    def __post_init__(self):
        if self.budget_tokens < 2:  # one token's fp16 bytes are what the channel statistics take
            raise PressConfigError(f"budget_tokens must be at least 2, got {self.budget_tokens}")
        if self.realloc_slack < 0:
            raise PressConfigError(f"realloc_slack must be at least 0, got {self.realloc_slack}")
        if self.h2o_keep and not self.carry_received:  # H2O's score is the sum over the stream
            raise PressConfigError("h2o_keep needs carry_received: H2O scores tokens by the attention carried over the stream")
        if self.h2o_keep < 0:
            raise PressConfigError(f"h2o_keep must be at least 0, got {self.h2o_keep}")
        if self.h2o_keep and int(self.h2o_keep * self.budget_tokens) // 2 < self.rdkv.window_size:
            # H2O's recent half must hold the window's queries: they are every head's newest columns
            raise PressConfigError(f"h2o_keep * budget_tokens / 2 must hold RD-KV's window of {self.rdkv.window_size} "
                                   f"tokens, got h2o_keep {self.h2o_keep} at budget_tokens {self.budget_tokens}")
        if self.rdkv.rotate or self.rdkv.protect_recent:  # the stored-width bookkeeping has neither yet
            raise PressConfigError("RDKVBudgetPress does not support RD-KV's rotate or protect_recent yet "
                                   "(prefill RDKVPress does)")
        if self.rdkv.merge_evicted:  # its evictions go through its own state, which does not merge
            raise PressConfigError("RDKVBudgetPress does not support RD-KV's merge_evicted yet (prefill RDKVPress does)")
        if self.rdkv.allocate_over != "layer":  # each layer's calls hold its own budget, one at a time
            raise PressConfigError("RDKVBudgetPress allocates per layer: allocate_over='model' is prefill RDKVPress's")
        widths = sorted(self.rdkv.bits)
        self.widths = widths + [FP16_WIDTH]  # option index -> width; the last is fp16
        options = len(self.widths)
        self.pairs = ([(k, v) for k in range(options) for v in range(options)] if self.rdkv.separate_widths
                      else [(w, w) for w in range(options)])

    @contextlib.contextmanager
    def __call__(self, model):
        self.reset()
        try:
            with super().__call__(model):
                yield
        finally:
            self.reset()

    def reset(self):
        self.layers.clear()
        self.stored_bytes.clear()
        self.received.clear()

    def tag_bytes(self) -> float:
        """Per cached (token, head): which pair of widths its key and value take (RD-KV's tag)."""
        return math.ceil(math.log2(len(self.pairs))) / 8

    def forward_hook(self, module: nn.Module, input, kwargs: dict, output):
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        batch, heads, tokens, head_dim = layer.keys.shape
        if batch != 1:
            raise PressConfigError(f"RDKVBudgetPress holds one sequence per call, got a batch of {batch}")
        state = self.layers.setdefault(module.layer_idx, StoredLayer.empty(heads, layer.keys.device))
        state.grow(tokens)
        hidden_states = kwargs["hidden_states"]
        if self.carry_received and (self.rdkv.accumulated or self.h2o_keep):
            self.received[module.layer_idx] = self._carried(module, hidden_states, layer.keys, kwargs)
        budget = self.budget_tokens * heads * 2 * FP16_BYTES * head_dim
        if state.nbytes(head_dim, self.tag_bytes()) > budget:
            slack = min(self.realloc_slack, self.budget_tokens // 2) if hidden_states.shape[1] < self.realloc_slack else 0
            target = budget - slack * heads * 2 * FP16_BYTES * head_dim
            first = self._h2o_kept(module.layer_idx, state) if self.h2o_keep else None
            if first is not None:  # H2O's keep set: RD-KV allocates among these tokens only
                layer.keys, layer.values = _gather(layer.keys, first), _gather(layer.values, first)
                state = state.kept(first)
                self._keep_received(module, first)
            layer.keys, layer.values, state, kept = self.allocate(module, kwargs, layer.keys, layer.values, state,
                                                                  target)
            self.layers[module.layer_idx] = state
            self._keep_received(module, kept)
        self.stored_bytes[module.layer_idx] = state.nbytes(head_dim, self.tag_bytes())
        return output

    def _keep_received(self, module, kept: torch.Tensor) -> None:
        """The carried sums of the tokens ``kept`` (kv_heads, kept) keeps, each query head following its KV head."""
        if module.layer_idx in self.received:
            groups = module.config.num_attention_heads // kept.shape[0]
            self.received[module.layer_idx] = self.received[module.layer_idx].gather(1, kept.repeat_interleave(groups, 0))

    def _h2o_kept(self, layer_idx: int, state: StoredLayer) -> torch.Tensor | None:
        """(kv_heads, kept) the tokens H2O keeps, in cache order: per KV head the newest half of
        ``h2o_keep`` budgets' tokens and the rest by the carried sums over its query heads; None
        when the cache holds no more."""
        heads, tokens = state.index.shape
        keep = int(self.h2o_keep * self.budget_tokens)
        if tokens <= keep:
            return None
        score = per_kv_head(self.received[layer_idx][None], heads)[0]
        return keep_recent(score, keep // 2).topk(keep, dim=-1).indices.sort(dim=-1).values

    def _carried(self, module, hidden_states, keys, kwargs) -> torch.Tensor:
        """(heads, tokens): the attention each cached token has received since it entered, summed
        over the queries, this call's added (per query head, ``rdkv.query_chunk`` queries at a time)."""
        total = self.received.get(module.layer_idx, keys.new_zeros(module.config.num_attention_heads, 0).float())
        return F.pad(total, (0, keys.shape[2] - total.shape[1])) + self.rdkv.received_sum(module, hidden_states, keys,
                                                                                        kwargs)[0]

    def _evidence(self, layer_idx: int, state: StoredLayer) -> torch.Tensor | None:
        """(1, heads, tokens): the carried sums over the queries so far (``accumulated_over="all"``)
        or over the queries that have seen each token (``"visible"``); None: the call's own."""
        if layer_idx not in self.received:
            return None
        received = self.received[layer_idx]
        if self.rdkv.accumulated_over == "all":
            return (received / state.seen)[None]
        groups = received.shape[0] // state.index.shape[0]
        seen_by = (state.seen - state.index).repeat_interleave(groups, 0)  # the queries from the token's own on
        return (received / seen_by)[None]

    def allocate(self, module, kwargs, keys, values, state: StoredLayer, budget: float):
        """The cache stored within ``budget`` bytes: (keys, values, state, kept), the keys and
        values of the kept tokens and their indices (kv_heads, kept) in the cache given."""
        rdkv, heads, tokens, head_dim = self.rdkv, keys.shape[1], keys.shape[2], keys.shape[3]
        state = replace(state, stats=state.stats if state.stats is not None else channel_stats(keys))
        key_options, value_options = [], []
        for bits in self.widths[:-1]:  # each width's stored form; a token already at that width as it is
            if rdkv.key_layout == "channel":  # KIVI's error over the whole cache, as the proxy (as in RD-KV)
                fresh = quantize_per_channel(keys, bits, rdkv.group_tokens)
            else:
                fresh = quantize_per_token(keys, bits, state.stats)
            key_options.append(torch.where((state.key_bits == bits)[None, :, :, None], keys, fresh))
            value_options.append(torch.where((state.value_bits == bits)[None, :, :, None], values,
                                             quantize_per_token(values, bits)))
        key_error, value_error, evict = rdkv._distortions(module, kwargs["hidden_states"], keys, values, key_options,
                                                          value_options, kwargs, self._evidence(module.layer_idx, state))
        width = torch.tensor(self.widths, device=keys.device)
        no_error = torch.zeros_like(key_error[..., :1])
        # a stored token cannot widen: an option wider than its stored width is not on offer
        key_error = torch.cat([key_error, no_error], -1).masked_fill(width > state.key_bits[None, :, :, None], math.inf)
        value_error = torch.cat([value_error, no_error], -1).masked_fill(
            width > state.value_bits[None, :, :, None], math.inf)
        key_of, value_of = (torch.tensor(side, device=keys.device) for side in zip(*self.pairs))
        distortion = key_error[..., key_of] + value_error[..., value_of]
        price = self._prices(head_dim, keys.device)
        fp16_now = ((state.key_bits == FP16_WIDTH) & (state.value_bits == FP16_WIDTH)).all(0)  # (tokens,)
        recent = rdkv.window_size if rdkv.recent_tokens is None else rdkv.recent_tokens
        allowed = budget - heads * head_dim * CHANNEL_STATS_BYTES
        while True:
            pressed = distortion.clone()
            newest = min(recent, tokens, max(int(allowed // (heads * price[-1].item())), 0))
            pressed[:, :, tokens - newest :, :-1] = pressed[:, :, tokens - newest :, :-1].masked_fill(
                fp16_now[tokens - newest :, None], math.inf)  # the newest fp16 tokens stay fp16
            keep, choice = _allocate(pressed[0], rdkv.evict_weight * evict[0], price, allowed, rdkv.evict_per_head)
            kept = keep.nonzero()[:, 1].view(heads, -1)  # (heads, kept) token indices, in cache order
            stored = narrowed(_gather(keys, kept), _gather(values, kept), state.kept(kept),
                              width[key_of[choice]].gather(1, kept), width[value_of[choice]].gather(1, kept),
                              rdkv.key_layout, rdkv.group_tokens, self.whole_key_groups)
            held = stored[2].nbytes(head_dim, self.tag_bytes())
            if held <= budget:
                return *stored, kept
            allowed -= held - budget  # groups fell dearer than priced: ask for that much less

    def _prices(self, head_dim: int, device) -> torch.Tensor:
        """(pairs,) bytes of each (key width, value width) option, priced as RD-KV's prefill prices them."""
        quantized = self.widths[:-1]
        if self.rdkv.key_layout == "channel":  # the dearer of a whole group's share and a per-token key
            keys = [max(head_dim * (b / 8 + GROUP_SIDE_BYTES / self.rdkv.group_tokens), token_bytes(b, head_dim))
                    for b in quantized]
        else:
            keys = [token_bytes(b, head_dim) for b in quantized]
        fp16 = FP16_BYTES * head_dim
        key_price = torch.tensor(keys + [fp16], device=device, dtype=torch.float64)
        value_price = torch.tensor([token_bytes(b, head_dim) for b in quantized] + [fp16], device=device,
                                   dtype=torch.float64) + self.tag_bytes()
        key_of, value_of = (torch.tensor(side, device=device) for side in zip(*self.pairs))
        return (key_price[key_of] + value_price[value_of]).float()
