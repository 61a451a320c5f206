"""StreamingLLM with positions in the cache, LM-Infinite and TreeKV on tiny GPT-NeoX (partial
rotary) and tiny Llama: a budget at least the text is dense exactly, a tight one changes the
logits, the cache stays within budget, and every kept key is the direct key (from the weights,
rotated by the rotary's definition) at the position the method gives it."""

import random
from types import SimpleNamespace

import pytest
import torch
from kvpress import StreamingLLMPress
from transformers import DynamicCache

from evaluation.protocols import streaming_nll
from patches.gpt_neox import to_kvpress_order
from presses import Settings, make_press, make_streaming_press
from presses.budget_press import BudgetPress
from presses.lm_infinite_press import LMInfinitePress, shift_keys
from presses.treekv_press import TreeKVPress, _group_argmax, tree_groups
from tests.conftest import build, tiny_llama_config, tiny_neox_config
from tests.test_gpt_neox_patch import assert_kept_entries_are_dense_entries, neox_rotary

TEXT, CHUNK = 96, 8
CONFIGS = {"neox": tiny_neox_config, "llama": tiny_llama_config}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    return build(CONFIGS[request.param]())


@pytest.fixture(scope="module")
def ids():
    return torch.randperm(2000, generator=torch.Generator().manual_seed(3))[None, : TEXT + 1]  # no repeats


def llama_rotary(x, position, base=10000.0):
    half = x.shape[-1] // 2
    inv_freq = 1.0 / base ** (torch.arange(0, x.shape[-1], 2, dtype=torch.float32) / x.shape[-1])
    angle = position[:, None].float() * inv_freq[None, :]
    cos, sin = angle.cos(), angle.sin()
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def direct_keys_values(model, layer, hidden, positions):
    """Keys of ``hidden`` (1, T, hidden) rotated to ``positions`` (T,), in the cache's basis, and
    values; computed from the projection weights and the rotary's definition."""
    attention = model.model.layers[layer].self_attn
    if model.config.model_type == "gpt_neox":
        heads, head_dim = model.config.num_attention_heads, attention.head_size
        weight = attention.query_key_value.weight.view(heads, 3, head_dim, -1)
        bias = attention.query_key_value.bias.view(heads, 3, head_dim)
        qkv = torch.einsum("btc,hsdc->bhstd", hidden, weight) + bias[None, :, :, None, :]
        key = neox_rotary(qkv[:, :, 1], positions, attention.rotary_ndims)
        return to_kvpress_order(key, attention.rotary_ndims), qkv[:, :, 2]
    kv_heads, head_dim = model.config.num_key_value_heads, attention.head_dim
    key = (hidden @ attention.k_proj.weight.T).view(1, -1, kv_heads, head_dim).transpose(1, 2)
    value = (hidden @ attention.v_proj.weight.T).view(1, -1, kv_heads, head_dim).transpose(1, 2)
    return llama_rotary(key, positions), value


@torch.no_grad()
def stream(model, ids, press, in_cache=False, chunk=CHUNK):
    """Feed ids[:, :TEXT] in chunks as evaluation.protocols.streaming_nll does; return the logits,
    the cache, each layer's attention inputs for every token, and the cache lengths after calls."""
    hidden = {i: [] for i in range(len(model.model.layers))}
    held = []

    def capture(module, args, kwargs):
        hidden[module.layer_idx].append(kwargs["hidden_states"])

    def record(module, args, kwargs, output):
        held.append(kwargs["past_key_values"].layers[module.layer_idx].keys.shape[2])

    attentions = [layer.self_attn for layer in model.model.layers]
    hooks = [a.register_forward_pre_hook(capture, with_kwargs=True) for a in attentions]
    cache, logits = DynamicCache(), []
    with press(model) if press is not None else torch.no_grad():
        hooks += [a.register_forward_hook(record, with_kwargs=True) for a in attentions]  # after the press's
        for start in range(0, TEXT, chunk):
            first = cache.get_seq_length() if in_cache else start
            positions = torch.arange(first, first + chunk)[None]
            logits.append(model(ids[:, start : start + chunk], past_key_values=cache, position_ids=positions).logits)
    for hook in hooks:
        hook.remove()
    return torch.cat(logits, 1), cache, {i: torch.cat(h, 1) for i, h in hidden.items()}, held


