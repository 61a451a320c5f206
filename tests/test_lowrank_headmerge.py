"""Low-rank KV (Palu) and KV head merging on tiny GPT-NeoX (Pythia's partial rotary) and Llama
(GQA): full rank / no merge is dense, the low-rank cache's error is exactly the discarded
singular values' energy, the cache really holds fewer bytes, head groups follow the similarity
rule, and low-rank composes after SnapKV."""

from types import SimpleNamespace

import pytest
import torch
from kvpress import ComposedPress, SnapKVPress
from transformers import DynamicCache

from decoding.kv_cache import kv_bytes
from evaluation.calibration import calibrated
from presses import PressConfigError, Settings, make_press
from presses.head_merge_press import HeadMergePress, MergedHeadsLayer, merge_heads
from presses.lowrank_press import LowRankLayer, LowRankPress
from presses.reconstructed_layer import dense_cache
from tests.conftest import build, tiny_llama_config, tiny_neox_config

IDS = torch.randint(0, 2000, (1, 72), generator=torch.Generator().manual_seed(0))
CALIBRATION = torch.randint(0, 2000, (96,), generator=torch.Generator().manual_seed(1))
CONTEXT = 56  # prefilled with the press; the remaining 16 tokens are decoded through the pressed cache
CONFIGS = {"neox": tiny_neox_config, "llama": tiny_llama_config}
on_both = pytest.mark.parametrize("model_name", CONFIGS)


@torch.no_grad()
def prefill_then_decode(model, press=None):
    """The cache after a pressed prefill of IDS[:, :CONTEXT] and the logits of the remaining
    tokens, fed one at a time through it (so every decoded token is stored by the press's layer)."""
    cache = DynamicCache()
    if press is not None:
        with press(model):
            model.model(input_ids=IDS[:, :CONTEXT], past_key_values=cache)
    else:
        model.model(input_ids=IDS[:, :CONTEXT], past_key_values=cache)
    logits = [model(input_ids=IDS[:, [t]], past_key_values=cache, position_ids=torch.tensor([[t]])).logits
              for t in range(CONTEXT, IDS.shape[1])]
    return cache, torch.cat(logits, dim=1)


def fitted(press, model):
    press.calibrate(model, CALIBRATION)
    return press


@on_both
@pytest.mark.parametrize("basis", ["activations", "weights"])
def test_full_rank_is_dense_to_float32_round_off(model_name, basis):
    model = build(CONFIGS[model_name](), attn_implementation="sdpa")
    _, dense = prefill_then_decode(model)
    press = fitted(LowRankPress(0.0, basis=basis), model)
    cache, logits = prefill_then_decode(model, press)
    assert all(isinstance(layer, LowRankLayer) for layer in cache.layers)
    head_dim, rotary = 16, (4 if model_name == "neox" else 16)
    assert press.ranks == [(head_dim - rotary, head_dim)] * 2
    # Full rank is an orthogonal change of basis and back: equal up to float32 rounding of two
    # 16-dim matmuls (~1e-7 relative on the cache), which the logits show as ~1e-6.
    torch.testing.assert_close(logits, dense, rtol=0, atol=1e-5)


