"""Uniform low-bit KV after prefill: the quantization baseline at a given number of bytes."""

from dataclasses import dataclass, field

import torch
from kvpress import BasePress
from torch import nn

from presses.errors import PressConfigError
from presses.quantize import (FP16_BYTES, channel_stats, quantize_per_channel, quantize_per_token,
                              quantized_head_bytes)


@dataclass
class QuantizedKVPress(BasePress):
    """Every cached token's key and value rounded to ``bits`` bits after prefill (simulated:
    presses/quantize.py), the newest ``recent_tokens`` kept in fp16. Values are quantized per
    token; keys per channel over groups of ``group_tokens`` tokens (``key_layout="channel"``,
    KIVI, Liu et al. 2024) or per token after centring and scaling each channel
    (``key_layout="token"``, presses/quantize.py); with ``rotate`` every per-token group (the values,
    per-token keys) is quantized after a fixed random rotation (QuaRot's, presses/quantize.py). It removes no token (``compression_ratio`` stays 0): composed
    after an eviction press it quantizes what that press kept. ``stored_bytes`` holds, per
    layer, the bytes one sequence's keys and values take in that form, scales included."""

    bits: int = 4
    key_layout: str = "channel"
    group_tokens: int = 32
    recent_tokens: int = 0
    rotate: bool = False
    compression_ratio: float = 0.0
    stored_bytes: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise PressConfigError(f"bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.key_layout not in ("channel", "token"):
            raise PressConfigError(f"key_layout must be 'channel' or 'token', got {self.key_layout!r}")
        if self.group_tokens < 1 or self.recent_tokens < 0:
            raise PressConfigError("group_tokens must be at least 1 and recent_tokens at least 0")

    def compress(self, module: nn.Module, hidden_states, keys: torch.Tensor, values: torch.Tensor, attentions, kwargs):
        batch, heads, tokens, head_dim = keys.shape
        old = max(tokens - self.recent_tokens, 0)
        if self.key_layout == "channel":
            quantized_keys = quantize_per_channel(keys[:, :, :old], self.bits, self.group_tokens)
        else:
            quantized_keys = quantize_per_token(keys[:, :, :old], self.bits, channel_stats(keys[:, :, :old]), self.rotate)
        quantized_values = quantize_per_token(values[:, :, :old], self.bits, rotate=self.rotate)
        recent_bytes = 2 * (tokens - old) * FP16_BYTES * head_dim
        self.stored_bytes[module.layer_idx] = heads * (
            quantized_head_bytes(old, self.bits, head_dim, self.key_layout, self.group_tokens) + recent_bytes)
        keys = torch.cat([quantized_keys, keys[:, :, old:]], dim=2)
        values = torch.cat([quantized_values, values[:, :, old:]], dim=2)
        return keys, values