def assert_cache_is(model, cache, hidden, tokens, positions):
    """Every layer holds the direct keys of ``tokens`` rotated to ``positions``, and their values."""
    tokens, positions = torch.as_tensor(tokens), torch.as_tensor(positions)
    for layer, cache_layer in enumerate(cache.layers):
        keys, values = direct_keys_values(model, layer, hidden[layer][:, tokens], positions)
        torch.testing.assert_close(cache_layer.keys, keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache_layer.values, values, rtol=1e-4, atol=1e-5)


# StreamingLLM: positions inside the cache (and its sink-less sliding-window control)


@pytest.mark.parametrize("n_sink", [4, 0])
def test_streaming_llm_rerotates_kept_keys_to_their_cache_slots(model, ids, n_sink):
    budget = 24
    press = BudgetPress(StreamingLLMPress(n_sink=n_sink), target_size=budget, positions_in_cache=True)
    logits, cache, hidden, held = stream(model, ids, press, in_cache=True)
    assert max(held) == budget and len(held) == 2 * TEXT // CHUNK
    kept = list(range(n_sink)) + list(range(TEXT - budget + n_sink, TEXT))
    assert_cache_is(model, cache, hidden, kept, range(budget))

    dense = stream(model, ids, None)[0]
    assert not torch.allclose(logits, dense)
    loose = BudgetPress(StreamingLLMPress(n_sink=n_sink), target_size=TEXT, positions_in_cache=True)
    assert torch.equal(stream(model, ids, loose, in_cache=True)[0], dense)


def test_sinks_matter_with_positions_in_cache(model, ids):
    with_sinks, without = (
        stream(model, ids, BudgetPress(StreamingLLMPress(n_sink=n), target_size=24, positions_in_cache=True), True)[0]
        for n in (4, 0)
    )
    assert not torch.allclose(with_sinks, without)


# LM-Infinite


def test_lm_infinite_streams_the_lambda_mask_with_capped_distances(model, ids):
    n_global, budget, limit = 4, 28, 32
    logits, cache, hidden, held = stream(model, ids, LMInfinitePress(n_global=n_global, distance_limit=limit,
                                                                      target_size=budget))
    assert max(held) == budget
    kept = torch.tensor(list(range(n_global)) + list(range(TEXT - budget + n_global, TEXT)))
    last_query = TEXT - 1  # positions were capped for the last call's queries
    shown = kept.clamp(min=last_query - limit)
    assert shown[:n_global].tolist() == [last_query - limit] * n_global and (last_query - shown).max() <= limit
    assert_cache_is(model, cache, hidden, kept, shown)

    # Without the cap (limit past the text) it is StreamingLLM's eviction with original positions.
    uncapped = stream(model, ids, LMInfinitePress(n_global=n_global, distance_limit=TEXT, target_size=budget))[0]
    sink_window = stream(model, ids, BudgetPress(StreamingLLMPress(n_sink=n_global), target_size=budget))[0]
    assert torch.equal(uncapped, sink_window) and not torch.allclose(uncapped, logits)

    dense = stream(model, ids, None)[0]
    loose = LMInfinitePress(n_global=n_global, distance_limit=TEXT, target_size=TEXT)
    assert torch.equal(stream(model, ids, loose)[0], dense)


