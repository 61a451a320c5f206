"""Low-bit KV presses: the simulated quantizer, the uniform baseline and RD-KV's allocation, on
tiny GPT-NeoX (Pythia's partial rotary) and Llama (GQA) models."""

import pytest
import torch
from kvpress import ComposedPress, SnapKVPress
from transformers import DynamicCache

from decoding.kv_cache import fp16_kv_bytes
from evaluation.protocols import context_nll, stored_bytes
from presses.errors import PressConfigError
from presses.quantize import (CHANNEL_WIDTHS, WIDTH_TABLE_BITS, fake_quantize, gaussian_levels, per_channel_bytes,
                              quantize_per_channel,
                              quantize_per_token, query_weighted_widths, rotation, symmetric_quantize, token_bytes)
from presses.quantized_kv_press import QuantizedKVPress
from presses.attention import per_kv_head
from presses.h2o_press import H2OPress
from presses.rdkv_press import RDKVPress, _allocate, _merge_evicted
from tests.conftest import build, tiny_llama_config, tiny_neox_config


def _prefill(model, press, tokens: int = 96):
    ids = torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(1))
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, past_key_values=cache)
    return cache


def test_fake_quantize_error_shrinks_with_bits_and_keeps_the_range():
    x = torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(0))
    errors = [(fake_quantize(x, bits) - x).abs().max().item() for bits in (2, 4, 5, 6, 8)]
    assert errors[0] > errors[1] > errors[2] > errors[3] > errors[4] > 0
    step = (x.amax(-1) - x.amin(-1)) / 255
    assert errors[4] <= step.max().item() * 0.51 + 1e-3  # at most half a step (the fp16 scale rounds a little)


def test_rotation_is_orthogonal_and_tames_a_tokens_outliers():
    turn = rotation(16, "cpu", torch.float64)
    torch.testing.assert_close(turn @ turn.T, torch.eye(16, dtype=torch.float64))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 40, 64, generator=generator)
    spikes = torch.rand(x.shape, generator=generator) < 0.03  # a few large entries per token set its range
    x = torch.where(spikes, 12 * x, x)
    plain = (quantize_per_token(x, 3) - x).norm()
    rotated = quantize_per_token(x, 3, rotate=True)
    assert (rotated - x).norm() < 0.7 * plain  # the rotation spreads them over the group (measured: 0.58)
    assert (quantize_per_token(x, 8, rotate=True) - x).abs().max() < 0.01 * x.abs().max()  # and undoes itself


@pytest.mark.parametrize("layout", ["channel", "token"])
def test_rotated_quantization_takes_the_same_bytes_and_changes_the_cache(layout):
    model = build(tiny_llama_config())
    plain, turned = QuantizedKVPress(bits=3, key_layout=layout), QuantizedKVPress(bits=3, key_layout=layout, rotate=True)
    caches = _prefill(model, plain), _prefill(model, turned)
    assert plain.stored_bytes == turned.stored_bytes
    assert not torch.equal(caches[0].layers[0].values, caches[1].layers[0].values)
    rdkv = RDKVPress(0.8, rotate=True, key_layout=layout, window_size=8)
    cache = _prefill(model, rdkv)
    for layer, stored in rdkv.stored_bytes.items():
        keys = cache.layers[layer].keys
        assert stored <= 0.2 * keys.shape[1] * 96 * keys.shape[-1] * 2 * 2


def test_per_channel_layout_leaves_the_tail_in_full_precision():
    x = torch.randn(1, 2, 70, 8)
    quantized = quantize_per_channel(x, 2, group_tokens=32)
    assert torch.equal(quantized[:, :, 64:], x[:, :, 64:])
    assert not torch.equal(quantized[:, :, :64], x[:, :, :64])
    assert per_channel_bytes(70, 2, 8, 32) == 2 * 8 * (32 * 2 / 8 + 4) + 6 * 2 * 8


@pytest.mark.parametrize("config", [tiny_neox_config(), tiny_llama_config()], ids=["neox", "llama"])
def test_uniform_press_stores_the_bytes_it_reports(config):
    model = build(config)
    press = QuantizedKVPress(bits=4, key_layout="token", recent_tokens=16)
    cache = _prefill(model, press)
    layer = cache.layers[0]
    heads, tokens, head_dim = layer.keys.shape[1:]
    assert tokens == 96  # nothing evicted
    expected = heads * (2 * 80 * token_bytes(4, head_dim) + 4 * head_dim + 2 * 16 * 2 * head_dim)
    assert press.stored_bytes[0] == expected
    assert stored_bytes(press, cache) == pytest.approx(expected * config.num_hidden_layers)


