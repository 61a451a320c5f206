"""Cross-layer KV methods (MiniCache merging, KVSharer sharing) on tiny random GPT-NeoX and Llama:
settings that merge or share nothing are dense exactly, merged and shared layers really hold
fewer bytes, decoding after the merge or share follows each method's rule, the calibration
follows KVSharer's ranking, and both compose with per-layer presses as documented."""

import math

import pytest
import torch
from kvpress import ComposedPress, SnapKVPress, StreamingLLMPress
from transformers import DynamicCache

from decoding.kv_cache import kv_bytes
from evaluation.calibration import needing_calibration
from presses import PressConfigError, make_press, make_streaming_press
from presses.cross_layer_cache import MergedLayer, SharedLayer
from presses.kvsharer_press import KVSharerPress
from presses.minicache_press import MiniCachePress, merge
from tests.conftest import build, tiny_llama_config, tiny_neox_config

CONFIGS = {"neox": tiny_neox_config, "llama": tiny_llama_config}
IDS = torch.randint(0, 2000, (1, 48), generator=torch.Generator().manual_seed(0))
CONTEXT = 40  # prefilled with the press; the other 8 tokens are decoded one by one after it
models = pytest.mark.parametrize("model_name", CONFIGS)


def four_layer_model(model_name):
    return build(CONFIGS[model_name](num_hidden_layers=4), attn_implementation="sdpa")


@torch.no_grad()
def prefill_then_decode(model, press=None, cache=None):
    """Prefill IDS[:CONTEXT] (with ``press``), then decode the rest one token per call (press
    off, as kvpress's pipeline does). Returns the decode logits, the prefill's last hidden
    state and the cache."""
    cache = DynamicCache() if cache is None else cache
    if press is None:
        hidden = model.model(input_ids=IDS[:, :CONTEXT], past_key_values=cache).last_hidden_state
    else:
        with press(model):
            hidden = model.model(input_ids=IDS[:, :CONTEXT], past_key_values=cache).last_hidden_state
    logits = [model(input_ids=IDS[:, p : p + 1], past_key_values=cache, position_ids=torch.tensor([[p]])).logits
              for p in range(CONTEXT, IDS.shape[1])]
    return torch.cat(logits, dim=1), hidden, cache


@models
@pytest.mark.parametrize("press", [lambda: MiniCachePress(0.0), lambda: MiniCachePress(0.5, gamma=1.0),
                                   lambda: KVSharerPress(0.0), lambda: KVSharerPress(sharing={})])
def test_no_merge_and_no_share_settings_are_dense_exactly(model_name, press):
    # MiniCache with gamma 1 merges every layer but retains every token exactly: the restore path
    # (direction x magnitude, retained tokens written over it) must give back the dense cache.
    model = four_layer_model(model_name)
    dense, _, _ = prefill_then_decode(model)
    pressed, _, cache = prefill_then_decode(model, press())
    assert torch.equal(pressed, dense)


def test_merge_of_identical_layers_restores_them_and_retains_the_most_distant_tokens():
    a = torch.randn(2, 3, 10, 16, generator=torch.Generator().manual_seed(1))
    merged = merge(a, a.clone(), t=0.5, gamma=0.0)
    assert merged.retained_index.shape[-1] == 0
    torch.testing.assert_close(merged.restore(0), a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged.restore(1), a, rtol=1e-6, atol=1e-6)

    b = a.clone()
    b[:, :, 7] = -a[:, :, 7]  # token 7 points the opposite way in layer b: angular distance 1
    merged = merge(a, b, t=0.5, gamma=0.05)
    assert (merged.retained_index == 7).all()  # every head retains exactly token 7 (the others: distance 0)
    torch.testing.assert_close(merged.restore(1), b, rtol=1e-6, atol=1e-6)


def test_slerp_direction_is_halfway_on_the_sphere():
    a = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    b = torch.tensor([0.0, 2.0]).view(1, 1, 1, 2)
    merged = merge(a, b, t=0.5, gamma=0.0)
    torch.testing.assert_close(merged.direction.flatten(), torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(merged.restore(1).flatten(), torch.tensor([2.0, 2.0]) / math.sqrt(2))  # b's norm 2


@models
def test_minicache_holds_one_direction_per_pair_and_decodes_from_the_restored_cache(model_name):
    model = four_layer_model(model_name)
    _, _, dense_cache = prefill_then_decode(model)
    press = MiniCachePress(0.25, gamma=0.0)  # 4 layers: one pair, layers 2 and 3
    logits, _, cache = prefill_then_decode(model, press)
    assert press.merged_layers == [2, 3]
    assert [type(layer) for layer in cache.layers] == [type(dense_cache.layers[0])] * 2 + [MergedLayer] * 2

    # Bytes: layers 0-1 dense; the pair holds one direction per token, two norms per token and
    # head for each layer, no retained token (gamma 0), and each layer's 8 decoded tokens unmerged.
    batch, heads, _, dim = dense_cache.layers[0].keys.shape
    item = dense_cache.layers[0].keys.element_size()
    per_layer = lambda tokens: 2 * batch * heads * tokens * dim * item  # noqa: E731  keys + values
    pair = per_layer(CONTEXT) + 2 * 2 * batch * heads * CONTEXT * item
    decoded = IDS.shape[1] - CONTEXT
    assert kv_bytes(cache) == 2 * per_layer(IDS.shape[1]) + pair + 2 * per_layer(decoded)
    assert kv_bytes(cache) < kv_bytes(dense_cache)

    # The rule at decode time: attention sees the restored pair followed by the new tokens,
    # i.e. the same logits as a plain cache holding the restored keys/values after prefill.
    restored = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=IDS[:, :CONTEXT], past_key_values=restored)
    lower, upper = restored.layers[2], restored.layers[3]
    keys, values = merge(lower.keys, upper.keys, 0.5, 0.0), merge(lower.values, upper.values, 0.5, 0.0)
    lower.keys, lower.values = keys.restore(0), values.restore(0)
    upper.keys, upper.values = keys.restore(1), values.restore(1)
    expected = torch.cat([model(input_ids=IDS[:, p : p + 1], past_key_values=restored,
                                position_ids=torch.tensor([[p]])).logits for p in range(CONTEXT, IDS.shape[1])], 1)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert cache.layers[3].tail_keys.shape[2] == decoded


