"""MiniCache: cross-layer KV merging (Liu et al. 2024, "MiniCache: KV Cache Compression in Depth
Dimension for Large Language Models", NeurIPS 2024), training-free."""

import math
from dataclasses import dataclass, field

import torch
from kvpress import BasePress
from kvpress.presses.base_press import is_prefilling

from presses.cross_layer_cache import MergedLayer, MergedPair, MergedTensor


def merge(a: torch.Tensor, b: torch.Tensor, t: float, gamma: float) -> MergedTensor:
    """Merge two layers' keys (or values) a, b (batch, heads, tokens, dim), token by token.

    Each vector is split into magnitude and direction; the two directions are interpolated on
    the sphere (SLERP at ``t``: 0 gives a's direction, 1 gives b's) and each layer keeps its own
    magnitude. Per head, the tokens whose angular distance d = arccos(cos)/pi between a and b lies
    in the top ``gamma`` of that head's range [d_min, d_max] are retained exactly (gamma 0: none,
    1: all); every head keeps the same number r of tokens (the most any head needs), so a head may
    keep a few more than its threshold asks. Computed in float32, stored in the input dtype."""
    a32, b32 = a.float(), b.float()
    norm_a, norm_b = a32.norm(dim=-1, keepdim=True), b32.norm(dim=-1, keepdim=True)
    unit_a, unit_b = a32 / norm_a.clamp_min(1e-12), b32 / norm_b.clamp_min(1e-12)
    cosine = (unit_a * unit_b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = cosine.acos()
    sin_omega = omega.sin()
    parallel = sin_omega < 1e-6  # SLERP's limit there is plain interpolation
    safe_sin = torch.where(parallel, torch.ones_like(sin_omega), sin_omega)
    weight_a = torch.where(parallel, torch.full_like(omega, 1 - t), ((1 - t) * omega).sin() / safe_sin)
    weight_b = torch.where(parallel, torch.full_like(omega, t), (t * omega).sin() / safe_sin)
    direction = weight_a * unit_a + weight_b * unit_b
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    distance = omega.squeeze(-1) / math.pi  # (batch, heads, tokens)
    low, high = distance.amin(-1, keepdim=True), distance.amax(-1, keepdim=True)
    retain = distance >= high - gamma * (high - low) if gamma > 0 else torch.zeros_like(distance, dtype=torch.bool)
    count = int(retain.sum(-1).max())
    index = distance.topk(count, dim=-1).indices  # the count most distant tokens of each head
    gather = index.unsqueeze(-1).expand(-1, -1, -1, a.shape[-1])
    return MergedTensor(direction.to(a.dtype), (norm_a.to(a.dtype), norm_b.to(b.dtype)), index,
                        (a.gather(2, gather), b.gather(2, gather)))


@dataclass
class MiniCachePress(BasePress):
    """MiniCache (Liu et al. 2024): from a start layer on, merge the KV caches of adjacent layer
    pairs (l, l+1). After layer l+1's attention at prefill, each token's key (and value) in the
    two layers is split into magnitude and direction; one direction per token is stored, the
    SLERP of the two at ``t``, and each layer keeps its own magnitudes; tokens whose two
    directions are too far apart (angular distance in the top ``gamma`` of the head's range:
    the paper's token retention) are kept exactly for both layers. At attention time each layer
    is restored as direction x its own magnitude, retained tokens overwritten. Keys are cached
    after RoPE; both layers of a pair rotate token k by the same position, so merging them
    slot by slot is position-consistent. Tokens decoded after the merge are appended unmerged
    to each layer (this package's choice; the merge happens once, after prefill).

    ``compression_ratio`` (fraction of the KV removed, ignoring magnitudes and retained tokens)
    sets the number of merged pairs, p = round(ratio x layers), taken from the top: layers
    L-2p .. L-1 are merged. 0.25 starts at the middle layer (the paper's setting); at most 0.5
    (every layer merged). The bytes really held are what ``decoding.kv_cache.kv_bytes`` counts.

    Composition: the two layers of a pair must hold the same tokens in the same slots, so
    per-layer presses that keep the same tokens in every layer (StreamingLLM) compose, before
    this press in a ComposedPress; per-layer scorers (SnapKV) choose different tokens per layer
    and do not."""

    compression_ratio: float = 0.0
    t: float = 0.5
    gamma: float = 0.05
    merged_layers: list[int] = field(default_factory=list, init=False)

    def __post_init__(self):
        if not 0.0 <= self.compression_ratio <= 0.5:
            raise ValueError(f"MiniCache removes at most half the cache (every layer merged): ratio "
                             f"{self.compression_ratio} is outside [0, 0.5]")
        if not (0.0 <= self.t <= 1.0 and 0.0 <= self.gamma <= 1.0):
            raise ValueError(f"t and gamma must lie in [0, 1], got t={self.t}, gamma={self.gamma}")

    def post_init_from_model(self, model):
        layers = len(model.model.layers)
        pairs = int(self.compression_ratio * layers + 0.5)
        self.merged_layers = list(range(layers - 2 * pairs, layers))

    def forward_hook(self, module, input, kwargs, output):
        index = module.layer_idx
        upper_of_pair = index in self.merged_layers and (index - self.merged_layers[0]) % 2 == 1
        if not upper_of_pair or not is_prefilling(kwargs["cache_position"], kwargs["hidden_states"].shape[1]):
            return output
        cache = kwargs["past_key_values"]
        lower, upper = cache.layers[index - 1], cache.layers[index]
        if lower.keys.shape != upper.keys.shape:
            raise RuntimeError(f"layers {index - 1} and {index} hold {lower.keys.shape[2]} and {upper.keys.shape[2]} "
                               "tokens: MiniCache merges slot by slot; put per-layer presses that keep the same "
                               "tokens in every layer before MiniCachePress in a ComposedPress")
        pair = MergedPair(merge(lower.keys, upper.keys, self.t, self.gamma),
                          merge(lower.values, upper.values, self.t, self.gamma))
        cache.layers[index - 1], cache.layers[index] = MergedLayer(pair, 0), MergedLayer(pair, 1)
        return output
