"""Attention weights of the current queries, rebuilt from the cache without eager attention.

Scorers such as H2O and Scissorhands need the attention each cached key received. Forcing the
whole model to eager attention would cost every layer a (queries x keys) matrix in memory; a
scorer calls this instead, once per layer, for the queries of the current forward call only.
"""

import math

import torch
from kvpress.utils import get_prerope_query_states
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half


def current_attention(module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Softmax attention (batch, heads, q_len, k_len), float32, of this call's q_len queries over
    every cached key; the queries are the last q_len cache positions (causal among themselves)."""
    q_len, k_len = hidden_states.shape[1], keys.shape[2]
    cos, sin = kwargs["position_embeddings"]
    queries = get_prerope_query_states(module, hidden_states)
    queries = queries * cos.unsqueeze(1) + rotate_half(queries) * sin.unsqueeze(1)
    keys = repeat_kv(keys, module.config.num_attention_heads // keys.shape[1])
    logits = torch.matmul(queries.float(), keys.float().transpose(2, 3)) / math.sqrt(module.head_dim)
    future = torch.ones(q_len, k_len, dtype=torch.bool, device=keys.device).triu(k_len - q_len + 1)
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)
