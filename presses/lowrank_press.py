"""Low-rank KV cache (Palu): cache a rank-r latent of each head's keys and values, rebuild at attention time."""

from dataclasses import dataclass, field

import torch
from kvpress import BasePress
from kvpress.presses.base_press import is_prefilling
from torch import nn
from transformers import QuantizedCache

from patches.gpt_neox import to_kvpress_order
from presses.reconstructed_layer import ReconstructedLayer


@dataclass
class HeadBasis:
    """One layer's low-rank bases, per KV head. Key dims are those of the cache (the reordered
    basis on GPT-NeoX): ``rotary`` dims are stored in full, ``passthrough`` dims as a latent."""

    rotary: torch.Tensor  # (n_rot,) key dims that RoPE turns
    passthrough: torch.Tensor  # (n_pass,) key dims RoPE leaves alone
    unorder: torch.Tensor  # (head_dim,) puts cat([rotary, passthrough]) back in cache order
    key_basis: torch.Tensor  # (heads, n_pass, r_k) orthonormal columns
    key_bias: torch.Tensor  # (heads, n_pass)
    value_basis: torch.Tensor  # (heads, head_dim, r_v)
    value_bias: torch.Tensor  # (heads, head_dim)


def to_latent(x: torch.Tensor, bias: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    # (x - b) U == h W_down: the bias is removed so the latent is the projection's own output.
    return (x - bias.unsqueeze(1)) @ basis


def from_latent(latent: torch.Tensor, bias: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return latent @ basis.transpose(-1, -2) + bias.unsqueeze(1)


class LowRankLayer(ReconstructedLayer):
    """Holds keys as (rotary dims in full, latent of the pass-through dims) and values as a latent."""

    def __init__(self, basis: HeadBasis, keys: torch.Tensor, values: torch.Tensor):
        self.basis = basis
        super().__init__(keys, values)

    def encode_keys(self, keys):
        b = self.basis
        return keys.index_select(-1, b.rotary), to_latent(keys.index_select(-1, b.passthrough), b.key_bias, b.key_basis)

    def decode_keys(self, held):
        b = self.basis
        rotary, latent = held
        return torch.cat([rotary, from_latent(latent, b.key_bias, b.key_basis)], dim=-1).index_select(-1, b.unorder)

    def encode_values(self, values):
        return (to_latent(values, self.basis.value_bias, self.basis.value_basis),)

    def decode_values(self, held):
        return from_latent(held[0], self.basis.value_bias, self.basis.value_basis)


def key_value_projections(attention: nn.Module, head_dim: int):
    """Per KV head (heads, head_dim, hidden) key and value weights and (heads, head_dim) biases,
    key rows in the order the cache holds them (the patch's reordered basis on GPT-NeoX)."""
    if hasattr(attention, "query_key_value"):  # GPT-NeoX: fused, laid out per head as [q | k | v]
        fused = attention.query_key_value
        weight = fused.weight.view(-1, 3, head_dim, fused.in_features)
        bias = fused.bias.view(-1, 3, head_dim)
        order = to_kvpress_order(torch.arange(head_dim), attention.rotary_ndims).to(weight.device)
        return weight[:, 1, order], bias[:, 1, order], weight[:, 2], bias[:, 2]

    def split(projection):
        weight = projection.weight.view(-1, head_dim, projection.in_features)
        bias = projection.bias.view(-1, head_dim) if projection.bias is not None else weight.new_zeros(weight.shape[:2])
        return weight, bias

    return *split(attention.k_proj), *split(attention.v_proj)


def spectra(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors (heads, rows, rows) and singular values (heads, rows) per head, float32."""
    if weight.shape[1] == 0:
        return weight.new_zeros(weight.shape[0], 0, 0, dtype=torch.float32), weight.new_zeros(weight.shape[0], 0, dtype=torch.float32)
    u, s, _ = torch.linalg.svd(weight.float(), full_matrices=False)
    return u, s


def allocate_ranks(singular_values: list[torch.Tensor], budget: int) -> list[int]:
    """Ranks, one per matrix, summing to ``budget`` (clamped to what exists): the ``budget``
    largest gains, where the gain of the i-th direction of a matrix is the fraction of each
    head's squared Frobenius norm its i-th singular value carries, averaged over heads. Gains
    fall with i, so the chosen directions of each matrix are its leading ones."""
    gains = [(s**2 / (s**2).sum(-1, keepdim=True)).mean(0) for s in singular_values]
    owner = torch.cat([torch.full((len(g),), index) for index, g in enumerate(gains)])
    chosen = owner[torch.cat(gains).argsort(descending=True, stable=True)[: max(budget, 0)]]
    return torch.bincount(chosen, minlength=len(gains)).tolist()


@dataclass
class LowRankPress(BasePress):
    """Palu (Chang et al. 2024, "Palu: Compressing KV-Cache with Low-Rank Projection",
    https://arxiv.org/abs/2407.21118), training-free, per-head decomposition (Palu's M-LRD).

    Rule: each KV head's key and value projection weights W (head_dim x hidden) are split by
    SVD, W = U S V^T; the cache stores the rank-r latent h W^T U_r = (x - b) U_r of every token
    (x the key or value, b the projection's bias) and attention gets U_r latent + b back. RoPE
    acts after the projection, so only key dims that RoPE leaves alone can be stored as a latent
    (on Pythia 75% of each head, the pass-through dims; they are equal before and after RoPE);
    the rotary dims are kept in full, so on Llama (full rotary) only values are low-rank. Ranks
    per layer (one key and one value rank per layer, shared by its heads) are chosen globally:
    the directions with the largest share of their head's squared weight norm win until the
    cache bytes per token are ``1 - compression_ratio`` of dense (Palu's Fisher-free
    alternative: singular value energy instead of Fisher information). Ratio 0 keeps full rank.

    After a layer's prefill its cache entry becomes a ``LowRankLayer`` that really holds only
    the latents (and the rotary key dims); decoded tokens are stored the same way. A token
    eviction press placed before it in a kvpress ``ComposedPress`` acts first on the full layer.
    """

    compression_ratio: float = 0.0
    bases: list[HeadBasis] | None = field(default=None, init=False, repr=False)
    ranks: list[tuple[int, int]] | None = field(default=None, init=False, repr=False)  # (key, value) per layer
    _model: nn.Module | None = field(default=None, init=False, repr=False)

    def post_init_from_model(self, model):
        if self._model is not model:  # SVDs once per model: weight preprocessing, not prefill work
            self.bases, self.ranks = self.build_bases(model)
            self._model = model

    def build_bases(self, model) -> tuple[list[HeadBasis], list[tuple[int, int]]]:
        layers = [layer.self_attn for layer in model.model.layers]
        head_dim = layers[0].head_dim
        inv_freq = model.model.rotary_emb.inv_freq
        # Rotary pairs (i, i + head_dim/2) with a nonzero frequency (the patch pads NeoX's with zeros).
        turned = torch.nonzero(inv_freq.cpu() != 0).flatten()
        rotary = torch.cat([turned, turned + head_dim // 2]).sort().values
        passthrough = torch.tensor([d for d in range(head_dim) if d not in set(rotary.tolist())], dtype=torch.long)
        unorder = torch.cat([rotary, passthrough]).argsort()

        parts = []
        for attention in layers:
            key_w, key_b, value_w, value_b = key_value_projections(attention, head_dim)
            parts.append((spectra(key_w[:, passthrough.to(key_w.device)]), key_b, spectra(value_w), value_b))

        dense = 2 * head_dim * len(layers)  # stored dims per head and token, over all layers
        budget = round((1 - self.compression_ratio) * dense) - len(rotary) * len(layers)
        if budget < 0:
            from presses.registry import PressConfigError  # the registry imports this module

            raise PressConfigError(
                f"low-rank keeps the {len(rotary)} rotary key dims of {2 * head_dim} KV dims per head in full: "
                f"compression ratio must be below {1 - len(rotary) / (2 * head_dim):.3f}, got {self.compression_ratio}"
            )
        flat = allocate_ranks([s for (_, key_s), _, (_, value_s), _ in parts for s in (key_s, value_s)], budget)
        ranks = list(zip(flat[0::2], flat[1::2]))

        bases = []
        for ((key_u, _), key_b, (value_u, _), value_b), (key_rank, value_rank) in zip(parts, ranks):
            dtype, device = value_b.dtype, value_b.device
            bases.append(HeadBasis(
                rotary=rotary.to(device), passthrough=passthrough.to(device), unorder=unorder.to(device),
                key_basis=key_u[..., :key_rank].to(dtype), key_bias=key_b[:, passthrough.to(device)].detach(),
                value_basis=value_u[..., :value_rank].to(dtype), value_bias=value_b.detach(),
            ))
        return bases, ranks

    def forward_hook(self, module: nn.Module, input, kwargs: dict, output):
        cache = kwargs["past_key_values"]
        if not is_prefilling(kwargs["cache_position"], kwargs["hidden_states"].shape[1]):
            return output
        if isinstance(cache, QuantizedCache):
            raise ValueError("low-rank KV holds its own compressed form: use it without --kv_quant")
        layer = cache.layers[module.layer_idx]
        cache.layers[module.layer_idx] = LowRankLayer(self.bases[module.layer_idx], layer.keys, layer.values)
        return output
