"""Scissorhands: keep the tokens whose importance persisted over the recent queries."""

from dataclasses import dataclass, field

import torch
from kvpress import ScorerPress
from kvpress.utils import compute_n_kept
from torch import nn

from presses.attention import attention_rows, keep_recent, padded_to_keys, per_kv_head


@dataclass
class ScissorhandsPress(ScorerPress):
    """Scissorhands (Liu et al. 2023, "Scissorhands: Exploiting the Persistence of Importance
    Hypothesis for LLM KV Cache Compression at Test Time", https://arxiv.org/abs/2305.17118).

    A key's score is how many times, over the last ``history_window`` queries and the query heads
    sharing its KV head, it received at least the average attention 1/n of that query (n: keys
    the query attended); the least persistent keys are evicted. The paper counts the complement
    (attention below the average, masked entries included) and drops the highest counts: the same
    ranking. Equal counts go to the newer token, which fewer queries have judged. The ``n_recent``
    newest tokens are always kept; ``None`` keeps min(history_window, half the kept budget).
    Prefill form: the window is the prefill's last queries. Held by ``BudgetPress``: ``observe``
    records each call's last queries (up to ``history_window`` rows, aligned with the cache),
    ``keep`` makes them follow evictions, so the window spans calls. Attention comes from
    ``presses.attention.current_attention`` or from the eager weights when given: no eager needed.
    """

    compression_ratio: float = 0.0
    history_window: int = 64
    n_recent: int | None = None
    history: dict = field(default_factory=dict, init=False, repr=False)  # layer -> (batch, kv_heads, rows, k_len)

    def __post_init__(self):
        super().__post_init__()
        if self.history_window < 1:
            raise ValueError(f"history_window must be at least 1, got {self.history_window}")

    def above_average(self, module, hidden_states, keys, attentions, kwargs) -> torch.Tensor:
        """(batch, kv_heads, rows, k_len) uint8: for each of this call's last ``history_window``
        queries, how many query heads of each KV head gave each key at least the average."""
        q_len, k_len = hidden_states.shape[1], keys.shape[2]
        start = max(0, q_len - self.history_window)
        rows = attention_rows(module, hidden_states, keys, attentions, kwargs, start, q_len)
        attended = torch.arange(k_len - q_len + start + 1, k_len + 1, device=rows.device)
        hits = rows >= 1.0 / attended[:, None]  # masked (future) keys have weight 0: never a hit
        return per_kv_head(hits.to(torch.uint8), keys.shape[1]).to(torch.uint8)

    def observe(self, module: nn.Module, hidden_states, keys, values, kwargs):
        rows = self.above_average(module, hidden_states, keys, None, kwargs)
        past = self.history.get(module.layer_idx, rows[:, :, :0, :0])
        past = padded_to_keys(past, keys)  # older queries never saw the new keys
        self.history[module.layer_idx] = torch.cat([past, rows], dim=2)[:, :, -self.history_window :]

    def keep(self, module: nn.Module, indices: torch.Tensor):
        history = self.history[module.layer_idx]
        self.history[module.layer_idx] = history.gather(3, indices.unsqueeze(2).expand(-1, -1, history.shape[2], -1))

    def reset(self):
        self.history.clear()

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        history = self.history.get(module.layer_idx)
        if history is None:  # prefill form: nothing observed, the queries of this call only
            history = self.above_average(module, hidden_states, keys, attentions, kwargs)
        k_len = keys.shape[2]
        newer = torch.arange(k_len, device=keys.device) / k_len  # < 1: breaks ties only
        counts = history.sum(2, dtype=torch.float32) + newer
        n_kept = compute_n_kept(k_len, self.compression_ratio)
        return keep_recent(counts, min(self.history_window, n_kept // 2) if self.n_recent is None else self.n_recent)
