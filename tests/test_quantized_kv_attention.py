"""The quantized-KV decode attention (decoding/quantized_kv_attention.py, Triton under the interpreter
on CPU: tests/conftest.py) equals SDPA over the dequantized cache; its store holds what the press's
quantizer makes (presses/quantize.py), in the bytes it counts; its benchmark runs on a tiny shape."""

import json

import pytest
import torch

from decoding import neox_decode
from decoding.quantized_kv_attention import (KernelConfig, QuantizedKV, attend_quantized, quantize, quantize_kv,
                                             quantized_kv_attention)
from evaluation import quantized_kv_speed
from presses.quantize import CHANNEL_STATS_BYTES, channel_stats, fake_quantize, quantize_per_token, token_bytes
from tests.test_split_kv_attention import visible_mask

SLOTS = 77  # no multiple of the blocks (32) nor of the 3 chunks
CONFIG = KernelConfig(block=32, warps=2, stages=1, chunks=3)


def random_cache(dim: int, batch: int = 2, heads: int = 2, new: int = 3, slots: int = SLOTS):
    generator = torch.Generator().manual_seed(1)
    # scores spread (3x a unit normal's) so the softmax is far from uniform; keys with per-channel
    # offsets, as real keys have, which the channel statistics take out
    query = 3 * torch.randn(batch, heads, new, dim, generator=generator) / dim**0.5
    keys = torch.randn(batch, heads, slots, dim, generator=generator) + 4 * torch.randn(batch, heads, 1, dim,
                                                                                        generator=generator)
    values = torch.randn(batch, heads, slots, dim, generator=generator)
    return query, keys, values


def masked_visible():
    # row 1 has 10 slots of padding in front; new token n sees up to slot 72 + n: the last slots unwritten
    return visible_mask([0, 10], [72, 73, 74], SLOTS)


@pytest.mark.parametrize("dim", [80, 64, 112])  # halves of 40 = 32 + 8, 32, 56 = 32 + 24 (the rest padded)
@pytest.mark.parametrize("key_bits, value_bits, centre_keys", [(8, 8, False), (4, 4, True), (8, 4, True),
                                                               (4, 8, False)])
def test_equals_sdpa_over_the_dequantized_cache(dim, key_bits, value_bits, centre_keys):
    query, keys, values = random_cache(dim)
    cache = quantize_kv(keys, values, key_bits, value_bits, centre_keys)
    visible = masked_visible()
    expected = neox_decode.attend(query, *cache.dequantize(), visible, 0.7, "sdpa")
    attended = attend_quantized(query, cache, visible, 0.7, CONFIG)
    assert torch.allclose(attended, expected, atol=1e-5, rtol=0)
    # and the quantization is no identity: the original cache's attention is further off
    assert not torch.allclose(neox_decode.attend(query, keys, values, visible, 0.7, "sdpa"), expected, atol=1e-3)


@pytest.mark.parametrize("chunks", [None, 1])
def test_one_chunk_or_the_split_plans_give_the_same_attention(chunks):
    query, keys, values = random_cache(80)
    cache = quantize_kv(keys, values, 4, 4, centre_keys=True)
    visible = masked_visible()
    expected = neox_decode.attend(query, *cache.dequantize(), visible, 0.7, "sdpa")
    attended = attend_quantized(query, cache, visible, 0.7, KernelConfig(64, 4, 3, chunks))
    assert torch.allclose(attended, expected, atol=1e-5, rtol=0)


def test_fp16_query_gives_fp16_output():
    query, keys, values = random_cache(80)
    cache = quantize_kv(keys.half(), values.half(), 8, 4)
    visible = masked_visible()
    expected = neox_decode.attend(query, *cache.dequantize(), visible, 0.7, "sdpa")
    attended = attend_quantized(query.half(), cache, visible, 0.7, CONFIG)
    assert attended.dtype == torch.float16
    assert torch.allclose(attended.float(), expected, atol=2e-3, rtol=0)