@on_both
def test_reconstruction_error_is_the_discarded_singular_values(model_name):
    """Feed the layer the keys and values of hidden states = the identity (one token per hidden
    dim): its squared reconstruction error must be the sum of the discarded squared singular
    values of each head's projection (Eckart-Young), computed here independently."""
    model = build(CONFIGS[model_name](), attn_implementation="sdpa")
    press = LowRankPress(0.3, basis="weights")
    press.post_init_from_model(model)
    attention = model.model.layers[0].self_attn
    heads, head_dim = press.bases[0].value_basis.shape[:2]
    eye = torch.eye(model.config.hidden_size).unsqueeze(0)

    def per_head(projection, hidden):  # (1, heads, hidden, head_dim), keys in the cache's basis on NeoX
        return projection(hidden).view(1, -1, heads, head_dim).transpose(1, 2)

    with torch.no_grad():
        keys, values = per_head(attention.k_proj, eye), per_head(attention.v_proj, eye)
        key_bias, value_bias = per_head(attention.k_proj, 0 * eye), per_head(attention.v_proj, 0 * eye)
    layer = LowRankLayer(press.bases[0], keys, values)
    key_rank, value_rank = press.ranks[0]
    passthrough, rotary = press.bases[0].passthrough, press.bases[0].rotary

    def discarded(weights, rank):
        return (torch.linalg.svdvals(weights.double())[..., rank:] ** 2).sum().item()

    value_error = ((layer.values - values).double() ** 2).sum().item()
    assert value_error == pytest.approx(discarded(values - value_bias, value_rank), rel=1e-4)
    assert 0 < value_rank < head_dim and value_error > 0
    key_error = ((layer.keys - keys)[..., passthrough].double() ** 2).sum().item()
    assert key_error == pytest.approx(discarded((keys - key_bias)[..., passthrough], key_rank), rel=1e-4, abs=1e-9)
    assert torch.equal(layer.keys[..., rotary], keys[..., rotary])  # rotary dims are kept as they are
    held = sum(t.numel() for t in layer.held_tensors())
    assert held == heads * eye.shape[1] * (len(rotary) + key_rank + value_rank)


@on_both
def test_calibrated_basis_error_on_its_text_is_the_discarded_eigenvalues(model_name):
    """basis="activations": on the calibration text itself, the squared reconstruction error of
    the values (and pass-through key dims) is the sum of the discarded eigenvalues of X^T X per
    head, X the projection's outputs without bias (Eckart-Young on the data)."""
    model = build(CONFIGS[model_name](), attn_implementation="sdpa")
    press = fitted(LowRankPress(0.3), model)
    cache = dense_cache(model, CALIBRATION)
    for index, dense_layer in enumerate(cache.layers):
        basis, (key_rank, value_rank) = press.bases[index], press.ranks[index]
        layer = LowRankLayer(basis, dense_layer.keys, dense_layer.values)
        for mine, full, bias, rank, dims in (
                (layer.values, dense_layer.values, basis.value_bias, value_rank, slice(None)),
                (layer.keys, dense_layer.keys, basis.key_bias, key_rank, basis.passthrough)):
            x = (full[0][..., dims] - bias.unsqueeze(1)).double()
            discarded = torch.linalg.eigvalsh(x.transpose(-1, -2) @ x).flip(-1)[..., rank:].sum().item()
            error = ((mine - full)[0][..., dims].double() ** 2).sum().item()
            assert error == pytest.approx(discarded, rel=1e-3, abs=1e-6)
        assert 0 < value_rank < 16


@on_both
def test_lowrank_cache_holds_the_ratio_of_the_bytes(model_name):
    model = build(CONFIGS[model_name](), attn_implementation="sdpa")
    dense_cache, dense = prefill_then_decode(model)
    ratio = 0.5 if model_name == "neox" else 0.25  # Llama: values only, at most just under half
    cache, logits = prefill_then_decode(model, fitted(LowRankPress(ratio), model))
    assert kv_bytes(cache) == pytest.approx((1 - ratio) * kv_bytes(dense_cache), rel=1 / 64)
    assert cache.get_seq_length() == dense_cache.get_seq_length() and not torch.allclose(logits, dense, atol=1e-3)


def test_lowrank_refuses_a_ratio_beyond_the_rotary_dims():
    model = build(tiny_llama_config())
    with pytest.raises(PressConfigError, match="must be below 0.500"):
        fitted(LowRankPress(0.6), model)


@on_both
def test_no_merge_is_dense_exactly(model_name):
    model = build(CONFIGS[model_name](), attn_implementation="sdpa")
    _, dense = prefill_then_decode(model)
    press = fitted(HeadMergePress(0.0), model)
    cache, logits = prefill_then_decode(model, press)
    assert all(isinstance(layer, MergedHeadsLayer) for layer in cache.layers)
    assert torch.equal(logits, dense)


