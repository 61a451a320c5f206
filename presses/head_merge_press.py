"""KV head merging: MQA/GQA made from a trained multi-head model without uptraining."""

from dataclasses import dataclass, field

import torch
from torch import nn

from presses.reconstructed_layer import ReconstructedLayer, ReconstructingPress, dense_cache


class MergedHeadsLayer(ReconstructedLayer):
    """Holds one key and one value per group of KV heads (the mean of its members); attention
    gets every head its group's key and value."""

    def __init__(self, group_of: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        self.group_of = group_of.to(keys.device)  # (kv_heads,) head -> group
        self.members = torch.bincount(self.group_of).to(keys.dtype)  # heads per group
        super().__init__(keys, values)

    def merge(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        shape = (x.shape[0], len(self.members), *x.shape[2:])
        summed = x.new_zeros(shape).index_add_(1, self.group_of, x)
        return (summed / self.members.view(-1, 1, 1),)

    def expand(self, held: tuple[torch.Tensor]) -> torch.Tensor:
        return held[0].index_select(1, self.group_of)

    encode_keys = encode_values = merge
    decode_keys = decode_values = expand


def head_similarity(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(heads, heads) mean over tokens of the cosine similarity between two heads' keys, averaged
    with the same for values. RoPE turns every head's key at a token by the same rotation, so
    the cosine between heads is the same before and after it."""
    def cosine(x):  # x: (heads, tokens, dim)
        unit = nn.functional.normalize(x.float(), dim=-1)
        return torch.einsum("hnd,gnd->hg", unit, unit) / x.shape[1]

    return (cosine(keys[0]) + cosine(values[0])) / 2


def merge_heads(similarities: list[torch.Tensor], n_groups: int) -> list[torch.Tensor]:
    """Agglomerative clustering of the heads of every layer at once (average linkage): merge the
    most similar pair of groups in any layer until ``n_groups`` groups are left over all layers
    (at least one per layer). Returns, per layer, each head's group index."""
    groups = [[[head] for head in range(len(s))] for s in similarities]

    def best_pair(layer):
        members = groups[layer]
        if len(members) < 2:
            return None
        weights = torch.zeros(len(members), len(similarities[layer]))
        for index, heads in enumerate(members):
            weights[index, heads] = 1 / len(heads)
        link = (weights @ similarities[layer] @ weights.T).triu(1)  # mean similarity between two groups
        link[torch.ones_like(link, dtype=torch.bool).tril()] = -float("inf")
        i, j = divmod(link.argmax().item(), len(members))
        return link[i, j].item(), i, j

    best = [best_pair(layer) for layer in range(len(groups))]
    for _ in range(sum(map(len, groups)) - max(n_groups, len(groups))):
        layer = max((pair[0], layer) for layer, pair in enumerate(best) if pair is not None)[1]
        _, i, j = best[layer]
        groups[layer][i] += groups[layer].pop(j)
        best[layer] = best_pair(layer)

    assignment = []
    for members in groups:
        group_of = torch.empty(sum(map(len, members)), dtype=torch.long)
        for index, heads in enumerate(members):
            group_of[heads] = index
        assignment.append(group_of)
    return assignment


@dataclass
class HeadMergePress(ReconstructingPress):
    """KV head merging, training-free (the GQA of Ainslie et al. 2023, "GQA: Training Generalized
    Multi-Query Transformer Models from Multi-Head Checkpoints", https://arxiv.org/abs/2305.13245,
    mean-pools heads and then uptrains; here nothing is trained).

    Rule: on a calibration text (``calibrate``), every layer's KV heads are compared by the mean
    cosine similarity of their keys and of their values over the text's tokens, and groups are
    formed by average-linkage clustering over all layers at once, most similar pair first,
    until ``1 - compression_ratio`` of the model's KV heads remain as groups (so redundant
    layers merge more). After a layer's prefill its cache holds, per group, the mean of the
    members' keys and the mean of their values (keys after RoPE: every head is rotated alike,
    so the mean of rotated keys is the rotated mean); each head attends with its group's.
    On a GQA model (Llama, SmolLM2) the KV heads are merged, the query heads left alone.
    Ratio 0 leaves every head its own group (dense exactly). Heads of a group must hold the
    same tokens, so a per-head eviction press (SnapKV) cannot be composed with it.
    """

    compression_ratio: float = 0.0
    groups: list[torch.Tensor] | None = field(default=None, init=False, repr=False)  # per layer: head -> group

    def calibrate(self, model, ids: torch.Tensor) -> dict:
        """Group the heads of every layer from a dense prefill of ``ids`` (a 1-D token tensor);
        returns the number of groups per layer, to be recorded with the results."""
        similarities = [head_similarity(layer.keys, layer.values).cpu() for layer in dense_cache(model, ids).layers]
        total_heads = sum(len(s) for s in similarities)
        self.groups = merge_heads(similarities, round((1 - self.compression_ratio) * total_heads))
        return {"head_groups_per_layer": [len(group_of.unique()) for group_of in self.groups]}

    def post_init_from_model(self, model):
        if self.groups is None:
            raise ValueError("HeadMergePress needs calibrate(model, ids) on a calibration text first")

    def stored_layer(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor):
        return MergedHeadsLayer(self.groups[layer_idx], keys, values)