def test_garbage_in_the_sides_of_slots_nobody_sees_changes_nothing():
    # codes cannot be NaN, but an unseen slot's fp16 scale or zero point can hold anything
    query, keys, values = random_cache(80)
    cache = quantize_kv(keys, values, 4, 4)
    visible = masked_visible()
    clean = attend_quantized(query, cache, visible, 0.7, CONFIG)
    dirty_keys = type(cache.keys)(cache.keys.codes, cache.keys.scale.clone(), cache.keys.zero.clone(), 4)
    dirty_values = type(cache.values)(cache.values.codes, cache.values.scale.clone(), cache.values.zero.clone(), 4)
    dirty_keys.scale[0, :, 76], dirty_keys.zero[1, :, 3] = float("nan"), float("inf")
    dirty_values.scale[1, :, 5], dirty_values.zero[0, :, 75] = float("inf"), float("nan")
    dirty_values.zero[1, :, 0] = float("-inf")
    assert torch.equal(attend_quantized(query, QuantizedKV(dirty_keys, dirty_values), visible, 0.7, CONFIG), clean)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_store_holds_what_the_press_quantizer_makes(bits):
    _, keys, values = random_cache(80, slots=20)
    assert torch.equal(quantize(values, bits).dequantize(), fake_quantize(values, bits))
    centred = quantize_kv(keys, values, bits, bits, centre_keys=True).dequantize()[0]
    assert torch.allclose(centred, quantize_per_token(keys, bits, channel_stats(keys)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_rounding_is_to_the_nearest_step_over_the_full_range(bits):
    # fp16-exact inputs, so the stored fp16 minimum is the minimum itself
    _, _, values = random_cache(64, slots=20)
    values = values.half().float()
    stored = quantize(values, bits)
    error = (stored.dequantize() - values).abs()
    assert (error <= stored.scale[..., None].float() / 2 * (1 + 1e-5)).all()
    unpacked = torch.cat([stored.codes & 15, stored.codes >> 4], -1) if bits == 4 else stored.codes
    assert (unpacked.amin(-1) == 0).all() and (unpacked.amax(-1) == 2**bits - 1).all()  # min-max: both ends used


@pytest.mark.parametrize("centre_keys", [False, True])
def test_nbytes_counts_codes_sides_and_channel_statistics(centre_keys):
    _, keys, values = random_cache(80, slots=20)
    cache = quantize_kv(keys, values, 8, 4, centre_keys)
    assert cache.keys.codes.shape[-1] == 80 and cache.values.codes.shape[-1] == 40
    groups = 2 * 2 * 20  # batch x heads x slots
    stats = CHANNEL_STATS_BYTES * 80 * 2 * 2 if centre_keys else 0
    assert cache.nbytes == groups * (token_bytes(8, 80) + token_bytes(4, 80)) + stats


def test_bad_bits_and_shapes_are_refused():
    _, keys, values = random_cache(80, slots=8)
    for bits in (3, 16, 2):
        with pytest.raises(ValueError, match="reads 8 or 4-bit codes"):
            quantize(values, bits)
    with pytest.raises(ValueError, match="must be even"):
        quantize(values[..., :79], 8)
    query = torch.randn(2, 2, 1, 80)
    cache = quantize_kv(keys, values, 8, 4)
    with pytest.raises(ValueError, match="value codes"):  # 4-bit codes read as 8-bit
        quantized_kv_attention(query, cache.keys.codes, cache.keys.scale, cache.keys.zero, cache.values.codes,
                               cache.values.scale, cache.values.zero, torch.ones(2, 1, 8, dtype=torch.bool), 0.1, 8, 8)


def test_compiled_fullgraph_keeps_the_op_opaque():
    query, keys, values = random_cache(80, new=1)
    cache = quantize_kv(keys, values, 4, 8, centre_keys=True)
    visible = masked_visible()[:, :1]
    compiled = torch.compile(lambda query: attend_quantized(query, cache, visible, 0.7, CONFIG), fullgraph=True,
                             backend="aot_eager")
    assert torch.allclose(compiled(query), attend_quantized(query, cache, visible, 0.7, CONFIG), atol=1e-6, rtol=0)


def test_the_benchmark_times_every_format_on_a_tiny_shape(tmp_path):
    output = tmp_path / "speed.json"
    quantized_kv_speed.main(["--device", "cpu", "--shapes", "2x2x80x40", "--configs", "32x2x1", "--replays", "1",
                             "--span_mib", "0", "--output", str(output)])
    result = json.loads(output.read_text())
    rows = {row["format"]: row for row in result["rows"]}
    assert set(rows) == {"sdpa_fp16", "split_kv_fp16", "quantized_k8v8", "quantized_k4v4"}
    for row in rows.values():
        assert row["us_per_layer"] > 0 and row["max_abs_difference"] < 1e-2, row
    assert all(row["layers"] == 2 for row in rows.values())
    # bytes per layer: 2 x 2 x 40 = 160 (token, head) groups of keys and of values; the fp16 query and
    # output; at 4 bits 40 bytes of codes and 4 of sides a group, and the keys' fp16 channel scale
    edges = 2 * (2 * 2 * 80 * 2)
    assert rows["split_kv_fp16"]["bytes"] == rows["sdpa_fp16"]["bytes"] == 2 * 160 * 80 * 2 + edges
    assert rows["quantized_k4v4"]["bytes"] == 2 * 160 * (40 + 4) + edges + 2 * 2 * 80 * 2
    assert result["best"]["2x2x80x40"]["quantized_k4v4"]["config"] == "32x2x1"
