"""Low-rank KV cache (Palu): cache a rank-r latent of each head's keys and values, rebuild at attention time."""

from dataclasses import dataclass, field

import torch
from torch import nn

from patches.gpt_neox import to_kvpress_order
from presses.errors import PressConfigError
from presses.reconstructed_layer import ReconstructedLayer, ReconstructingPress, dense_cache


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


def weight_spectrum(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, the left singular vectors (heads, rows, rows) of W and the energies sigma^2
    (heads, rows), float32, descending."""
    if weight.shape[1] == 0:
        empty = weight.new_zeros(weight.shape[0], 0, dtype=torch.float32)
        return empty.unsqueeze(-1), empty
    u, s, _ = torch.linalg.svd(weight.float(), full_matrices=False)
    return u, s**2


def output_spectrum(outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, the eigenvectors (heads, dim, dim) of X^T X for the projection's outputs X
    (heads, tokens, dim, bias removed) and its eigenvalues, float32, descending. Equal to the
    SVD of W whitened by the calibration inputs (SVD-LLM): the left singular vectors of W C^1/2,
    C = H^T H, are the eigenvectors of W C W^T = X^T X."""
    x = outputs.float()
    energy, vectors = torch.linalg.eigh(x.transpose(-1, -2) @ x)
    return vectors.flip(-1), energy.flip(-1).clamp(min=0)


def allocate_ranks(energies: list[torch.Tensor], budget: int) -> list[int]:
    """Ranks, one per matrix, summing to ``budget`` (clamped to what exists): the ``budget``
    largest gains, where the gain of a matrix's i-th direction is the share of each head's total
    energy its i-th energy carries, averaged over heads. Gains fall with i, so the chosen
    directions of each matrix are its leading ones."""
    gains = [(e / e.sum(-1, keepdim=True).clamp(min=1e-30)).mean(0).cpu() for e in energies]
    owner = torch.cat([torch.full((len(g),), index) for index, g in enumerate(gains)])
    chosen = owner[torch.cat(gains).argsort(descending=True, stable=True)[: max(budget, 0)]]
    return torch.bincount(chosen, minlength=len(gains)).tolist()


@dataclass
class LowRankPress(ReconstructingPress):
    """Palu (Chang et al. 2024, "Palu: Compressing KV-Cache with Low-Rank Projection",
    https://arxiv.org/abs/2407.21118), training-free, per-head decomposition (Palu's M-LRD).

    Rule: each KV head's key and value projection W (head_dim x hidden) gets a rank-r basis U_r;
    the cache stores the latent h W^T U_r = (x - b) U_r of every token (x the key or value, b
    the projection's bias) and attention gets U_r latent + b back. ``basis="activations"``
    (default; needs ``calibrate(model, ids)``): U_r from the SVD of W whitened by the hidden
    states of a calibration text (SVD-LLM's data whitening), i.e. the leading eigenvectors of
    X^T X for the projection's outputs X on that text; ``basis="weights"``: from the plain SVD of
    W (measured much worse: the hidden states are far from isotropic). RoPE acts after the
    projection, so only key dims RoPE leaves alone can be stored as a latent (on Pythia 75% of
    each head, the pass-through dims, equal before and after RoPE); rotary dims are kept in
    full, so on Llama (full rotary) only values are low-rank. Ranks per layer (one key and one
    value rank per layer, shared by its heads) are chosen globally: the directions carrying the
    largest share of their head's energy win until the cache bytes per token are
    ``1 - compression_ratio`` of dense (a Fisher-free stand-in for Palu's rank search). Ratio 0
    keeps full rank.

    After a layer's prefill its cache entry becomes a ``LowRankLayer`` that really holds only
    the latents (and the rotary key dims); decoded tokens are stored the same way. A token
    eviction press placed before it in a kvpress ``ComposedPress`` acts first on the full layer.
    """

    compression_ratio: float = 0.0
    basis: str = "activations"
    bases: list[HeadBasis] | None = field(default=None, init=False, repr=False)
    ranks: list[tuple[int, int]] | None = field(default=None, init=False, repr=False)  # (key, value) per layer
    _model: nn.Module | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.basis not in ("activations", "weights"):
            raise ValueError(f"basis must be 'activations' or 'weights', got {self.basis!r}")

    @torch.no_grad()
    def calibrate(self, model, ids: torch.Tensor | None) -> dict:
        """Fit the bases to a dense prefill of ``ids`` (1-D token ids; unused with
        basis="weights"); returns the ranks chosen, to be recorded with the results."""
        self.bases, self.ranks = self.build_bases(model, dense_cache(model, ids) if self.basis == "activations" else None)
        self._model = model
        return {"lowrank_ranks_key_value": self.ranks}

    def post_init_from_model(self, model):
        if self._model is model:
            return
        if self.basis == "activations":
            raise ValueError("LowRankPress(basis='activations') needs calibrate(model, ids) on a calibration text first")
        self.calibrate(model, None)  # SVDs once per model: weight preprocessing, not prefill work

    def build_bases(self, model, cache=None) -> tuple[list[HeadBasis], list[tuple[int, int]]]:
        layers = [layer.self_attn for layer in model.model.layers]
        head_dim = layers[0].head_dim
        inv_freq = model.model.rotary_emb.inv_freq
        # Rotary pairs (i, i + head_dim/2) with a nonzero frequency (the patch pads NeoX's with zeros).
        turned = torch.nonzero(inv_freq.cpu() != 0).flatten()
        rotary = torch.cat([turned, turned + head_dim // 2]).sort().values
        passthrough = torch.tensor([d for d in range(head_dim) if d not in set(rotary.tolist())], dtype=torch.long)
        unorder = torch.cat([rotary, passthrough]).argsort()

        parts = []
        for index, attention in enumerate(layers):
            key_w, key_b, value_w, value_b = key_value_projections(attention, head_dim)
            passing = passthrough.to(key_w.device)
            if cache is None:
                key, value = weight_spectrum(key_w[:, passing]), weight_spectrum(value_w)
            else:  # the cache's pass-through key dims are the projection's own output (no rotation)
                keys, values = cache.layers[index].keys[0], cache.layers[index].values[0]
                key = output_spectrum(keys[..., passing] - key_b[:, passing].unsqueeze(1))
                value = output_spectrum(values - value_b.unsqueeze(1))
            parts.append((key, key_b[:, passing].detach(), value, value_b.detach()))

        dense = 2 * head_dim * len(layers)  # stored dims per head and token, over all layers
        budget = round((1 - self.compression_ratio) * dense) - len(rotary) * len(layers)
        if budget < 0:
            raise PressConfigError(
                f"low-rank keeps the {len(rotary)} rotary key dims of {2 * head_dim} KV dims per head in full: "
                f"compression ratio must be below {1 - len(rotary) / (2 * head_dim):.3f}, got {self.compression_ratio}"
            )
        flat = allocate_ranks([energy for (_, key_e), _, (_, value_e), _ in parts for energy in (key_e, value_e)], budget)
        ranks = list(zip(flat[0::2], flat[1::2]))

        bases = []
        for ((key_u, _), key_b, (value_u, _), value_b), (key_rank, value_rank) in zip(parts, ranks):
            device = value_b.device
            bases.append(HeadBasis(
                rotary=rotary.to(device), passthrough=passthrough.to(device), unorder=unorder.to(device),
                key_basis=key_u[..., :key_rank].to(value_b.dtype), key_bias=key_b,
                value_basis=value_u[..., :value_rank].to(value_b.dtype), value_bias=value_b,
            ))
        return bases, ranks

    def stored_layer(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor):
        return LowRankLayer(self.bases[layer_idx], keys, values)