@on_both
def test_merged_layers_hold_one_mean_key_and_value_per_group(model_name):
    model = build(CONFIGS[model_name](), attn_implementation="sdpa")
    dense_cache, _ = prefill_then_decode(model)
    press = fitted(HeadMergePress(0.5), model)
    cache, _ = prefill_then_decode(model, press)
    assert sum(len(g.unique()) for g in press.groups) == sum(len(g) for g in press.groups) // 2
    assert kv_bytes(cache) == kv_bytes(dense_cache) // 2
    for layer, dense_layer, group_of in zip(cache.layers, dense_cache.layers, press.groups):
        for group in group_of.unique():
            members = (group_of == group).nonzero().flatten()
            for mine, full in ((layer.keys, dense_layer.keys), (layer.values, dense_layer.values)):
                # Prefill tokens: the mean of the members' dense entries (each layer's prefill
                # attention ran before the merge; decoded tokens differ, as merging changed them).
                expected = full[:, members, :CONTEXT].mean(1, keepdim=True).expand(-1, len(members), -1, -1)
                torch.testing.assert_close(mine[:, members, :CONTEXT], expected, rtol=1e-5, atol=1e-6)


def test_groups_merge_the_most_similar_heads_first_over_all_layers():
    similar = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])
    apart = torch.tensor([[1.0, 0.3, 0.4], [0.3, 1.0, 0.5], [0.4, 0.5, 1.0]])
    one_merge = merge_heads([similar, apart], 5)
    assert [g.tolist() for g in one_merge] == [[0, 0, 1], [0, 1, 2]]
    # Next: average linkage of {0,1} with 2 is 0.15; layer 1's best pair (1, 2) has 0.5.
    assert [g.tolist() for g in merge_heads([similar, apart], 4)] == [[0, 0, 1], [0, 1, 1]]
    assert [g.tolist() for g in merge_heads([similar, apart], 1)] == [[0, 0, 0], [0, 0, 0]]  # one group per layer at least


def test_calibration_groups_heads_before_the_cli_runs_a_press():
    model = build(tiny_neox_config())
    press = calibrated(ComposedPress([make_press("head_merge", 0.5)]), SimpleNamespace(model=model), True, seed=0)
    assert all(len(g) == 4 for g in press.presses[0].groups)


@on_both
def test_snapkv_then_lowrank_composes(model_name):
    """snapkv_lowrank at 0.5: SnapKV removes 1 - sqrt(0.5) of the tokens, then the latent the same
    share of the bytes of the tokens kept."""
    model = build(CONFIGS[model_name](), attn_implementation="sdpa")
    each = 1 - 0.5**0.5
    snap_cache, _ = prefill_then_decode(model, SnapKVPress(each, window_size=8))
    composed = make_press("snapkv_lowrank", 0.5, Settings(window=8))
    assert isinstance(composed, ComposedPress)
    fitted(composed.presses[1], model)
    cache, _ = prefill_then_decode(model, composed)
    lowrank, kept = composed.presses[1], int(CONTEXT * (1 - each))
    assert cache.get_seq_length() == snap_cache.get_seq_length() == kept + IDS.shape[1] - CONTEXT
    assert kv_bytes(cache) == pytest.approx((1 - each) * kv_bytes(snap_cache), rel=1 / 64)
    for index, (layer, snap_layer) in enumerate(zip(cache.layers, snap_cache.layers)):
        # SnapKV chose the same tokens; low-rank then stored them as latents.
        expected = LowRankLayer(lowrank.bases[index], snap_layer.keys[:, :, :kept], snap_layer.values[:, :, :kept])
        torch.testing.assert_close(layer.keys[:, :, :kept], expected.keys)
        torch.testing.assert_close(layer.values[:, :, :kept], expected.values)
