"""A transformers cache layer that holds keys and values in a smaller form than attention uses.

Attention-level methods (low-rank KV, KV head merging) keep less per token than a dense cache:
a latent, or one key/value per group of heads. ``ReconstructedLayer`` replaces a DynamicLayer
in ``cache.layers`` after a layer's prefill. It stores only what ``encode_keys`` /
``encode_values`` return (tensors with the sequence at dim -2), stores new tokens in the same
form in ``update``, and gives attention full-width keys and values rebuilt by ``decode_*``.

``keys`` / ``values`` read as the rebuilt tensors and can be assigned full-width tensors,
which are encoded again: code written for DynamicLayer (kvpress presses placed after this one,
the pipeline's removal of answer tokens, ``crop``) keeps working. ``held_tensors()`` lists what
is really stored (decoding/kv_cache.py ``kv_bytes`` counts those).
"""

import torch
from kvpress import BasePress
from kvpress.presses.base_press import is_prefilling
from transformers import DynamicCache, QuantizedCache
from transformers.cache_utils import DynamicLayer


@torch.no_grad()
def dense_cache(model, ids: torch.Tensor) -> DynamicCache:
    """The dense cache of a calibration text (``ids`` 1-D), which these methods are fitted to."""
    cache = DynamicCache()
    model.model(input_ids=ids.view(1, -1).to(model.device), past_key_values=cache)
    return cache


class ReconstructedLayer(DynamicLayer):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()  # assigns keys/values None through the setters below
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.keys, self.values = keys, values

    # Subclasses: full (batch, heads, seq, head_dim) <-> tuple of stored tensors (seq at dim -2).
    def encode_keys(self, keys: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def decode_keys(self, held: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise NotImplementedError

    def encode_values(self, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def decode_values(self, held: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._held_keys is None else self.decode_keys(self._held_keys)

    @keys.setter
    def keys(self, keys: torch.Tensor | None) -> None:
        self._held_keys = None if keys is None else self.encode_keys(keys)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._held_values is None else self.decode_values(self._held_values)

    @values.setter
    def values(self, values: torch.Tensor | None) -> None:
        self._held_values = None if values is None else self.encode_values(values)

    def held_tensors(self) -> list[torch.Tensor]:
        return [*(self._held_keys or ()), *(self._held_values or ())]

    def update(self, key_states, value_states, cache_kwargs=None) -> tuple[torch.Tensor, torch.Tensor]:
        # New tokens are stored encoded; attention gets the whole rebuilt cache.
        self._held_keys = tuple(torch.cat(pair, dim=-2) for pair in zip(self._held_keys, self.encode_keys(key_states)))
        self._held_values = tuple(
            torch.cat(pair, dim=-2) for pair in zip(self._held_values, self.encode_values(value_states))
        )
        return self.keys, self.values

    def get_seq_length(self) -> int:
        # From the stored form: DynamicLayer's version would rebuild the keys to read a shape.
        return 0 if self._held_keys is None else self._held_keys[0].shape[-2]


class ReconstructingPress(BasePress):
    """A press that, after a layer's prefill, swaps the layer's cache entry for the smaller
    form ``stored_layer`` builds (subclasses: low-rank KV, KV head merging)."""

    def stored_layer(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> ReconstructedLayer:
        raise NotImplementedError

    def forward_hook(self, module, input, kwargs: dict, output):
        cache = kwargs["past_key_values"]
        if not is_prefilling(kwargs["cache_position"], kwargs["hidden_states"].shape[1]):
            return output
        if isinstance(cache, QuantizedCache):
            raise ValueError(f"{type(self).__name__} holds its own compressed form: use it without --kv_quant")
        layer = cache.layers[module.layer_idx]
        cache.layers[module.layer_idx] = self.stored_layer(module.layer_idx, layer.keys, layer.values)
        return output
