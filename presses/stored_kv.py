"""One layer's cache stored at mixed widths while text streams in (the streaming presses at equal
bytes: presses/rdkv_budget_press.py, presses/quantized_budget_press.py).

The cache tensors hold every key and value as stored, dequantized (presses/quantize.py's
simulation); ``StoredLayer`` says, per (KV head, token), the width each is stored at (16: fp16),
which per-channel group holds a key (KIVI's layout), and what the store takes in bytes. A token
is narrowed from the values it holds (the fp16 original is gone once it is quantized), so a token
that keeps its width keeps its values bit for bit and narrowing it adds only the new rounding.
"""

from dataclasses import dataclass, replace

import torch

from presses.quantize import (CHANNEL_STATS_BYTES, FP16_BYTES, GROUP_SIDE_BYTES, channel_stats, quantize_per_channel,
                              quantize_per_token)

FP16_WIDTH = 16


@dataclass
class StoredLayer:
    """What a layer's cache holds besides its tensors; each tensor is (kv_heads, tokens), in cache order."""

    key_bits: torch.Tensor  # the width each key is stored at (16: fp16)
    value_bits: torch.Tensor
    key_group: torch.Tensor  # the per-channel group a key was quantized in (-1: fp16 or quantized per token)
    index: torch.Tensor  # the token's index in the stream
    stats: tuple[torch.Tensor, torch.Tensor] | None = None  # keys' channel statistics: fixed when first needed
    groups_made: int = 0  # group ids are unique within the layer
    seen: int = 0  # tokens that have entered the cache

    @classmethod
    def empty(cls, heads: int, device) -> "StoredLayer":
        none = torch.empty(heads, 0, dtype=torch.long, device=device)
        return cls(none, none, none, none)

    def grow(self, tokens: int) -> None:
        """The cache now holds ``tokens``: the ones appended since are new, in fp16."""
        heads, new = self.index.shape[0], tokens - self.index.shape[1]
        device = self.index.device

        def fill(value):
            return torch.full((heads, new), value, dtype=torch.long, device=device)

        self.key_bits = torch.cat([self.key_bits, fill(FP16_WIDTH)], 1)
        self.value_bits = torch.cat([self.value_bits, fill(FP16_WIDTH)], 1)
        self.key_group = torch.cat([self.key_group, fill(-1)], 1)
        arrived = torch.arange(self.seen, self.seen + new, device=device).expand(heads, -1)
        self.index = torch.cat([self.index, arrived], 1)
        self.seen += new

    def kept(self, indices: torch.Tensor) -> "StoredLayer":
        """The state of the tokens that ``indices`` (kv_heads, kept) keep, in that order."""
        return replace(self, key_bits=self.key_bits.gather(1, indices), value_bits=self.value_bits.gather(1, indices),
                       key_group=self.key_group.gather(1, indices), index=self.index.gather(1, indices))

    def nbytes(self, head_dim: int, tag_bytes: float = 0.0) -> float:
        """Bytes the store takes: an fp16 key or value 2 per element; a value, or a key quantized
        per token, its packed integers and its fp16 scale and zero point; a key in a per-channel
        group its packed integers, and every group still holding a key one scale and zero point
        per channel; the channel statistics once per layer once they exist; ``tag_bytes`` per
        cached (head, token) (a precision tag)."""

        def element_bytes(bits, side):
            quantized = head_dim * bits.double() / 8 + side
            return torch.where(bits >= FP16_WIDTH, float(FP16_BYTES * head_dim), quantized).sum().item()

        grouped = self.key_group >= 0
        groups = self.key_group[grouped].unique().numel()
        total = (element_bytes(self.value_bits, GROUP_SIDE_BYTES)
                 + element_bytes(self.key_bits, torch.where(grouped, 0.0, float(GROUP_SIDE_BYTES)))
                 + groups * head_dim * GROUP_SIDE_BYTES + tag_bytes * self.index.numel())
        if self.stats is not None:
            total += self.index.shape[0] * head_dim * CHANNEL_STATS_BYTES
        return total


def narrowed(keys: torch.Tensor, values: torch.Tensor, state: StoredLayer, key_bits: torch.Tensor,
             value_bits: torch.Tensor, key_layout: str, group_tokens: int, whole_groups: bool = False):
    """``keys`` and ``values`` (1, kv_heads, tokens, dim), stored as ``state`` says, stored at the
    widths ``key_bits`` and ``value_bits`` (kv_heads, tokens) instead, none wider than now. Each
    (head, token) whose width changes is quantized from the values it holds: values per token;
    keys per token after the channel statistics (``key_layout="token"``), or with ``"channel"``
    in KIVI's per-channel groups of ``group_tokens``, formed per head among the keys newly given
    one width, in cache order (the last partial group per token, as RD-KV's prefill stores it;
    with ``whole_groups`` its keys keep their stored width instead, as KIVI keeps its residual:
    a key quantized per token is centred and scaled by the channel statistics, fixed once, and
    while text streams in those fit the later keys ever worse). The rest keep their values and
    groups. Returns keys, values and their state."""
    if bool((key_bits > state.key_bits).any() or (value_bits > state.value_bits).any()):
        raise ValueError("a stored token can keep its width or narrow, not widen: its fp16 values are gone")
    stats, given_keys = state.stats, keys

    def needed_stats():  # computed once, from the keys as given, when a key is first quantized per token
        return stats if stats is not None else channel_stats(given_keys)

    changed = value_bits != state.value_bits
    for bits in value_bits[changed].unique().tolist():
        values = torch.where((changed & (value_bits == bits))[None, :, :, None], quantize_per_token(values, bits), values)
    changed = key_bits != state.key_bits
    groups, made = state.key_group.masked_fill(changed, -1), state.groups_made
    if key_layout == "token":
        for bits in key_bits[changed].unique().tolist():
            stats = needed_stats()
            quantized = quantize_per_token(keys, bits, stats)
            keys = torch.where((changed & (key_bits == bits))[None, :, :, None], quantized, keys)
    else:
        keys, target = keys.clone(), key_bits
        key_bits = key_bits.clone()
        for head in range(keys.shape[1]):
            for bits in target[head, changed[head]].unique().tolist():
                members = (changed[head] & (target[head] == bits)).nonzero().squeeze(1)
                part = keys[:, head : head + 1, members]
                whole = members.numel() // group_tokens * group_tokens
                quantized = quantize_per_channel(part, bits, group_tokens)
                if whole_groups:  # the partial group's keys wait at their width for a whole group
                    rest = members[whole:]
                    key_bits[head, rest], groups[head, rest] = state.key_bits[head, rest], state.key_group[head, rest]
                    quantized[:, :, whole:] = part[:, :, whole:]
                elif whole < members.numel():
                    stats = needed_stats()
                    head_stats = tuple(stat[:, head : head + 1] for stat in stats)
                    quantized[:, :, whole:] = quantize_per_token(part[:, :, whole:], bits, head_stats)
                keys[:, head : head + 1, members] = quantized
                groups[head, members[:whole]] = made + torch.arange(whole, device=keys.device) // group_tokens
                made += whole // group_tokens
    return keys, values, replace(state, key_bits=key_bits, value_bits=value_bits, key_group=groups,
                                 groups_made=made, stats=stats)

