"""Attention weights of the current queries, rebuilt from the cache without eager attention,
and the per-key score helpers the scorers with memory (H2O, Scissorhands) share.

Scorers such as H2O and Scissorhands need the attention each cached key received. Forcing the
whole model to eager attention would cost every layer a (queries x keys) matrix in memory; a
scorer calls this instead, once per layer, for the queries of the current forward call only.
"""

import math

import torch
import torch.nn.functional as F
from kvpress.utils import get_prerope_query_states
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half


def rotated_queries(module: nn.Module, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The queries (batch, heads, q_len, head_dim) of ``hidden_states``, rotated as attention
    sees them; ``kwargs["position_embeddings"]`` holds the (cos, sin) of exactly these positions."""
    cos, sin = kwargs["position_embeddings"]
    queries = get_prerope_query_states(module, hidden_states)
    return queries * cos.unsqueeze(1) + rotate_half(queries) * sin.unsqueeze(1)


def current_attention(module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Softmax attention (batch, heads, q_len, k_len), float32, of this call's q_len queries over
    every cached key; the queries are the last q_len cache positions (causal among themselves)."""
    q_len, k_len = hidden_states.shape[1], keys.shape[2]
    queries = rotated_queries(module, hidden_states, kwargs)
    keys = repeat_kv(keys, module.config.num_attention_heads // keys.shape[1])
    logits = torch.matmul(queries.float(), keys.float().transpose(2, 3)) / math.sqrt(module.head_dim)
    future = torch.ones(q_len, k_len, dtype=torch.bool, device=keys.device).triu(k_len - q_len + 1)
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


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
