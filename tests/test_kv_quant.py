"""KV quantization (optimum-quanto through transformers' QuantizedCache): close to dense, really
smaller, and composable with a press."""

import torch
from kvpress import SnapKVPress

from decoding.kv_cache import kv_bytes, make_cache
from tests.conftest import build, tiny_neox_config

IDS = torch.randint(0, 1000, (1, 300), generator=torch.Generator().manual_seed(0))


def continuation_logits(model, kv_quant: str, press=None):
    cache = make_cache(model, kv_quant, q_group_size=16, residual_length=32)
    with torch.no_grad():
        if press is None:
            model(IDS[:, :200], past_key_values=cache)
        else:
            with press(model):
                model.model(input_ids=IDS[:, :200], past_key_values=cache)
        return model(IDS[:, 200:], past_key_values=cache).logits, cache


def test_quantized_cache_stays_close_to_dense_and_holds_fewer_bytes():
    model = build(tiny_neox_config(), attn_implementation="sdpa")
    dense, dense_cache = continuation_logits(model, "none")
    for kv_quant, tolerance in [("int4", 0.02), ("int2", 0.10)]:  # relative L2 error of the logits
        logits, cache = continuation_logits(model, kv_quant)
        error = ((logits - dense).norm() / dense.norm()).item()
        assert 0 < error < tolerance, (kv_quant, error)
        assert [cache.get_seq_length(i) for i in range(2)] == [300, 300]
    # int4 with fp32 scale and shift per group of 16: 1 byte per value against 4 in fp32
    assert kv_bytes(make_and_fill(model, "int4")) * 3 < kv_bytes(dense_cache)


def make_and_fill(model, kv_quant):
    cache = make_cache(model, kv_quant, q_group_size=16, residual_length=32)
    with torch.no_grad():
        model(IDS, past_key_values=cache)
    return cache


def test_a_press_compresses_a_quantized_cache():
    model = build(tiny_neox_config(), attn_implementation="sdpa")
    _, cache = continuation_logits(model, "int4", SnapKVPress(0.5, window_size=8))
    assert cache.get_seq_length(0) == 100 + 100  # 200 prefilled, half kept, then 100 scored tokens
