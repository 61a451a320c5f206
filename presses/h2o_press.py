"""H2O: keep the heavy hitters (most attention accumulated so far) and the most recent tokens."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from kvpress import ScorerPress
from kvpress.utils import compute_n_kept
from torch import nn

from presses.attention import current_attention


def attention_rows(module: nn.Module, hidden_states, keys, attentions, kwargs, start: int, stop: int) -> torch.Tensor:
    """Attention (batch, heads, stop - start, k_len), float32, of this call's queries
    ``start..stop-1`` over every cached key (zero past each query's causal end). Taken from the
    eager weights when given, else rebuilt with ``current_attention`` for those queries only."""
    if attentions is not None:
        return attentions[:, :, start:stop].float()
    q_len, k_len = hidden_states.shape[1], keys.shape[2]
    stop = min(stop, q_len)
    end = k_len - q_len + stop  # the last of these queries sees keys [0, end)
    cos, sin = kwargs["position_embeddings"]
    rows_kwargs = {**kwargs, "position_embeddings": (cos[:, start:stop], sin[:, start:stop])}
    rows = current_attention(module, hidden_states[:, start:stop], keys[:, :, :end], rows_kwargs)
    return F.pad(rows, (0, k_len - end))


def per_kv_head(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum a (batch, heads, ...) tensor over the query heads that share each KV head (GQA)."""
    return x.view(x.shape[0], kv_heads, x.shape[1] // kv_heads, *x.shape[2:]).sum(2)


def padded_to_keys(past: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per-key memory ``past`` (last dim: the keys it has seen) with zeros for the keys added since."""
    assert past.shape[-1] <= keys.shape[2], "the cache shrank without keep(): reset() the press between texts"
    return F.pad(past, (0, keys.shape[2] - past.shape[-1]))


def keep_recent(scores: torch.Tensor, n_recent: int) -> torch.Tensor:
    """Scores with the last ``n_recent`` tokens above all others, the newest highest."""
    n_recent = min(n_recent, scores.shape[-1])
    if n_recent <= 0:
        return scores
    ramp = torch.arange(1, n_recent + 1, device=scores.device, dtype=scores.dtype)
    return torch.cat([scores[..., :-n_recent], scores.max() + ramp.expand(*scores.shape[:-1], -1)], dim=-1)


@dataclass
class H2OPress(ScorerPress):
    """H2O (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
    Large Language Models", https://arxiv.org/abs/2306.14048).

    Each key's score is the attention it has received, summed over every query so far and over
    the query heads sharing its KV head; the ``n_recent`` newest tokens are always kept and the
    rest of the budget goes to the highest scores (heavy hitters). ``n_recent=None`` splits the
    kept budget in half between recent tokens and heavy hitters, as in the paper's experiments;
    an integer gives a fixed recent window. Prefill form: the sum runs over all queries of the
    prefill. Held by ``BudgetPress``: ``observe`` adds each call's attention to a per-layer sum
    aligned with the cache and ``keep`` makes it follow evictions, so scores span the whole
    stream. Attention comes from ``presses.attention.current_attention`` (computed ``query_chunk``
    queries at a time), or from the eager weights when the model returns them: no eager needed.
    """

    compression_ratio: float = 0.0
    n_recent: int | None = None
    query_chunk: int = 512
    accumulated: dict = field(default_factory=dict, init=False, repr=False)  # layer -> (batch, kv_heads, k_len)

    def attention_received(self, module, hidden_states, keys, attentions, kwargs) -> torch.Tensor:
        """(batch, kv_heads, k_len): attention each key received from this call's queries."""
        q_len = hidden_states.shape[1]
        total = 0
        for start in range(0, q_len, self.query_chunk):
            rows = attention_rows(module, hidden_states, keys, attentions, kwargs, start, start + self.query_chunk)
            total = total + per_kv_head(rows.sum(2), keys.shape[1])
        return total

    def observe(self, module: nn.Module, hidden_states, keys, values, kwargs):
        received = self.attention_received(module, hidden_states, keys, None, kwargs)
        past = self.accumulated.get(module.layer_idx, received.new_zeros(*received.shape[:2], 0))
        self.accumulated[module.layer_idx] = padded_to_keys(past, keys) + received

    def keep(self, module: nn.Module, indices: torch.Tensor):
        self.accumulated[module.layer_idx] = self.accumulated[module.layer_idx].gather(2, indices)

    def reset(self):
        self.accumulated.clear()

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        heavy = self.accumulated.get(module.layer_idx)
        if heavy is None:  # prefill form: nothing observed, the queries of this call only
            heavy = self.attention_received(module, hidden_states, keys, attentions, kwargs)
        n_kept = compute_n_kept(keys.shape[2], self.compression_ratio)
        return keep_recent(heavy, n_kept // 2 if self.n_recent is None else self.n_recent)
