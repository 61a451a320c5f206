"""TreeKV: a cache that thins out smoothly with age, by cyclic pairwise eviction."""

import functools
from dataclasses import dataclass, field

import torch
from kvpress import ScorerPress
from kvpress.utils import compute_n_kept
from torch import nn
from torch.nn import functional as F

from presses.attention import current_attention


@functools.lru_cache(maxsize=64)
def tree_groups(slots: int, arrivals: int, pointer: int) -> tuple[tuple[int, ...], int]:
    """Group of each of ``slots + arrivals`` consecutive tokens after TreeKV's evictions, and the
    pointer after them. Each arrival is appended as a new slot, then slots ``pointer`` and
    ``pointer + 1`` merge (one of the pair is evicted) and the pointer moves one slot right,
    cycling over ``slots``. Which slots merge does not depend on the scores, only who survives."""
    starts, pointer = list(range(slots)), pointer % slots
    for arrival in range(arrivals):
        starts.append(slots + arrival)
        del starts[pointer + 1]
        pointer = (pointer + 1) % slots
    groups = torch.searchsorted(torch.tensor(starts), torch.arange(slots + arrivals), right=True) - 1
    return tuple(groups.tolist()), pointer


def _group_argmax(scores: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Index (..., n_groups) of the highest score in each group; ties go to the later token, as
    in pairwise eviction where the left token is evicted unless it scores strictly higher."""
    index = groups.expand_as(scores)
    best = scores.new_full((*scores.shape[:-1], n_groups), float("-inf")).scatter_reduce(-1, index, scores, "amax")
    position = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)
    candidate = torch.where(scores == best.gather(-1, index), position, -1)
    return candidate.new_full(best.shape, -1).scatter_reduce(-1, index, candidate, "amax")


@dataclass
class TreeKVPress(ScorerPress):
    """TreeKV (He et al., 2025, "TreeKV: Smooth Key-Value Cache Compression with Tree
    Structures", arXiv:2501.04987, IJCAI 2025). Rule (Algorithm 1): every token carries its
    average attention (attention received, summed over the queries since it arrived, divided by
    their number); when a token arrives in a full cache, the pair at the eviction scope
    {idx, idx + 1} is compared, the lower average is evicted (the left one on ties), and idx moves
    one slot right, cycling. Old slots are merged again on every sweep, so retention is dense for
    recent tokens and sparser with age, like the levels of a tree. The cache is laid out as in the
    paper's language-modelling runs (1024 = 4 sinks + 508 recent + 512 tree): ``n_sink`` first
    tokens and the most recent tokens are kept, and tokens leaving the recent window arrive in a
    tree of ``tree_fraction`` of the budget (``n_sink=0, tree_fraction=1`` is Algorithm 1 over the
    whole cache). Positions are reassigned in cache order (register with ``positions_in_cache``).

    Streaming (through ``BudgetPress``, which calls ``observe``/``keep``): averages accumulate
    from the attention of every forward call; with one token per call this is Algorithm 1, with C
    tokens per call the C evictions of a call use the averages at the end of the call. Prefill
    (compress once): the averages come from the last ``window`` queries (the paper scores prefill
    blocks with the last block as observation window) and the evictions are those of the tokens
    arriving one by one in a cache of the kept size, starting from an empty one; the paper works
    on blocks of tokens there, this works on single tokens. ``score`` returns 1 for the tokens the
    tree keeps and 0 for the others.
    """

    compression_ratio: float = 0.0
    n_sink: int = 4
    tree_fraction: float = 0.5
    window: int = 64
    _sum: dict = field(default_factory=dict, init=False, repr=False)  # layer -> (batch, kv_heads, k_len)
    _count: dict = field(default_factory=dict, init=False, repr=False)  # layer -> queries each token saw
    _pointer: dict = field(default_factory=dict, init=False, repr=False)  # layer -> eviction scope

    @staticmethod
    def attention_received(module: nn.Module, hidden_states, keys, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention each key received from these queries, summed over them and averaged over the
        query heads sharing it (batch, kv_heads, k_len), and how many of the queries see it."""
        weights = current_attention(module, hidden_states, keys, kwargs).sum(dim=2)
        batch, kv_heads, k_len = keys.shape[:3]
        received = weights.view(batch, kv_heads, -1, k_len).mean(dim=2)
        q_len = hidden_states.shape[1]
        seen_by = (torch.arange(k_len, device=keys.device) - (k_len - q_len)).clamp(min=0)
        return received, (q_len - seen_by).float().expand_as(received)

    def layout(self, n_kept: int) -> tuple[int, int, int]:
        """Sinks, tree slots and recent tokens in a cache of n_kept."""
        sinks = min(self.n_sink, n_kept)
        tree = min(int(n_kept * self.tree_fraction), n_kept - sinks)
        return sinks, tree, n_kept - sinks - tree

    def observe(self, module, hidden_states, keys, values, kwargs):
        layer = module.layer_idx
        received, count = self.attention_received(module, hidden_states, keys, kwargs)
        for state, new in ((self._sum, received), (self._count, count)):
            previous = state.get(layer, new[..., :0])
            state[layer] = F.pad(previous, (0, new.shape[-1] - previous.shape[-1])) + new

    def keep(self, module, indices):
        layer = module.layer_idx
        arrivals = self._sum[layer].shape[-1] - indices.shape[-1]
        _, tree, _ = self.layout(indices.shape[-1])
        self._pointer[layer] = (self._pointer.get(layer, 0) + arrivals) % max(tree, 1)
        self._sum[layer] = self._sum[layer].gather(-1, indices)
        self._count[layer] = self._count[layer].gather(-1, indices)

    def reset(self):
        self._sum, self._count, self._pointer = {}, {}, {}

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        layer, k_len = module.layer_idx, keys.shape[2]
        if layer in self._sum:  # streaming: averages observed since each token arrived
            average = self._sum[layer] / self._count[layer]
        else:  # prefill: averages over the last `window` queries
            window = min(self.window, hidden_states.shape[1])
            cos, sin = kwargs["position_embeddings"]
            last = {"position_embeddings": (cos[:, -window:], sin[:, -window:])}
            received, count = self.attention_received(module, hidden_states[:, -window:], keys, last)
            average = received / count
        sinks, tree, recent = self.layout(compute_n_kept(k_len, self.compression_ratio))
        arrivals = k_len - sinks - tree - recent
        kept = torch.zeros_like(average)
        kept[..., :sinks] = 1
        kept[..., k_len - recent :] = 1
        if tree:
            groups, _ = tree_groups(tree, arrivals, self._pointer.get(layer, 0))
            groups = torch.tensor(groups, device=keys.device)
            winners = _group_argmax(average[..., sinks : sinks + tree + arrivals].float(), groups, tree)
            kept.scatter_(-1, winners + sinks, 1.0)
        return kept