def test_rdkv_at_ratio_zero_is_the_dense_cache_exactly():
    model = build(tiny_llama_config())
    dense, pressed = _prefill(model, QuantizedKVPress(bits=8)), _prefill(model, RDKVPress(0.0))
    plain = DynamicCache()
    ids = torch.randint(0, 1000, (1, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.model(input_ids=ids, past_key_values=plain)
    for index in range(len(plain.layers)):
        assert torch.equal(pressed.layers[index].keys, plain.layers[index].keys)
        assert torch.equal(pressed.layers[index].values, plain.layers[index].values)
    assert not torch.equal(dense.layers[0].values, plain.layers[0].values)  # the 8-bit press does change them


@pytest.mark.parametrize("config", [tiny_neox_config(), tiny_llama_config()], ids=["neox", "llama"])
@pytest.mark.parametrize("ratio", [0.75, 0.875])
@pytest.mark.parametrize("separate", [False, True], ids=["joint", "separate"])
@pytest.mark.parametrize("per_head", [False, True], ids=["every-head", "per-head"])
def test_rdkv_fits_its_byte_budget_and_mixes_precisions(config, ratio, separate, per_head):
    model = build(config)
    press = RDKVPress(ratio, window_size=8, bits=(2, 3, 4, 8), key_layout="token", evict_weight=1,
                      separate_widths=separate, evict_per_head=per_head)
    cache = _prefill(model, press)
    budget = (1 - ratio) * fp16_kv_bytes(model.config, 96)
    held = stored_bytes(press, cache)
    assert 0.9 * budget <= held <= budget
    keys, values = press.chosen_bits[0]["keys"], press.chosen_bits[0]["values"]
    assert sum(keys.values()) == pytest.approx(1.0) and keys[0] == values[0]  # eviction drops both
    assert sum(share > 0 for bits, share in keys.items() if bits) >= 2  # more than one precision in use
    assert (keys != values) == separate  # joint: one width per (token, head) for both
    layer = cache.layers[0]
    assert layer.keys.shape[2] == round((1 - keys[0]) * 96)
    # the layer's bytes, rebuilt from its shares: per-token integers or fp16, a tag naming one of the
    # 5 widths (3 bits) or of the 25 key-value pairs (5 bits) per kept (token, head), the keys' channel stats
    heads, head_dim = layer.keys.shape[1], layer.keys.shape[3]
    width = {b: token_bytes(b, head_dim) for b in (2, 3, 4, 8)} | {16: 2 * head_dim}
    tag = (5 if separate else 3) / 8
    per_entry = sum(share * width[b] for side in (keys, values) for b, share in side.items() if b) + (1 - keys[0]) * tag
    assert press.stored_bytes[0] == pytest.approx(heads * 96 * per_entry + heads * head_dim * 4, rel=1e-5)


def test_rdkv_with_widths_between_4_and_8_bits_counts_their_tag_and_uses_them():
    """bits=(3, 4, 5, 6, 8): the widths between 4 and 8 bits are chosen where the budget has room, the
    tag names one of 36 key-value pairs (6 bits) per kept (token, head), and the layer fits its bytes."""
    model = build(tiny_llama_config())
    press = RDKVPress(0.5, window_size=8, bits=(3, 4, 5, 6, 8), key_layout="token")
    cache = _prefill(model, press)
    assert stored_bytes(press, cache) <= 0.5 * fp16_kv_bytes(model.config, 96)
    keys, values = press.chosen_bits[0]["keys"], press.chosen_bits[0]["values"]
    assert keys.get(5, 0) + keys.get(6, 0) + values.get(5, 0) + values.get(6, 0) > 0
    heads, head_dim = cache.layers[0].keys.shape[1], cache.layers[0].keys.shape[3]
    width = {b: token_bytes(b, head_dim) for b in (3, 4, 5, 6, 8)} | {16: 2 * head_dim}
    per_entry = sum(share * width[b] for side in (keys, values) for b, share in side.items() if b) + (1 - keys[0]) * 6 / 8
    assert press.stored_bytes[0] == pytest.approx(heads * 96 * per_entry + heads * head_dim * 4, rel=1e-5)


def test_per_head_eviction_keeps_each_heads_own_tokens():
    # head 0 loses most by evicting tokens 0-3, head 1 by evicting tokens 4-7; one option (fp16, 1 byte)
    evict = torch.full((2, 8), 0.01)
    evict[0, :4], evict[1, 4:] = 10.0, 10.0
    distortion, price = torch.zeros(2, 8, 1), torch.ones(1)
    keep, _ = _allocate(distortion, evict, price, budget=8.0, per_head=True)
    assert keep[0].tolist() == [True] * 4 + [False] * 4 and keep[1].tolist() == [False] * 4 + [True] * 4
    keep, _ = _allocate(distortion, evict, price, budget=8.0)  # every head alike, within the 8 bytes
    assert torch.equal(keep[0], keep[1]) and 2 * int(keep[0].sum()) <= 8


def test_rdkv_changes_the_scores_and_refuses_bad_settings():
    tiny_llama = build(tiny_llama_config(), attn_implementation="sdpa")  # layers keep different lengths
    ids = torch.randint(0, 1000, (1 * 3 * 65,), generator=torch.Generator().manual_seed(2))
    dense = context_nll(tiny_llama, ids, None, 48, 16, num_windows=3)
    pressed = context_nll(tiny_llama, ids, RDKVPress(0.875, window_size=8), 48, 16, num_windows=3)
    assert pressed.nll_sum != dense.nll_sum
    assert pressed.stored_kv_bytes <= 0.125 * pressed.dense_kv_bytes
    evicted = context_nll(tiny_llama, ids, SnapKVPress(0.5, window_size=8), 48, 16, num_windows=3)
    assert evicted.stored_kv_bytes == pytest.approx(0.5 * evicted.dense_kv_bytes)  # fp16 tokens kept
    with pytest.raises(PressConfigError, match="compression_ratio"):
        RDKVPress(1.0)
    with pytest.raises(PressConfigError, match="bits"):
        RDKVPress(0.5, bits=(1, 4))
    with pytest.raises(PressConfigError, match="bits"):
        RDKVPress(0.5, bits=(4, 4, 8))  # one option twice
    with pytest.raises(PressConfigError, match="bits"):
        QuantizedKVPress(bits=9)
    with pytest.raises(PressConfigError, match="evict_weight"):
        RDKVPress(0.5, evict_weight=0)
    with pytest.raises(PressConfigError, match="accumulated"):
        RDKVPress(0.5, accumulated=1.5)
    with pytest.raises(PressConfigError, match="after another press use accumulated=0"):  # keys already halved
        context_nll(tiny_llama, ids, ComposedPress([SnapKVPress(0.5, window_size=8), RDKVPress(0.5)]), 48, 16, num_windows=1)
    after = context_nll(tiny_llama, ids, ComposedPress([SnapKVPress(0.5, window_size=8), RDKVPress(0.5, accumulated=0)]),
                        48, 16, num_windows=1)
    assert after.stored_kv_bytes <= 0.25 * after.dense_kv_bytes + 1e-6
    with pytest.raises(PressConfigError, match="one sequence"):
        ids = torch.randint(0, 1000, (2, 64))
        with torch.no_grad(), RDKVPress(0.5, window_size=8)(tiny_llama):
            tiny_llama.model(input_ids=ids, past_key_values=DynamicCache())


@pytest.mark.parametrize("config", [tiny_neox_config(), tiny_llama_config()], ids=["neox", "llama"])
def test_rdkv_with_kivi_keys_fits_its_budget_and_groups_keys_per_channel(config):
    model = build(config, attn_implementation="sdpa")
    press = RDKVPress(0.75, window_size=8, key_layout="channel", group_tokens=8)
    cache = _prefill(model, press, tokens=128)
    budget = 0.25 * fp16_kv_bytes(model.config, 128)
    assert 0.85 * budget <= stored_bytes(press, cache) <= budget
    token_layout = _prefill(model, RDKVPress(0.75, window_size=8, key_layout="token"), tokens=128)
    assert not torch.equal(cache.layers[0].keys, token_layout.layers[0].keys)


@pytest.mark.parametrize("over", ["all", "visible"])
@pytest.mark.parametrize("config", [tiny_neox_config(), tiny_llama_config()], ids=["neox", "llama"])
def test_rdkv_accumulated_evidence_is_h2os_attention_and_changes_the_cache(config, over):
    model = build(config, attn_implementation="sdpa")
    seen = {}

    class Recording(RDKVPress):  # keeps the first layer's received attention, computed in chunks
        def _received(self, module, hidden_states, keys, kwargs):
            received = super()._received(module, hidden_states, keys, kwargs)
            seen.setdefault("rdkv", (received, hidden_states.shape[1]))
            if "h2o" not in seen:  # H2O's score of the same call, per KV head, before its recent window
                h2o = H2OPress(0.5, query_chunk=1000)
                seen["h2o"] = h2o.attention_received(module, hidden_states, keys, None, kwargs)
            return received

    caches = {share: _prefill(model, Recording(0.75, accumulated=share, accumulated_over=over, query_chunk=7))
              for share in (0.0, 1.0)}
    received, queries = seen["rdkv"]
    heads = seen["h2o"].shape[1]
    # a prefill's token t is seen by the queries t..end
    seeing = torch.arange(queries, 0, -1).float() if over == "visible" else torch.full((queries,), float(queries))
    torch.testing.assert_close(per_kv_head(received, heads) * seeing, seen["h2o"])
    if over == "all":
        torch.testing.assert_close(received.sum(-1), torch.ones_like(received.sum(-1)))  # a mean of softmax rows
    window_only, accumulated = (caches[share].layers[0] for share in (0.0, 1.0))
    assert window_only.keys.shape != accumulated.keys.shape or not torch.equal(window_only.keys, accumulated.keys)


@pytest.mark.parametrize("per_head", [False, True])
def test_protected_tokens_are_kept_at_the_width_the_rule_chooses(per_head):
    # tokens 4-7 cost nothing to evict, so unprotected they go first; two options: 1 byte (error 1), 2 bytes (none)
    evict = torch.full((2, 8), 100.0)
    evict[:, 4:] = 0.0
    distortion, price = torch.tensor([1.0, 0.0]).expand(2, 8, 2), torch.tensor([1.0, 2.0])
    protected = torch.zeros(8, dtype=torch.bool)
    protected[4:] = True
    keep, _ = _allocate(distortion, evict, price, budget=16.0, per_head=per_head)
    assert not keep[:, 4:].any()
    keep, choice = _allocate(distortion, evict, price, budget=16.0, per_head=per_head, protected=protected)
    assert keep.all() and (choice == 0).all()  # 16 entries at 1 byte: all kept, at the cheap width


def test_rdkv_protects_only_what_the_budget_pays_for():
    model = build(tiny_llama_config(), attn_implementation="sdpa")
    for ratio in (0.6, 0.9):  # at 10%, half the tokens at the fewest bits exceed the budget
        press = RDKVPress(ratio, protect_recent=0.5, window_size=8)
        cache = _prefill(model, press, tokens=96)
        for layer, stored in press.stored_bytes.items():
            keys = cache.layers[layer].keys
            assert stored <= (1 - ratio) * keys.shape[1] * 96 * keys.shape[-1] * 2 * 2  # fp16 keys and values
            if ratio == 0.6:
                assert keys.shape[2] >= 48
    with pytest.raises(PressConfigError, match="protect_recent"):
        RDKVPress(0.5, protect_recent=2.0)


@pytest.mark.parametrize("config", [tiny_neox_config(), tiny_llama_config()], ids=["neox", "llama"])
@pytest.mark.parametrize("per_head", [False, True], ids=["every-head", "per-head"])
@pytest.mark.parametrize("layout", ["token", "channel"])
def test_merging_evicted_values_keeps_the_bytes_and_keys_and_changes_the_kept_values(config, per_head, layout):
    model = build(config)
    presses = {merge: RDKVPress(0.875, window_size=8, evict_weight=1, key_layout=layout, evict_per_head=per_head,
                                group_tokens=8, merge_evicted=merge) for merge in (False, True)}
    caches = {merge: _prefill(model, press) for merge, press in presses.items()}
    assert presses[True].stored_bytes == presses[False].stored_bytes  # the same widths at the same bytes
    assert presses[True].chosen_bits == presses[False].chosen_bits
    for plain, merged in zip(caches[False].layers, caches[True].layers):
        assert plain.keys.shape[2] < 96  # tokens were evicted
        assert torch.equal(plain.keys, merged.keys) and plain.values.shape == merged.values.shape
        changed = (plain.values - merged.values).abs().amax(-1)  # (1, heads, kept)
        assert (changed > 1e-3).any()  # kept tokens absorbed evicted values (a real change, not rounding)
    with pytest.raises(PressConfigError, match="merge_evicted"):
        RDKVPress(0.5, merge_evicted="yes")


def test_merged_values_bring_the_attention_output_closer_to_the_dense_one():
    # two heads, 6 tokens: in head 0 tokens 1 and 2 nearly repeat token 0's key, in head 1 token 1
    # nearly repeats token 4's and token 2 token 5's; tokens 1 and 2 are evicted, their values differ
    generator = torch.Generator().manual_seed(0)
    dim = 8
    keys = torch.randn(1, 2, 6, dim, generator=generator)
    keys[0, 0, 0] = 4 * keys[0, 0, 0] / keys[0, 0, 0].norm()
    keys[0, 0, 1:3] = keys[0, 0, 0] + 0.05 * torch.randn(2, dim, generator=generator)
    keys[0, 1, 1], keys[0, 1, 2] = keys[0, 1, 4] + 0.01, keys[0, 1, 5] - 0.01
    values = 3 * torch.randn(1, 2, 6, dim, generator=generator)
    query = keys[0, :, 0:1].clone()  # head 0's query favours the near-duplicate tokens
    query[1] = keys[0, 1, 4:5] + keys[0, 1, 5:6]
    probs = torch.softmax(query @ keys[0].transpose(1, 2) / dim**0.5, -1)  # (heads, 1, tokens)
    keep = torch.tensor([True, False, False, True, True, True]).expand(2, 6)
    merged = _merge_evicted(keys, values, keep, probs[:, 0])
    p, v = probs[:, 0], values[0]
    torch.testing.assert_close(merged[0, 0, 0], (p[0, :3, None] * v[0, :3]).sum(0) / p[0, :3].sum())
    torch.testing.assert_close(merged[0, 1, 4], (p[1, [1, 4], None] * v[1, [1, 4]]).sum(0) / p[1, [1, 4]].sum())
    assert torch.equal(merged[0, 0, 3:], values[0, 0, 3:]) and torch.equal(merged[0, 1, [0, 3]], values[0, 1, [0, 3]])

    def output(stored):  # the query's attention output over the kept tokens
        kept_probs = torch.softmax(query @ keys[0, :, keep[0]].transpose(1, 2) / dim**0.5, -1)
        return kept_probs @ stored[0, :, keep[0]]

    dense = probs @ values[0]
    evicted_error = (output(values) - dense).norm(dim=-1)
    merged_error = (output(merged) - dense).norm(dim=-1)
    assert (merged_error < 0.5 * evicted_error).all()


@pytest.mark.parametrize("ratio", [0.0, 0.4])
def test_merging_with_nothing_evicted_is_the_plain_press_exactly(ratio):
    model = build(tiny_llama_config())
    presses = {merge: RDKVPress(ratio, window_size=8, evict_weight=1e6, merge_evicted=merge) for merge in (False, True)}
    caches = {merge: _prefill(model, press) for merge, press in presses.items()}
    assert presses[True].stored_bytes == presses[False].stored_bytes
    for plain, merged in zip(caches[False].layers, caches[True].layers):
        assert plain.keys.shape[2] == 96  # quantization alone paid for the ratio
        assert torch.equal(plain.keys, merged.keys) and torch.equal(plain.values, merged.values)


@pytest.mark.parametrize("config", [tiny_neox_config(num_hidden_layers=3), tiny_llama_config(num_hidden_layers=3)],
                         ids=["neox", "llama"])
@pytest.mark.parametrize("scale", ["output", "none"])
def test_one_lambda_for_the_model_fits_the_models_bytes_and_moves_them_between_layers(config, scale):
    model = build(config)
    setting = dict(window_size=8, key_layout="token", evict_weight=1)
    per_layer, whole = RDKVPress(0.8, **setting), RDKVPress(0.8, allocate_over="model", layer_scale=scale, **setting)
    per_layer_cache, cache = _prefill(model, per_layer), _prefill(model, whole)
    budget = 0.2 * fp16_kv_bytes(model.config, 96)
    assert 0.9 * budget <= stored_bytes(whole, cache) <= budget
    layer_budget = budget / 3
    for layer in range(3):  # each layer within its own budget when allocated alone
        assert per_layer.stored_bytes[layer] <= layer_budget
    # one lambda: some layer holds more than its own budget would give it, another less
    assert max(whole.stored_bytes.values()) > 1.05 * layer_budget > 1.1 * min(whole.stored_bytes.values())
    for layer, held in enumerate(cache.layers):  # every layer's cache is the one it stored
        assert held.keys.shape[2] == round((1 - whole.chosen_bits[layer]["keys"][0]) * 96)
    assert not torch.equal(cache.layers[0].values, per_layer_cache.layers[0].values)
    assert whole._waiting == {}  # nothing held over for the next call


def test_one_lambda_for_a_one_layer_model_is_the_per_layer_press_exactly():
    model = build(tiny_llama_config(num_hidden_layers=1))
    setting = dict(window_size=8, key_layout="token", evict_weight=1, layer_scale="none")
    caches = [_prefill(model, RDKVPress(0.8, allocate_over=over, **setting)) for over in ("layer", "model")]
    assert torch.equal(caches[0].layers[0].keys, caches[1].layers[0].keys)
    assert torch.equal(caches[0].layers[0].values, caches[1].layers[0].values)


def test_one_lambda_after_h2o_scores_within_the_bytes_and_refuses_bad_settings():
    from evaluation.equal_bytes import rdkv_press
    from presses.rdkv_budget_press import RDKVBudgetPress

    tiny_llama = build(tiny_llama_config(num_hidden_layers=3), attn_implementation="sdpa")
    ids = torch.randint(0, 1000, (3 * 161,), generator=torch.Generator().manual_seed(2))
    results = [context_nll(tiny_llama, ids, rdkv_press(0.125, {"after_h2o": 0.6, "window_size": 4, "allocate_over": over},
                                                      144), 144, 16, num_windows=3) for over in ("layer", "model")]
    for result in results:
        assert result.stored_kv_bytes <= 0.125 * result.dense_kv_bytes + 1e-6
    assert results[0].nll_sum != results[1].nll_sum
    with pytest.raises(PressConfigError, match="allocate_over"):
        RDKVPress(0.5, allocate_over="head")
    with pytest.raises(PressConfigError, match="layer_scale"):
        RDKVPress(0.5, allocate_over="model", layer_scale="norm")
    with pytest.raises(PressConfigError, match="allocates per layer"):
        RDKVBudgetPress(RDKVPress(allocate_over="model"))


def _heterogeneous_keys_and_queries():
    """Keys (1, 2, 128, 16) whose channel scales span 1000x, and GQA queries (1, 4, 24, 16) whose
    energy falls the other way (more slowly) and is zero on channel 5."""
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 128, 16, generator=generator) * torch.logspace(-1.5, 1.5, 16)
    queries = torch.randn(1, 4, 24, 16, generator=generator) * torch.logspace(1, -1, 16)
    queries[..., 5] = 0
    return keys, queries


def _query_energy(queries, kv_heads):  # (1, kv_heads, dim): E[q_c^2] summed over the query heads of a KV head
    return (queries**2).mean(2).view(1, kv_heads, -1, queries.shape[-1]).sum(2)


def test_query_weighted_widths_fit_the_bits_and_follow_the_queries():
    keys, queries = _heterogeneous_keys_and_queries()
    widths = query_weighted_widths(keys, queries, 3, 32)
    assert widths.shape == (1, 2, 16)
    assert (widths.sum(-1) <= 16 * 3).all()
    assert all(w in CHANNEL_WIDTHS for w in widths.flatten().tolist())
    assert (widths[..., 5] == 0).all()  # no query reads channel 5
    groups = keys.view(1, 2, 4, 32, 16)
    spread = ((groups.amax(3) - groups.amin(3)) ** 2).mean(2)  # (1, heads, dim): a group's squared range
    busiest = (_query_energy(queries, 2) * spread).argmax(-1)  # per head, the channel of the largest logit error
    assert (widths.gather(-1, busiest.unsqueeze(-1)) > 3).all()


def test_per_channel_widths_tensor_matches_one_width_and_width_zero_keeps_the_group_mean():
    x = torch.randn(1, 2, 70, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    threes = torch.full((1, 2, 8), 3, dtype=torch.long)
    assert torch.equal(quantize_per_channel(x, threes, 32), quantize_per_channel(x, 3, 32))
    widths = threes.clone()
    widths[0, 1, 2] = 0
    quantized = quantize_per_channel(x, widths, 32)
    means = x[0, 1, :64, 2].view(2, 32).mean(1, keepdim=True).expand(2, 32).reshape(64)
    torch.testing.assert_close(quantized[0, 1, :64, 2], means, atol=2e-3, rtol=1e-3)  # stored in fp16
    assert torch.equal(quantized[:, :, 64:], x[:, :, 64:])  # the tail past the last whole group
    assert torch.equal(quantized[0, 0], quantize_per_channel(x, 3, 32)[0, 0])  # the other head as before


def test_query_weighted_widths_lower_the_expected_logit_error_at_the_same_bits():
    keys, queries = _heterogeneous_keys_and_queries()
    weight = _query_energy(queries, 2)

    def logit_error(quantized):  # sum_c w_c * mean((kq_c - k_c)^2)
        return (weight * ((quantized - keys) ** 2).mean(2)).sum()

    allocated = logit_error(quantize_per_channel(keys, query_weighted_widths(keys, queries, 3, 32), 32))
    assert allocated < 0.7 * logit_error(quantize_per_channel(keys, 3, 32))  # measured: 0.35x


def test_query_widths_need_kivis_key_layout():
    for bad in (lambda: RDKVPress(0.75, channel_widths="query", key_layout="token"),
                lambda: QuantizedKVPress(channel_widths="query", key_layout="token")):
        with pytest.raises(PressConfigError, match="key_layout='channel'"):
            bad()
    for bad in (lambda: RDKVPress(0.75, channel_widths="bad"), lambda: QuantizedKVPress(channel_widths="bad")):
        with pytest.raises(PressConfigError, match="channel_widths"):
            bad()


def _skew_key_channels(model):
    """Scale each head's key channels by 0.1x to 10x (a rotary pair (c, c + dim/2) alike): a seeded
    tiny model's channels are alike, and query widths then stay uniform."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    scale = torch.logspace(-1, 1, head_dim // 2).repeat(2)
    with torch.no_grad():
        for layer in model.base_model.layers:
            if config.model_type == "llama":
                layer.self_attn.k_proj.weight.view(-1, head_dim, config.hidden_size).mul_(scale[:, None])
            else:  # GPT-NeoX's fused projection: per head its query, key and value rows
                layer.attention.query_key_value.weight.view(-1, 3, head_dim, config.hidden_size)[:, 1].mul_(scale[:, None])
                layer.attention.query_key_value.bias.view(-1, 3, head_dim)[:, 1].mul_(scale)
    return model


@pytest.mark.parametrize("config", [tiny_neox_config(), tiny_llama_config()], ids=["neox", "llama"])
def test_query_widths_in_the_presses_fit_their_bytes_and_change_the_keys(config):
    model = _skew_key_channels(build(config, attn_implementation="sdpa"))
    uniform, query = QuantizedKVPress(bits=3), QuantizedKVPress(bits=3, channel_widths="query")
    caches = _prefill(model, uniform), _prefill(model, query)
    heads, head_dim = caches[0].layers[0].keys.shape[1], caches[0].layers[0].keys.shape[3]
    for layer in uniform.stored_bytes:
        assert query.stored_bytes[layer] <= uniform.stored_bytes[layer] + heads * head_dim * WIDTH_TABLE_BITS / 8
    assert not torch.equal(caches[0].layers[0].keys, caches[1].layers[0].keys)
    setting = dict(window_size=8, group_tokens=8)
    rdkv = RDKVPress(0.75, channel_widths="query", **setting)
    cache = _prefill(model, rdkv, tokens=128)
    assert stored_bytes(rdkv, cache) <= 0.25 * fp16_kv_bytes(model.config, 128)
    plain = _prefill(model, RDKVPress(0.75, **setting), tokens=128).layers[0].keys
    assert plain.shape != cache.layers[0].keys.shape or not torch.equal(plain, cache.layers[0].keys)


def test_gaussian_levels_fit_rotated_groups_where_they_beat_uniform_ones():
    for bits in (2, 3):
        levels = gaussian_levels(64, bits)
        assert levels.numel() == 2**bits and torch.allclose(levels, -levels.flip(0))  # symmetric, as the normal law
    assert gaussian_levels(64, 4) is None and gaussian_levels(64, 8) is None  # min-max uniform errs less there
    assert gaussian_levels(80, 3) is not None and gaussian_levels(80, 4) is None  # Pythia's head dim
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 200, 64, generator=generator) * torch.linspace(0.1, 4, 64)  # outlier-ish channels
    for bits, gain in ((2, 0.7), (3, 0.95)):
        gaussian = quantize_per_token(x, bits, rotate=True, levels="gaussian")
        uniform = quantize_per_token(x, bits, rotate=True)
        assert ((gaussian - x) ** 2).mean() < gain * ((uniform - x) ** 2).mean()
        turn = rotation(64, x.device, x.dtype)
        assert (gaussian @ turn)[0, 0, 0].round(decimals=3).unique().numel() == 2**bits  # a group holds 2**bits levels
    assert torch.equal(quantize_per_token(x, 4, rotate=True, levels="gaussian"), quantize_per_token(x, 4, rotate=True))


def test_gaussian_levels_change_the_stored_kv_at_the_same_bytes():
    model = build(tiny_llama_config())  # head dim 16: Gaussian levels at 2 bits only (uniform ones err less from 3)
    assert gaussian_levels(16, 2) is not None and gaussian_levels(16, 3) is None
    plain, gaussian = (QuantizedKVPress(bits=2, key_layout="token", rotate=True, levels=levels) for levels in ("uniform", "gaussian"))
    caches = _prefill(model, plain), _prefill(model, gaussian)
    assert plain.stored_bytes == gaussian.stored_bytes
    assert not torch.equal(caches[0].layers[0].values, caches[1].layers[0].values)
    rdkv = RDKVPress(0.8, bits=(2, 3, 8), rotate=True, key_layout="token", window_size=8, levels="gaussian")
    cache = _prefill(model, rdkv)
    assert stored_bytes(rdkv, cache) <= 0.2 * fp16_kv_bytes(model.config, 96)
    uniform = _prefill(model, RDKVPress(0.8, bits=(2, 3, 8), rotate=True, key_layout="token", window_size=8))
    assert any(not torch.equal(a.values, b.values) for a, b in zip(uniform.layers, cache.layers))


def test_symmetric_levels_round_to_a_scale_alone():
    """levels="symmetric": 2**bits levels (k + 1/2) * scale about zero, the outermost at the group's
    largest magnitude, within half a step of every entry; 2 bytes fewer a group than min-max."""
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    for bits in (2, 3, 4):
        stored = symmetric_quantize(x, bits)
        step = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 0.5)
        assert ((stored - x).abs() <= step / 2 + 1e-3 * step).all()
        assert all(row.unique().numel() <= 2**bits for row in stored)
        assert torch.allclose(stored.abs().amax(-1), x.abs().amax(-1), rtol=1e-3)  # the largest entry is a level
        assert token_bytes(bits, 64, "symmetric") == token_bytes(bits, 64) - 2


def test_symmetric_levels_store_fewer_bytes():
    model = build(tiny_llama_config())
    plain, symmetric = (QuantizedKVPress(bits=2, key_layout="token", rotate=True, levels=levels)
                        for levels in ("uniform", "symmetric"))
    caches = _prefill(model, plain), _prefill(model, symmetric)
    heads, dim = model.config.num_key_value_heads, model.config.head_dim
    tokens = caches[0].layers[0].keys.shape[2] - plain.recent_tokens
    # per layer: 2 bytes fewer for every quantized key and value group
    assert all(plain.stored_bytes[layer] - symmetric.stored_bytes[layer] == pytest.approx(2 * 2 * heads * tokens)
               for layer in plain.stored_bytes)
    assert not torch.equal(caches[0].layers[0].values, caches[1].layers[0].values)
    # RD-KV prices the cheaper groups: at the same budget it holds more tokens or bits, within the budget
    rdkv = RDKVPress(0.8, bits=(2, 3, 8), rotate=True, key_layout="token", window_size=8, levels="symmetric")
    cache = _prefill(model, rdkv)
    assert stored_bytes(rdkv, cache) <= 0.2 * fp16_kv_bytes(model.config, 96)
    uniform = RDKVPress(0.8, bits=(2, 3, 8), rotate=True, key_layout="token", window_size=8)
    _prefill(model, uniform)
    assert rdkv.chosen_bits != uniform.chosen_bits


@pytest.mark.parametrize("press", [RDKVPress, QuantizedKVPress])
@pytest.mark.parametrize("levels", ["gaussian", "symmetric"])
def test_gaussian_levels_need_rotated_groups(press, levels):
    with pytest.raises(PressConfigError, match="use rotate=True"):
        press(levels=levels)
    with pytest.raises(PressConfigError, match="levels must be one of uniform, gaussian, symmetric"):
        press(levels="nf4", rotate=True)


def test_output_head_weights_give_bytes_to_the_head_the_output_projection_amplifies():
    """head_weights="output": with the first KV head's query heads amplified 10x in o_proj, their
    values are stored more precisely than under uniform head weights (nothing evicted, the same
    bytes), and the heads' weights are their o_proj blocks' energies over the mean."""
    from presses.rdkv_press import output_head_weights

    config = tiny_llama_config()
    model = build(config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, : head_dim * heads // kv_heads] *= 10
    attention = model.model.layers[0].self_attn
    weights = output_head_weights(attention, heads, head_dim)
    blocks = attention.o_proj.weight.view(-1, heads, head_dim).pow(2).sum(dim=(0, 2))
    torch.testing.assert_close(weights, blocks / blocks.mean())
    dense = _prefill(model, RDKVPress(0.0))
    errors = {}
    for choice in ("uniform", "output"):
        press = RDKVPress(0.5, evict_weight=1e6, head_weights=choice, window_size=8)
        cache = _prefill(model, press)
        assert cache.layers[0].values.shape == dense.layers[0].values.shape  # nothing evicted
        errors[choice] = torch.stack([(cache.layers[i].values - dense.layers[i].values).pow(2).sum(dim=(0, 2, 3))
                                      for i in range(config.num_hidden_layers)]).sum(0)  # (kv_heads,)
    assert errors["output"][0] < 0.5 * errors["uniform"][0]
    assert errors["output"][1:].sum() > errors["uniform"][1:].sum()  # the bytes came from the other heads
    with pytest.raises(PressConfigError, match="head_weights"):
        RDKVPress(0.8, head_weights="bad")
