"""The KV cache a run uses: full precision (DynamicCache) or quantized (transformers'
QuantizedCache with the optimum-quanto back end: int4 or int2, per-channel groups of
``q_group_size``, the newest ``residual_length`` tokens kept in full precision until they are
quantized in a batch). kvpress presses compress either kind."""

from transformers import Cache, DynamicCache, QuantizedCache

KV_QUANT = {"none": None, "int4": 4, "int2": 2}


def make_cache(model, kv_quant: str = "none", q_group_size: int = 64, residual_length: int = 128) -> Cache:
    if kv_quant not in KV_QUANT:
        raise ValueError(f"unknown KV quantization {kv_quant!r}; choose from {', '.join(KV_QUANT)}")
    if KV_QUANT[kv_quant] is None:
        return DynamicCache()
    return QuantizedCache(backend="quanto", config=model.config, nbits=KV_QUANT[kv_quant],
                          q_group_size=q_group_size, residual_length=residual_length)


def head_shape(config) -> tuple[int, int]:
    """(KV heads, head dim) of a model config (GQA configs name their KV heads; MHA ones do not)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim


def fp16_kv_bytes(config, tokens: int) -> int:
    """Bytes of ``tokens`` tokens' keys and values over every layer, in fp16."""
    kv_heads, head_dim = head_shape(config)
    return 2 * 2 * config.num_hidden_layers * kv_heads * head_dim * tokens


def tensor_bytes(tensor) -> int:
    """Bytes a tensor really holds; quanto's quantized tensors are summed over their parts
    (packed data, scales, shifts), not counted at their nominal dtype."""
    if hasattr(tensor, "__tensor_flatten__"):
        return sum(tensor_bytes(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0])
    return tensor.numel() * tensor.element_size()


def kv_bytes(cache: Cache) -> int:
    """Bytes held by a cache's keys and values, quantized parts included. A layer that holds
    its data in another form (presses/cross_layer_cache.py) lists it in ``held_tensors()``;
    a tensor held by several layers (shared or merged storage) is counted once."""
    parts = ("keys", "values", "_quantized_keys", "_quantized_values")
    held = {}
    for layer in cache.layers:
        tensors = layer.held_tensors() if hasattr(layer, "held_tensors") else [getattr(layer, part, None) for part in parts]
        held |= {id(tensor): tensor for tensor in tensors if tensor is not None}
    return sum(tensor_bytes(tensor) for tensor in held.values())
