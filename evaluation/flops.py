"""Analytic forward FLOPs of a decoder (2 FLOPs per multiply-add, matrix products only).

Per generated token: the weight matrices (attention projections, MLP, LM head) plus attention
over the keys actually held in the cache, which is where KV compression saves compute.
Checked against ``torch.utils.flop_counter.FlopCounterMode`` in tests/test_flops.py.
"""

from collections.abc import Sequence

from decoding.kv_cache import head_shape


def _dims(config) -> tuple[int, int, int]:
    kv_heads, head_dim = head_shape(config)
    return head_dim * config.num_attention_heads, head_dim * kv_heads, config.hidden_size


def weight_flops_per_token(config) -> int:
    """FLOPs of every weight matrix for one token (independent of the context length)."""
    q_width, kv_width, hidden = _dims(config)
    mlp_matrices = 2 if config.model_type == "gpt_neox" else 3  # Llama's MLP is gated
    per_layer = 2 * hidden * (q_width + 2 * kv_width) + 2 * q_width * hidden
    per_layer += mlp_matrices * 2 * hidden * config.intermediate_size
    return config.num_hidden_layers * per_layer + 2 * hidden * config.vocab_size


def attention_flops_per_token(config, n_keys: int) -> int:
    """FLOPs of q.K^T and softmax(.)V for one query attending to ``n_keys`` keys in every layer."""
    q_width, _, _ = _dims(config)
    return config.num_hidden_layers * 4 * q_width * n_keys


def decode_flops(config, cache_before: int | Sequence[int], new_tokens: int) -> int:
    """FLOPs of ``new_tokens`` decode steps starting from a cache of ``cache_before`` tokens: one
    length for every layer, or a sequence of each layer's own (ragged caches: PyramidKV keeps more
    in the lower layers), whose attention is counted layer by layer."""
    q_width, _, _ = _dims(config)
    layers = config.num_hidden_layers
    per_layer = list(cache_before) if isinstance(cache_before, Sequence) else [cache_before] * layers
    if len(per_layer) != layers:
        raise ValueError(f"{len(per_layer)} cache lengths for {layers} layers")
    # Summed over layers and steps: step s attends the layer's cache plus s + 1 new tokens.
    keys_attended = sum(new_tokens * cache + new_tokens * (new_tokens + 1) // 2 for cache in per_layer)
    return new_tokens * weight_flops_per_token(config) + 4 * q_width * keys_attended


def prefill_flops(config, prompt_tokens: int) -> int:
    """Causal prefill: token t attends to t keys (the useful work; kernels may compute more)."""
    keys_attended = prompt_tokens * (prompt_tokens + 1) // 2
    return prompt_tokens * weight_flops_per_token(config) + attention_flops_per_token(config, keys_attended)
