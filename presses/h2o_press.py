"""H2O: keep the heavy hitters (most attention accumulated so far) and the most recent tokens."""

from dataclasses import dataclass, field

import torch
from kvpress import ScorerPress
from kvpress.utils import compute_n_kept
from torch import nn

from presses.attention import attention_rows, keep_recent, padded_to_keys, per_kv_head


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
