"""LM-Infinite on a KV cache: Λ-shaped attention kept by eviction, distance limit kept by re-rotation."""

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from kvpress import BasePress
from kvpress.presses.base_press import is_prefilling
from kvpress.utils import compute_n_kept
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half


def shift_keys(keys: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move RoPE keys (batch, heads, n, head_dim) by ``shift`` (n,) positions. Uses the model's
    rotary frequencies, so on GPT-NeoX (patched basis, pass-through dims at frequency 0) this is
    the partial rotary."""
    angle = shift[:, None].float() * inv_freq[None, :].float().to(keys.device)
    angle = torch.cat([angle, angle], dim=-1)
    rotated = keys.float() * angle.cos() + rotate_half(keys.float()) * angle.sin()
    return rotated.to(keys.dtype)


@dataclass
class LMInfinitePress(BasePress):
    """LM-Infinite (Han et al., 2023, "LM-Infinite: Zero-Shot Extreme Length Generalization for
    Large Language Models", arXiv:2308.16137). Rule: each query attends to the ``n_global`` first
    tokens and to a local window of the most recent tokens (the Λ-shaped mask; the paper's local
    branch is the pretraining length L), and no query sees a key farther than L
    (``distance_limit``): the official code scores a global token beyond the local window with the
    query rotated at distance L, i.e. the distance is min(d, L).

    On a KV cache: the cache holds exactly the Λ-mask's keys (first ``n_global`` + most recent
    ``target_size - n_global``), every key keeps its original position, and before each forward
    call every cached key is shown at position max(p, q_last - L), q_last being the call's last
    query position (the global keys are re-rotated there). With one query per call (decoding)
    this is the paper's rule exactly; with C queries per call, the query C-1-k places before the
    last sees a capped key at distance L-k: the limit L is never exceeded, but capped keys sit a
    little closer than the paper puts them, and the oldest local keys are up to window + C - 1
    tokens away (the paper's mask stops at L). The model's own attention inside one call is
    dense causal, so a single call longer than L (a long prefill) is not Λ-masked.

    Two forms. ``target_size`` set: the streaming press, holding each layer's cache at
    ``target_size`` tokens (evicting once ``compression_interval`` tokens beyond it arrived).
    ``target_size`` None: the prefill press, compressing once after prefill by
    ``compression_ratio`` (first ``n_global`` + most recent tokens, like StreamingLLM without
    re-rotation) and capping distances for the next token; later tokens see the capped keys at
    L + 1, L + 2, ... since the press is gone. ``distance_limit`` None takes the model's
    ``max_position_embeddings`` (2048 for Pythia).
    """

    compression_ratio: float = 0.0
    n_global: int = 4
    distance_limit: int | None = None
    target_size: int | None = None
    compression_interval: int = 1
    _limit: int = field(default=0, init=False, repr=False)
    _true: dict = field(default_factory=dict, init=False, repr=False)  # layer -> positions of cached tokens
    _shown: dict = field(default_factory=dict, init=False, repr=False)  # layer -> positions keys are rotated to
    _global_keys: dict = field(default_factory=dict, init=False, repr=False)  # layer -> global keys as first cached

    def __post_init__(self):
        if not 0.0 <= self.compression_ratio < 1.0:
            raise ValueError(f"compression ratio must be in [0, 1), got {self.compression_ratio}")
        if self.target_size is not None and self.target_size <= self.n_global:
            raise ValueError(f"budget {self.target_size} must exceed n_global={self.n_global}")

    def post_init_from_model(self, model):
        self._limit = self.distance_limit or model.config.max_position_embeddings

    def keep_indices(self, k_len: int, n_kept: int, device) -> torch.Tensor:
        """The Λ-mask's keys: the first n_global and the most recent n_kept - n_global."""
        n_global = min(self.n_global, n_kept)
        return torch.cat([torch.arange(n_global), torch.arange(k_len - n_kept + n_global, k_len)]).to(device)

    def cap_distances(self, module: nn.Module, cache_layer, last_query: int):
        """Rotate every cached key to position max(p, last_query - L). The global keys are rotated
        from their first cached copy, so moving them at every step does not accumulate rounding
        (in float16, 2048 shifts of one position would leave the slow rotary dims unturned)."""
        layer, inv_freq, keys = module.layer_idx, module.rotary_emb.inv_freq, cache_layer.keys
        true, shown = self._true[layer], torch.clamp(self._true[layer], min=last_query - self._limit)
        moved = shown != self._shown[layer]
        original = self._global_keys.get(layer)
        n_global = original.shape[2] if original is not None else 0
        if n_global and moved[:n_global].any():
            keys[:, :, :n_global] = shift_keys(original, shown[:n_global] - true[:n_global], inv_freq)
        local = moved[n_global:].nonzero().squeeze(-1) + n_global  # only when window + C - 1 > L
        if local.numel():
            keys[:, :, local] = shift_keys(keys[:, :, local], shown[local] - self._shown[layer][local], inv_freq)
        self._shown[layer] = shown

    def forward_pre_hook(self, module: nn.Module, args, kwargs: dict):
        if module.layer_idx in self._true and self._true[module.layer_idx].numel():
            cache_layer = kwargs["past_key_values"].layers[module.layer_idx]
            self.cap_distances(module, cache_layer, int(self._query_positions(kwargs)[-1]))

    def forward_hook(self, module: nn.Module, input, kwargs: dict, output):
        layer = module.layer_idx
        cache_layer = kwargs["past_key_values"].layers[layer]
        positions = self._query_positions(kwargs).to(cache_layer.keys.device)
        k_len = cache_layer.keys.shape[2]
        if self.target_size is None:  # prefill form: compress once
            if self.compression_ratio == 0 or not is_prefilling(kwargs["cache_position"], positions.numel()):
                return output
            self._true[layer] = self._shown[layer] = positions
            n_kept = compute_n_kept(k_len, self.compression_ratio)
            self._evict(layer, cache_layer, self.keep_indices(k_len, n_kept, positions.device))
            self.cap_distances(module, cache_layer, int(positions[-1]) + 1)  # for the next token
            return output

        previous = self._true.get(layer, positions[:0])
        self._true[layer] = torch.cat([previous, positions])
        self._shown[layer] = torch.cat([self._shown.get(layer, positions[:0]), positions])
        if previous.numel() < self.n_global:  # global tokens still arriving: not moved yet
            self._global_keys[layer] = cache_layer.keys[:, :, : self.n_global].clone()
        if k_len >= self.target_size + self.compression_interval:
            self._evict(layer, cache_layer, self.keep_indices(k_len, self.target_size, positions.device))
        return output

    def _evict(self, layer: int, cache_layer, indices: torch.Tensor):
        cache_layer.keys = cache_layer.keys.index_select(2, indices).contiguous()
        cache_layer.values = cache_layer.values.index_select(2, indices).contiguous()
        self._true[layer] = self._true[layer][indices]
        self._shown[layer] = self._shown[layer][indices]

    @staticmethod
    def _query_positions(kwargs: dict) -> torch.Tensor:
        position_ids = kwargs.get("position_ids")
        return (position_ids[0] if position_ids is not None else kwargs["cache_position"]).long()

    def reset(self):
        self._true, self._shown, self._global_keys = {}, {}, {}

    @contextmanager
    def __call__(self, model):
        hooks = [
            layer.self_attn.register_forward_pre_hook(self.forward_pre_hook, with_kwargs=True)
            for layer in model.model.layers
        ]
        try:
            with super().__call__(model):
                yield
        finally:
            for hook in hooks:
                hook.remove()
            self.reset()
