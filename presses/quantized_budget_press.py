"""Uniform low-bit KV while text streams in: any eviction rule holding as many tokens as a byte
budget pays for, every token past a recent window quantized once (the streaming baselines of
evaluation/equal_bytes_streaming.py)."""

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from presses.budget_press import BudgetPress, Keeps, Observes
from presses.errors import PressConfigError
from presses.quantize import FP16_BYTES, GROUP_SIDE_BYTES, token_bytes
from presses.stored_kv import FP16_WIDTH, StoredLayer, narrowed


@dataclass
class QuantizedBudgetPress(BudgetPress):
    """``base_press``'s eviction rule (as in BudgetPress) with the cache stored at ``bits`` bits:
    after a layer's attention, every token older than the newest ``recent_tokens`` that is still
    in fp16 is quantized, once (presses/stored_kv.py): values per token; keys in KIVI's
    per-channel groups of ``group_tokens`` (``key_layout="channel"``: only whole groups form,
    the rest waits in fp16 as KIVI's residual) or per token after channel statistics
    (``"token"``). Then, while the store takes more than ``budget_tokens`` tokens' fp16 keys and
    values, the rule keeps the most tokens the bytes pay for: as many as a store of fp16 recent
    tokens and quantized others would hold, fewer while the store as it falls (partial groups,
    the residual) still takes more. ``target_size`` follows that count; ``stored_bytes`` holds
    each layer's bytes after the last call. Positions are the tokens' places in the text, also
    for rules that count them in the cache in fp16 (StreamingLLM, TreeKV): each layer holds the
    tokens its own store pays for, and stored keys are never re-rotated."""

    bits: int = 4
    key_layout: str = "channel"
    group_tokens: int = 32
    recent_tokens: int = 32  # the newest tokens, held in fp16 (KIVI's full-precision window)
    budget_tokens: int = 512
    stored_bytes: dict = field(default_factory=dict, repr=False)
    layers: dict = field(default_factory=dict, init=False, repr=False)  # layer -> StoredLayer

    def __post_init__(self):
        super().__post_init__()
        if self.positions_in_cache:  # the layers' token counts differ (each its own groups), and stored keys stay as stored
            raise PressConfigError("QuantizedBudgetPress gives tokens their places in the text: positions_in_cache "
                                   "is not supported")
        if self.bits not in (2, 3, 4, 8):
            raise PressConfigError(f"bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.key_layout not in ("channel", "token"):
            raise PressConfigError(f"key_layout must be 'channel' or 'token', got {self.key_layout!r}")
        if self.group_tokens < 1 or self.recent_tokens < 0 or self.budget_tokens <= self.recent_tokens:
            raise PressConfigError(f"group_tokens {self.group_tokens} must be at least 1 and recent_tokens "
                                   f"{self.recent_tokens} at least 0 and below budget_tokens {self.budget_tokens}")

    def reset(self):
        super().reset()
        self.layers.clear()
        self.stored_bytes.clear()

    def forward_hook(self, module: nn.Module, input, kwargs: dict, output):
        hidden_states = kwargs["hidden_states"]
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        keys, values = layer.keys, layer.values
        heads, tokens, head_dim = keys.shape[1:]
        if isinstance(self.base_press, Observes):
            self.base_press.observe(module, hidden_states, keys, values, kwargs)
        state = self.layers.setdefault(module.layer_idx, StoredLayer.empty(heads, keys.device))
        state.grow(tokens)
        keys, values, state = self._quantize_old(keys, values, state)
        budget = self.budget_tokens * heads * 2 * FP16_BYTES * head_dim
        # a scorer that reads the call's last window of queries cannot score a shorter call: evict at the next
        if state.nbytes(head_dim) > budget and hidden_states.shape[1] > getattr(self.base_press, "window_size", 0):
            pair = quantized_pair_bytes(self.bits, head_dim, self.key_layout, self.group_tokens)
            fp16_pair = 2 * FP16_BYTES * head_dim  # first guess: recent tokens in fp16, the rest in whole groups
            self.target_size = min(tokens - 1, self.recent_tokens + int(
                (budget / heads - self.recent_tokens * fp16_pair) // pair))
            while True:
                indices = self.keep_indices(module, hidden_states, keys, values, output[1], kwargs)
                held = state.kept(indices[0]).nbytes(head_dim)
                if held <= budget:
                    break
                self.target_size -= max(1, math.ceil((held - budget) / (heads * pair)))
            if isinstance(self.base_press, Keeps):
                self.base_press.keep(module, indices)
            gather_index = indices.unsqueeze(-1).expand(-1, -1, -1, head_dim)
            keys, values = keys.gather(2, gather_index), values.gather(2, gather_index)
            state = state.kept(indices[0])
        layer.keys, layer.values = keys.contiguous(), values.contiguous()
        self.layers[module.layer_idx] = state
        self.stored_bytes[module.layer_idx] = state.nbytes(head_dim)
        return output

    def _quantize_old(self, keys, values, state: StoredLayer):
        """Every fp16 token older than the newest ``recent_tokens`` quantized (in KIVI's layout,
        per head the oldest whole groups of them)."""
        tokens = keys.shape[2]
        waiting = (state.key_bits == FP16_WIDTH) & (torch.arange(tokens, device=keys.device) < tokens - self.recent_tokens)
        if self.key_layout == "channel":
            whole = waiting.sum(1, keepdim=True) // self.group_tokens * self.group_tokens
            waiting &= waiting.cumsum(1) <= whole
        if not bool(waiting.any()):
            return keys, values, state
        bits = state.key_bits.masked_fill(waiting, self.bits)
        return narrowed(keys, values, state, bits, bits, self.key_layout, self.group_tokens)



def quantized_pair_bytes(bits: int, head_dim: int, key_layout: str, group_tokens: int) -> float:
    """Bytes of one (token, head)'s key and value at ``bits``: the value per token; the key its
    share of a whole per-channel group, or per token (the channel statistics apart)."""
    key_side = head_dim * GROUP_SIDE_BYTES / group_tokens if key_layout == "channel" else GROUP_SIDE_BYTES
    return head_dim * bits / 8 + key_side + token_bytes(bits, head_dim)