def test_lm_infinite_prefill_keeps_global_and_recent_tokens_capped_for_the_next_token(model, ids):
    context, limit = 64, 16
    hidden, cache = {}, DynamicCache()
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda m, a, k: hidden.__setitem__(m.layer_idx, k["hidden_states"]), with_kwargs=True)
        for layer in model.model.layers]
    with torch.no_grad(), LMInfinitePress(0.5, n_global=4, distance_limit=limit)(model):
        model.model(input_ids=ids[:, :context], past_key_values=cache)
    for hook in hooks:
        hook.remove()
    kept = torch.tensor(list(range(4)) + list(range(context - 28, context)))
    assert_cache_is(model, cache, hidden, kept, kept.clamp(min=context - limit))

    dense = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=ids[:, :context], past_key_values=dense)
        unpressed = DynamicCache()
        with LMInfinitePress(0.0, distance_limit=limit)(model):
            model.model(input_ids=ids[:, :context], past_key_values=unpressed)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(dense.layers, unpressed.layers))


def test_lm_infinite_global_keys_do_not_drift_in_bfloat16():
    """Moving the global keys one position per decoded token, 600 times, in bfloat16: they stay
    one rounding away from the direct rotation (re-rotating the cached copy each step would not:
    Pythia's slowest rotary dims turn by less than a bfloat16 step)."""
    head_dim, rotary, steps, limit = 80, 20, 600, 8
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary, 2).float() / rotary)
    inv_freq = torch.cat([inv_freq, torch.zeros(head_dim // 2 - rotary // 2)])  # as the NeoX patch pads it
    module = SimpleNamespace(layer_idx=0, rotary_emb=SimpleNamespace(inv_freq=inv_freq))
    prerope = torch.randn(1, 2, steps, head_dim, generator=torch.Generator().manual_seed(0)) * 3

    def rotated(tokens, positions):
        return shift_keys(prerope[:, :, tokens], torch.as_tensor(positions), inv_freq)

    press, cache = LMInfinitePress(n_global=4, distance_limit=limit, target_size=12), DynamicCache()
    press.post_init_from_model(None)
    for t in range(steps):
        kwargs = {"past_key_values": cache, "position_ids": torch.tensor([[t]]), "cache_position": torch.tensor([t])}
        press.forward_pre_hook(module, (), kwargs)
        cache.update(rotated([t], [t]).bfloat16(), torch.zeros(1, 2, 1, head_dim, dtype=torch.bfloat16), 0)
        press.forward_hook(module, (), kwargs, None)
    expected = rotated(range(4), [steps - 1 - limit] * 4)
    error = (cache.layers[0].keys[:, :, :4].float() - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert error.max() < 1e-2


# TreeKV


def test_tree_groups_merge_older_tokens_more():
    # 4 tree slots, 6 arrivals: [ab c d e] -> [ab cd e f] -> ... -> [abcd efgh i j]
    assert tree_groups(4, 6, 0) == ((0, 0, 0, 0, 1, 1, 1, 1, 2, 3), 2)
    assert tree_groups(4, 0, 3) == ((0, 1, 2, 3), 3)


def test_group_argmax_is_algorithm_1_with_fixed_scores():
    """The groups' argmax equals evicting pair by pair as Algorithm 1 states it (ties included)."""
    rng = random.Random(0)
    for _ in range(50):
        slots, arrivals, pointer = rng.randint(1, 6), rng.randint(0, 20), rng.randint(0, 5) % 6
        pointer %= slots
        scores = [float(rng.randint(0, 3)) for _ in range(slots + arrivals)]
        cache, p = list(range(slots)), pointer
        for token in range(slots, slots + arrivals):
            cache.append(token)
            evicted = p + 1 if scores[cache[p]] > scores[cache[p + 1]] else p
            del cache[evicted]
            p = (p + 1) % slots
        groups, new_pointer = tree_groups(slots, arrivals, pointer)
        winners = _group_argmax(torch.tensor(scores)[None], torch.tensor(groups), slots)[0]
        assert winners.tolist() == cache and new_pointer == p


def test_treekv_streams_at_budget_with_positions_in_cache(model, ids):
    budget, n_sink = 24, 4
    press = BudgetPress(TreeKVPress(n_sink=n_sink), target_size=budget, positions_in_cache=True)
    logits, cache, hidden, held = stream(model, ids, press, in_cache=True, chunk=4)
    assert max(held) == budget and len(held) == 2 * TEXT // 4
    assert not press.base_press._sum  # state cleared on exit
    recent = budget - n_sink - budget // 2
    for layer, cache_layer in enumerate(cache.layers):
        # Which token each slot holds: the direct key at that slot's position that matches.
        keys, values = direct_keys_values(model, layer, hidden[layer], torch.arange(TEXT))
        tokens = []
        for slot in range(budget):
            candidates, _ = direct_keys_values(model, layer, hidden[layer], torch.full((TEXT,), slot))
            error = (candidates - cache_layer.keys[:, :, slot, None]).abs().amax(-1)  # (1, kv_heads, TEXT)
            token = error.argmin(-1)[0]  # per kv head
            assert error[0].gather(-1, token[:, None]).max() < 1e-4
            torch.testing.assert_close(cache_layer.values[0, :, slot], values[0, torch.arange(len(token)), token])
            tokens.append(token)
        tokens = torch.stack(tokens, -1)  # (kv_heads, budget): the token in each slot
        assert (tokens.diff(dim=-1) > 0).all(), "cache order is text order"
        assert (tokens[:, :n_sink] == torch.arange(n_sink)).all()
        assert (tokens[:, budget - recent :] == torch.arange(TEXT - recent, TEXT)).all()

    dense = stream(model, ids, None, chunk=4)[0]
    assert not torch.allclose(logits, dense)
    loose = BudgetPress(TreeKVPress(n_sink=n_sink), target_size=TEXT, positions_in_cache=True)
    assert torch.equal(stream(model, ids, loose, in_cache=True, chunk=4)[0], dense)


def test_treekv_prefill_keeps_dense_entries_sinks_and_recent(model, ids):
    caches = []
    for press in (None, TreeKVPress(0.5, n_sink=4, window=8), TreeKVPress(0.0)):
        cache = DynamicCache()
        with torch.no_grad(), press(model) if press is not None else torch.no_grad():
            model.model(input_ids=ids[:, :64], past_key_values=cache)
        caches.append(cache)
    dense, pressed, at_zero = caches
    assert [layer.keys.shape[2] for layer in pressed.layers] == [32] * len(dense.layers)
    assert_kept_entries_are_dense_entries(dense, pressed)
    for dense_layer, layer in zip(dense.layers, pressed.layers):
        for token in [0, 1, 2, 3] + list(range(64 - 12, 64)):  # 4 sinks + 12 recent (32 = 4 + 16 tree + 12)
            assert (layer.keys == dense_layer.keys[:, :, token, None]).all(-1).any(-1).all()
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(dense.layers, at_zero.layers))


# Through the perplexity protocol (and the registry, once the names are registered there)


def test_streaming_protocol_runs_the_new_presses(ids):
    model = build(tiny_neox_config())
    text = ids[0]
    dense = streaming_nll(model, text, None, chunk_tokens=CHUNK)
    presses = [
        LMInfinitePress(n_global=4, distance_limit=32, target_size=28),
        BudgetPress(TreeKVPress(n_sink=4), target_size=28, positions_in_cache=True),
    ]
    for press in presses:
        result = streaming_nll(model, text, press, chunk_tokens=CHUNK)
        assert result.tokens == dense.tokens and result.nll_sum != dense.nll_sum
        assert result.cache_tokens <= 28


@pytest.mark.parametrize("name", ["streaming_llm", "sliding_window", "lm_infinite", "treekv"])
def test_registered_presses(name, ids):
    model = build(tiny_llama_config())
    text = ids[0]
    dense = streaming_nll(model, text, None, chunk_tokens=CHUNK)
    tight = make_streaming_press(name, Settings(budget=28, chunk_tokens=CHUNK))
    assert streaming_nll(model, text, tight, chunk_tokens=CHUNK).nll_sum != dense.nll_sum
    loose = make_streaming_press(name, Settings(budget=TEXT, chunk_tokens=CHUNK))
    assert streaming_nll(model, text, loose, chunk_tokens=CHUNK).nll_sum == dense.nll_sum
    assert make_press(name, 0.5) is not None
