"""Cache layers that hold less than one full layer, for the cross-layer methods.

transformers' DynamicCache keeps one ``DynamicLayer`` per model layer in ``cache.layers``; the
model only calls a layer's ``update()`` (append the new tokens, return the keys and values to
attend to) and reads its length. The two classes here answer the same calls from shared storage:

- ``SharedLayer`` (KVSharer): layer j reads layer i's cache and stores nothing.
- ``MergedLayer`` (MiniCache): layers l and l+1 are views on one ``MergedPair``: one merged
  direction per token for both layers, each layer's own magnitudes and the tokens that would not
  merge well, kept exactly; keys and values are rebuilt when attention asks for them.

``held_tensors()`` lists what a layer really holds; ``decoding.kv_cache.kv_bytes`` counts each
tensor once, so storage shared by two layers is not counted twice.
"""

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer


class SourceFeed:
    """What layer i's attention used in the current forward pass, recorded by KVSharerPress's
    hook on layer i before any press composed after it shortens layer i's cache, for the layers
    that share i's cache. Emptied by the last of them, so it holds nothing between forward
    passes; empty when the press is not active (decoding after a pressed prefill)."""

    def __init__(self):
        self.keys = self.values = None

    def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def take(self, release: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        recorded = None if self.keys is None else (self.keys, self.values)
        if release:
            self.keys = self.values = None
        return recorded


class SharedLayer(DynamicLayer):
    """Layer j's cache entry when j reuses layer i's cache (i < j): ``update`` ignores j's own new
    keys/values and returns what layer i's attention used in this same forward pass (layer i
    runs first, so the current tokens are included). It stores nothing.

    A per-layer press composed after KVSharerPress (kvpress ComposedPress) also runs on layer j
    and writes a shortened cache there; those writes are dropped on purpose: j has no cache of its
    own, and the press already shortened layer i's, which is what j reads from then on."""

    def __init__(self, source: DynamicLayer, feed: SourceFeed, last_reader: bool):
        self.source, self.feed, self.last_reader = source, feed, last_reader
        self.is_initialized = True

    keys = property(lambda self: self.source.keys, lambda self, value: None)
    values = property(lambda self: self.source.values, lambda self, value: None)

    def update(self, key_states, value_states, cache_kwargs=None):
        # Without the press's hooks (decoding after prefill) layer i's cache already holds the
        # current tokens: i's update ran earlier in this forward pass.
        return self.feed.take(release=self.last_reader) or (self.source.keys, self.source.values)

    def get_seq_length(self) -> int:
        return self.source.get_seq_length()

    def held_tensors(self) -> list[torch.Tensor]:
        return []


@dataclass
class MergedTensor:
    """Keys (or values) of two layers a, b held as one direction per token plus what differs.

    ``direction`` (batch, heads, tokens, dim): unit vectors shared by both layers;
    ``magnitudes[k]`` (batch, heads, tokens, 1): layer k's vector norms;
    ``retained_index`` (batch, heads, r): per head, the tokens kept exactly, whose vectors for
    layer k are ``retained[k]`` (batch, heads, r, dim)."""

    direction: torch.Tensor
    magnitudes: tuple[torch.Tensor, torch.Tensor]
    retained_index: torch.Tensor
    retained: tuple[torch.Tensor, torch.Tensor]

    def restore(self, which: int) -> torch.Tensor:
        restored = self.direction * self.magnitudes[which]
        index = self.retained_index.unsqueeze(-1).expand(-1, -1, -1, restored.shape[-1])
        return restored.scatter_(2, index, self.retained[which])

    def tensors(self) -> list[torch.Tensor]:
        return [self.direction, *self.magnitudes, self.retained_index, *self.retained]


@dataclass
class MergedPair:
    keys: MergedTensor
    values: MergedTensor


class MergedLayer(DynamicLayer):
    """One layer of a merged pair (``which`` 0: the lower layer, 1: the upper). Its keys/values
    are the pair's merged part restored with this layer's magnitudes and retained tokens,
    followed by the tokens that arrived after the merge (decode steps), kept unmerged here."""

    def __init__(self, pair: MergedPair, which: int):
        self.pair, self.which = pair, which
        direction = pair.keys.direction
        self.tail_keys = direction.new_empty(*direction.shape[:2], 0, direction.shape[-1])
        self.tail_values = pair.values.direction.new_empty(*direction.shape[:2], 0, pair.values.direction.shape[-1])
        self.dtype, self.device, self.is_initialized = direction.dtype, direction.device, True

    def _cannot_write(self, value):
        if value is not None:
            raise RuntimeError("this layer's cache is merged with its neighbour's (MiniCache): put per-layer "
                               "presses before MiniCachePress in a ComposedPress")

    keys = property(lambda self: torch.cat([self.pair.keys.restore(self.which), self.tail_keys], dim=2),
                    _cannot_write)
    values = property(lambda self: torch.cat([self.pair.values.restore(self.which), self.tail_values], dim=2),
                      _cannot_write)

    def update(self, key_states, value_states, cache_kwargs=None):
        self.tail_keys = torch.cat([self.tail_keys, key_states], dim=2)
        self.tail_values = torch.cat([self.tail_values, value_states], dim=2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.pair.keys.direction.shape[2] + self.tail_keys.shape[2]

    def held_tensors(self) -> list[torch.Tensor]:
        return self.pair.keys.tensors() + self.pair.values.tensors() + [self.tail_keys, self.tail_values]
