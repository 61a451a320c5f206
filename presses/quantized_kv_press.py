"""Uniform low-bit KV after prefill: the quantization baseline at a given number of bytes."""

from dataclasses import dataclass, field

import torch
from kvpress import BasePress
from torch import nn

from presses.attention import rotated_queries
from presses.errors import PressConfigError
from presses.quantize import (check_channel_widths, check_levels, FP16_BYTES, WIDTH_TABLE_BITS, WIDTHS, channel_stats, per_channel_bytes, quantize_per_channel,
                              quantize_per_token, quantized_head_bytes, query_weighted_widths)


@dataclass
class QuantizedKVPress(BasePress):
    """Every cached token's key and value rounded to ``bits`` bits after prefill (simulated:
    presses/quantize.py), the newest ``recent_tokens`` kept in fp16. Values are quantized per
    token; keys per channel over groups of ``group_tokens`` tokens (``key_layout="channel"``,
    KIVI, Liu et al. 2024) or per token after centring and scaling each channel
    (``key_layout="token"``, presses/quantize.py); with ``rotate`` every per-token group (the values,
    per-token keys) is quantized after a fixed random rotation (QuaRot's, presses/quantize.py); with
    ``channel_widths="query"`` KIVI's key channels take widths by the prefill queries' energy on
    them, ``bits`` on average (ours, presses/quantize.py; their table counted); with ``levels="gaussian"``
    rotated groups round to Lloyd-Max's levels for normal entries at 2 and 3 bits (same bytes), with
    ``levels="symmetric"`` to levels symmetric about zero (a scale, no zero point: 2 bytes fewer a group). It removes no token (``compression_ratio`` stays 0): composed
    after an eviction press it quantizes what that press kept. ``stored_bytes`` holds, per
    layer, the bytes one sequence's keys and values take in that form, scales included."""

    bits: int = 4
    key_layout: str = "channel"
    group_tokens: int = 32
    recent_tokens: int = 0
    rotate: bool = False
    channel_widths: str = "uniform"  # "query": KIVI key channels' widths by the queries' energy on them
    levels: str = "uniform"  # rotated per-token groups: "gaussian" (Lloyd-Max levels), "symmetric" (no zero point)
    compression_ratio: float = 0.0
    stored_bytes: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.bits not in WIDTHS:
            raise PressConfigError(f"bits must be one of {', '.join(map(str, WIDTHS))}, got {self.bits}")
        if self.key_layout not in ("channel", "token"):
            raise PressConfigError(f"key_layout must be 'channel' or 'token', got {self.key_layout!r}")
        if self.group_tokens < 1 or self.recent_tokens < 0:
            raise PressConfigError("group_tokens must be at least 1 and recent_tokens at least 0")
        check_channel_widths(self.channel_widths, self.key_layout)
        check_levels(self.levels, self.rotate)

    def compress(self, module: nn.Module, hidden_states, keys: torch.Tensor, values: torch.Tensor, attentions, kwargs):
        batch, heads, tokens, head_dim = keys.shape
        old = max(tokens - self.recent_tokens, 0)
        recent_bytes = 2 * (tokens - old) * FP16_BYTES * head_dim
        quantized_bytes = quantized_head_bytes(old, self.bits, head_dim, self.key_layout, self.group_tokens, self.levels)
        if self.channel_widths == "query":
            widths = query_weighted_widths(keys[:, :, :old], rotated_queries(module, hidden_states, kwargs), self.bits,
                                           self.group_tokens)
            quantized_keys = quantize_per_channel(keys[:, :, :old], widths, self.group_tokens)
            # the packed key bits as the widths fall (at most bits on average), and their table
            quantized_bytes += (per_channel_bytes(old, widths.float().mean().item(), head_dim, self.group_tokens)
                                - per_channel_bytes(old, self.bits, head_dim, self.group_tokens)
                                + head_dim * WIDTH_TABLE_BITS / 8)
        elif self.key_layout == "channel":
            quantized_keys = quantize_per_channel(keys[:, :, :old], self.bits, self.group_tokens)
        else:
            quantized_keys = quantize_per_token(keys[:, :, :old], self.bits, channel_stats(keys[:, :, :old]), self.rotate,
                                                self.levels)
        quantized_values = quantize_per_token(values[:, :, :old], self.bits, rotate=self.rotate, levels=self.levels)
        self.stored_bytes[module.layer_idx] = heads * (quantized_bytes + recent_bytes)
        keys = torch.cat([quantized_keys, keys[:, :, old:]], dim=2)
        values = torch.cat([quantized_values, values[:, :, old:]], dim=2)
        return keys, values