@models
def test_kvsharer_shared_layers_hold_nothing_and_read_their_source(model_name):
    model = four_layer_model(model_name)
    dense, _, dense_cache = prefill_then_decode(model)
    press = KVSharerPress(sharing={2: 0, 3: 1})
    logits, _, cache = prefill_then_decode(model, press)
    assert isinstance(cache.layers[2], SharedLayer) and cache.layers[3].keys is cache.layers[1].keys
    assert kv_bytes(cache) * 2 == kv_bytes(dense_cache)
    assert cache.get_seq_length(3) == IDS.shape[1] and not torch.equal(logits, dense)

    # The rule holds at every position: prefill + decode with sharing equals one forward pass
    # over the whole text with sharing.
    with torch.no_grad(), press(model):
        whole = model(input_ids=IDS, past_key_values=DynamicCache()).logits[:, CONTEXT - 1 : -1]
    torch.testing.assert_close(logits[:, :-1], whole[:, 1:], rtol=1e-4, atol=1e-4)


def test_kvsharer_calibration_tries_the_most_dissimilar_pair_first():
    model = four_layer_model("llama")
    ids = torch.randint(0, 2000, (256,), generator=torch.Generator().manual_seed(2))
    cache = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=ids.view(-1, 64), past_key_values=cache)
    mean = [(layer.keys.mean(0), layer.values.mean(0)) for layer in cache.layers]
    distance = {(i, j): ((mean[i][0] - mean[j][0]).norm(dim=-1).mean() + (mean[i][1] - mean[j][1]).norm(dim=-1).mean())
                for j in range(4) for i in range(j)}
    farthest, nearest = max(distance, key=distance.get), min(distance, key=distance.get)

    accept_all = KVSharerPress(0.25, threshold=-1.0)  # 4 layers x 0.25: one shared layer
    facts = accept_all.calibrate(model, ids)
    assert accept_all.sharing == {farthest[1]: farthest[0]} and facts["calibration_checks"] == 1
    similar = KVSharerPress(0.25, threshold=-1.0, most_similar_first=True)
    similar.calibrate(model, ids)
    assert similar.sharing == {nearest[1]: nearest[0]}
    reject_all = KVSharerPress(0.25, threshold=1.01)  # cosine never exceeds 1: every pair is tried, none kept
    assert reject_all.calibrate(model, ids)["calibration_checks"] == 6 and reject_all.sharing == {}


@models
def test_kvsharer_composes_with_snapkv_after_it(model_name):
    model = four_layer_model(model_name)
    _, shared_hidden, _ = prefill_then_decode(model, KVSharerPress(sharing={3: 1}))
    _, _, snapkv_cache = prefill_then_decode(model, SnapKVPress(0.5, window_size=8))
    composed = ComposedPress([KVSharerPress(sharing={3: 1}), SnapKVPress(0.5, window_size=8)])
    _, hidden, cache = prefill_then_decode(model, composed)
    # Layer 3's prefill attention read layer 1's whole cache, recorded before SnapKV shortened it.
    assert torch.equal(hidden, shared_hidden)
    assert cache.layers[3].keys is cache.layers[1].keys and cache.get_seq_length(3) == CONTEXT // 2 + 8
    assert kv_bytes(cache) * 4 == kv_bytes(snapkv_cache) * 3


@models
def test_minicache_composes_with_streaming_llm_before_it(model_name):
    # StreamingLLM keeps the same tokens in every layer, so the pair's slots line up; with every
    # token retained (gamma 1) the composition must equal StreamingLLM alone.
    model = four_layer_model(model_name)
    alone, _, _ = prefill_then_decode(model, StreamingLLMPress(0.5, n_sink=4))
    composed = ComposedPress([StreamingLLMPress(0.5, n_sink=4), MiniCachePress(0.5, gamma=1.0)])
    logits, _, cache = prefill_then_decode(model, composed)
    assert all(isinstance(layer, MergedLayer) for layer in cache.layers)
    assert torch.equal(logits, alone)
    with pytest.raises(RuntimeError, match="before MiniCachePress"):
        prefill_then_decode(model, ComposedPress([MiniCachePress(0.5), StreamingLLMPress(0.5)]))


def test_registry_names_settings_and_calibration():
    combo = make_press("kvsharer_snapkv", 0.5)
    kept = (1 - combo.presses[0].compression_ratio) * (1 - combo.presses[1].compression_ratio)
    assert needing_calibration(combo) == [combo.presses[0]] and kept == pytest.approx(0.5)
    assert needing_calibration(make_press("minicache", 0.25)) == []
    with pytest.raises(PressConfigError, match="at most half"):
        make_press("minicache", 0.6)
    with pytest.raises(PressConfigError, match="no streaming form"):
        make_streaming_press("kvsharer")
    with pytest.raises(ValueError, match="calibrate"):
        prefill_then_decode(four_layer_model("neox"), make_press("kvsharer", 0.5))
