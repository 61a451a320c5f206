"""Streaming at equal bytes: RD-KV re-allocating a layer's cache under its byte budget
(RDKVBudgetPress), the quantized eviction baselines (QuantizedBudgetPress) and the stored-width
state they share (presses/stored_kv.py), on tiny GPT-NeoX (Pythia's partial rotary) and Llama
(GQA) models."""

from dataclasses import replace

import pytest
import torch

from evaluation.protocols import streaming_nll
from presses import Settings, make_streaming_press
from presses.attention import per_kv_head
from presses.errors import PressConfigError
from presses.quantize import quantize_per_token
from presses.quantized_budget_press import QuantizedBudgetPress
from presses.rdkv_budget_press import RDKVBudgetPress
from presses.rdkv_press import RDKVPress
from presses.stored_kv import StoredLayer, narrowed
from tests.conftest import build, tiny_llama_config, tiny_neox_config

CONFIGS = [tiny_neox_config(), tiny_llama_config()]
IDS = ["neox", "llama"]


def _text(tokens: int = 400) -> torch.Tensor:
    return torch.randint(0, 1000, (tokens,), generator=torch.Generator().manual_seed(3))


def _stream(model, press, chunk: int = 32, tokens: int = 400):
    """The streaming run, and after every call each layer's (stored bytes, state, keys, values)."""
    snapshots = []

    def after_call(module, inputs, kwargs, output):
        cache = kwargs["past_key_values"]
        snapshots.append({index: (press.stored_bytes[index], replace(press.layers[index]), layer.keys.clone(),
                                  layer.values.clone()) for index, layer in enumerate(cache.layers)})

    hook = model.register_forward_hook(after_call, with_kwargs=True)
    try:
        return streaming_nll(model, _text(tokens), press, chunk), snapshots
    finally:
        hook.remove()


def _budget_bytes(config, budget_tokens: int) -> int:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return budget_tokens * heads * 2 * 2 * (config.hidden_size // config.num_attention_heads)


def _presses(budget: int):
    return [RDKVBudgetPress(RDKVPress(), budget_tokens=budget),
            RDKVBudgetPress(RDKVPress(key_layout="token", evict_per_head=True), budget_tokens=budget),
            RDKVBudgetPress(RDKVPress(bits=(2, 4), separate_widths=False, group_tokens=8), budget_tokens=budget),
            QuantizedBudgetPress(make_streaming_press("h2o", Settings(budget=budget)).base_press, bits=4,
                                 budget_tokens=budget, recent_tokens=16, group_tokens=8),
            QuantizedBudgetPress(make_streaming_press("streaming_llm", Settings(budget=budget)).base_press, bits=2,
                                 key_layout="token", budget_tokens=budget, recent_tokens=16)]


def test_a_layers_bytes_count_each_width_and_each_group_as_it_falls():
    head_dim = 8
    state = StoredLayer.empty(2, "cpu")
    state.grow(5)
    state.key_bits = torch.tensor([[16, 4, 4, 2, 8], [16, 16, 4, 4, 4]])
    state.value_bits = torch.tensor([[16, 4, 4, 2, 2], [16, 8, 4, 4, 4]])
    state.key_group = torch.tensor([[-1, 0, 0, -1, 1], [-1, -1, 2, 2, 3]])
    fp16 = 2 * head_dim
    values = 2 * fp16 + 3 * (head_dim * 4 / 8 + 4) + 2 * (head_dim * 2 / 8 + 4) + 1 * (head_dim * 8 / 8 + 4) + \
        2 * (head_dim * 4 / 8 + 4)
    keys = 3 * fp16 + 5 * head_dim * 4 / 8 + head_dim * 8 / 8 + (head_dim * 2 / 8 + 4)  # the 2-bit key per token
    groups = 4 * head_dim * 4  # four groups: one scale and zero point per channel each
    assert state.nbytes(head_dim) == pytest.approx(values + keys + groups)
    assert state.nbytes(head_dim, tag_bytes=0.5) == pytest.approx(values + keys + groups + 0.5 * 10)
    state.stats = (torch.zeros(1, 2, 1, head_dim), torch.ones(1, 2, 1, head_dim))
    assert state.nbytes(head_dim) == pytest.approx(values + keys + groups + 2 * head_dim * 4)


def test_narrowing_keeps_a_tokens_width_bit_for_bit_and_refuses_to_widen():
    keys, values = torch.randn(1, 1, 40, 8), torch.randn(1, 1, 40, 8)
    state = StoredLayer.empty(1, "cpu")
    state.grow(40)
    four = torch.full((1, 40), 4)
    stored_keys, stored_values, stored = narrowed(keys, values, state, four, four, "channel", 16)
    assert (stored.key_group[0, :32] >= 0).all() and (stored.key_group[0, 32:] == -1).all()  # two groups, 8 per token
    assert stored.stats is not None  # the per-token rest needed the channel statistics
    narrower = four.clone()
    narrower[0, :3] = 2
    again_keys, again_values, again = narrowed(stored_keys, stored_values, stored, narrower, narrower, "channel", 16)
    assert torch.equal(again_keys[:, :, 3:], stored_keys[:, :, 3:]) and torch.equal(again_values[:, :, 3:],
                                                                                     stored_values[:, :, 3:])
    assert torch.equal(again_values[:, :, :3], quantize_per_token(stored_values[:, :, :3], 2))  # from the stored values
    assert not torch.equal(again_keys[:, :, :3], stored_keys[:, :, :3])
    assert (again.key_group[0, 3:] == stored.key_group[0, 3:]).all() and (again.key_group[0, :3] == -1).all()
    with pytest.raises(ValueError, match="widen"):
        narrowed(again_keys, again_values, again, four, four, "channel", 16)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_the_store_never_exceeds_its_budget_and_holds_more_tokens_than_fp16_would(config):
    model, budget = build(config), 64
    for press in _presses(budget):
        _, snapshots = _stream(model, press, tokens=417)  # whole calls: a shorter last one would allocate with slack
        held = [layer[0] for snapshot in snapshots for layer in snapshot.values()]
        assert max(held) <= _budget_bytes(config, budget), press
        assert max(held) > 0.95 * _budget_bytes(config, budget), press  # it spends the budget
        cached = [layer[2].shape[2] for layer in snapshots[-1].values()]
        assert min(cached) > 1.2 * budget, press  # low-bit tokens: more of them than fp16 holds in the bytes
        for stored_bytes, state, keys, _ in snapshots[-1].values():
            assert state.index.shape == keys.shape[1:3] and stored_bytes == state.nbytes(keys.shape[-1],
                                                                                          getattr(press, "tag_bytes", lambda: 0)())


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_a_stored_token_that_keeps_its_width_keeps_its_values_bit_for_bit(config):
    model = build(config)
    for press in _presses(64):
        _, snapshots = _stream(model, press)
        quantized_kept = 0
        for before, after in zip(snapshots, snapshots[1:]):
            for layer in before:
                _, old, old_keys, old_values = before[layer]
                _, new, new_keys, new_values = after[layer]
                for head in range(old.index.shape[0]):
                    # the tokens of this head in both caches, matched by their place in the text
                    common, old_at, new_at = (torch.tensor(x) for x in _matches(old.index[head], new.index[head]))
                    if common.numel() == 0:
                        continue
                    same_key = old.key_bits[head, old_at] == new.key_bits[head, new_at]
                    same_value = old.value_bits[head, old_at] == new.value_bits[head, new_at]
                    assert (new.key_bits[head, new_at] <= old.key_bits[head, old_at]).all()  # never wider
                    assert torch.equal(old_keys[0, head, old_at[same_key]], new_keys[0, head, new_at[same_key]])
                    assert torch.equal(old_values[0, head, old_at[same_value]], new_values[0, head, new_at[same_value]])
                    quantized_kept += int((same_key & (old.key_bits[head, old_at] < 16)).sum())
        assert quantized_kept > 0, press  # stored low-bit tokens were carried across allocations


def _matches(old: torch.Tensor, new: torch.Tensor):
    """Text indices in both, and their places in ``old`` and in ``new``."""
    where_old = {int(index): place for place, index in enumerate(old)}
    pairs = [(int(index), where_old[int(index)], place) for place, index in enumerate(new) if int(index) in where_old]
    return tuple(zip(*pairs)) if pairs else ((), (), ())


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_a_budget_above_the_text_is_dense_exactly_and_a_small_one_changes_the_scores(config):
    model = build(config)
    dense = streaming_nll(model, _text(), None, 32)
    for press in _presses(420)[:3]:  # RD-KV; the quantized baselines quantize past their recent window always
        assert torch.equal(streaming_nll(model, _text(), press, 32).token_nll, dense.token_nll), press
    for rdkv, press in zip([True] * 3 + [False] * 2, _presses(64)):
        pressed = streaming_nll(model, _text(), press, 32).token_nll
        assert not torch.equal(pressed, dense.token_nll), press
        if rdkv:  # RD-KV acts only once the cache exceeds its bytes
            assert torch.equal(pressed[:64], dense.token_nll[:64]), press


def test_recent_tokens_stay_in_fp16_and_tokens_past_them_are_quantized():
    model = build(tiny_llama_config())
    press = _presses(64)[3]  # H2O at 4 bits, 16 recent tokens, groups of 8
    _, snapshots = _stream(model, press, chunk=16)
    for state in (layer[1] for snapshot in snapshots[8:] for layer in snapshot.values()):
        assert (state.key_bits[:, -16:] == 16).all()
        old = state.key_bits[:, :-16]
        assert ((old == 16).sum(1) < 8).all() and (old[old < 16] == 4).all()  # at most a partial group waits


def test_bad_settings_are_refused():
    with pytest.raises(PressConfigError, match="budget_tokens"):
        RDKVBudgetPress(budget_tokens=1)
    with pytest.raises(PressConfigError, match="realloc_slack"):
        RDKVBudgetPress(realloc_slack=-1)
    for setting in ({"rotate": True}, {"protect_recent": 0.5}):
        with pytest.raises(PressConfigError, match="rotate or protect_recent"):
            RDKVBudgetPress(RDKVPress(**setting))
    with pytest.raises(PressConfigError, match="merge_evicted"):
        RDKVBudgetPress(RDKVPress(merge_evicted=True))
    scorer = make_streaming_press("h2o", Settings(budget=64)).base_press
    with pytest.raises(PressConfigError, match="bits"):
        QuantizedBudgetPress(scorer, bits=5)
    with pytest.raises(PressConfigError, match="positions_in_cache"):
        QuantizedBudgetPress(scorer, positions_in_cache=True)
    with pytest.raises(PressConfigError, match="recent_tokens"):
        QuantizedBudgetPress(scorer, budget_tokens=32, recent_tokens=32)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_the_carried_evidence_is_the_attention_every_query_paid_each_token(config):
    model, ids = build(config), _text(96)
    press = RDKVBudgetPress(RDKVPress(), budget_tokens=200)  # above the text: nothing is evicted
    carried = []
    hook = model.register_forward_hook(lambda *_: carried.append(dict(press.received)))
    try:
        streaming_nll(model, ids, press, 48)  # two calls of 48, the second's queries over the first's keys too
    finally:
        hook.remove()
    assert len(carried) == 2 and not press.received  # the press forgets the text once it ends
    with torch.no_grad():  # the same 95 queries in one causal pass, with eager attention's weights
        attentions = model(ids[None, :95], output_attentions=True).attentions
    for layer, weights in enumerate(attentions):
        assert torch.allclose(carried[-1][layer], weights[0].sum(1), atol=1e-5)  # (heads, tokens)


class _RecordingPress(RDKVBudgetPress):
    """Records each allocation's carried sums and stream indices before and after it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.allocations = []

    def forward_hook(self, module, input, kwargs, output):
        allocations = []
        original = self.allocate

        def allocate(module, kwargs, keys, values, state, budget):
            allocations.append((self.received[module.layer_idx].clone(), state.index.clone()))
            return original(module, kwargs, keys, values, state, budget)

        self.allocate = allocate
        try:
            output = super().forward_hook(module, input, kwargs, output)
        finally:
            del self.allocate
        if allocations:
            self.allocations.append(allocations[0] + (self.received[module.layer_idx], self.layers[module.layer_idx].index))
        return output


@pytest.mark.parametrize("evict_per_head", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_eviction_keeps_each_kept_tokens_carried_sum_and_drops_the_others(config, evict_per_head):
    model = build(config)
    press = _RecordingPress(RDKVPress(evict_per_head=evict_per_head), budget_tokens=64)
    streaming_nll(model, _text(), press, 32)
    assert len(press.allocations) > 4
    groups = config.num_attention_heads // press.allocations[0][1].shape[0]
    evicted = False
    for before, before_index, after, after_index in press.allocations:
        assert after.shape == (config.num_attention_heads, after_index.shape[1])
        for head in range(after.shape[0]):
            kv = head // groups
            place = {int(index): at for at, index in enumerate(before_index[kv])}
            old = torch.stack([before[head, place[int(index)]] for index in after_index[kv]])
            assert torch.equal(after[head], old)  # each token's own sum, matched by its place in the text
        evicted |= after_index.shape[1] < before_index.shape[1]
    assert evicted


def test_the_evidence_is_the_carried_sum_over_the_queries_so_far_or_over_those_that_saw_each_token():
    state = StoredLayer.empty(1, "cpu")
    state.grow(4)
    state.index, state.seen = torch.tensor([[0, 5, 8, 9]]), 10  # tokens 1-4 and 6-7 evicted
    for over, seen_by in (("all", torch.tensor([10.0, 10, 10, 10])), ("visible", torch.tensor([10.0, 5, 2, 1]))):
        press = RDKVBudgetPress(RDKVPress(accumulated_over=over), budget_tokens=8)
        press.received[0] = torch.tensor([[3.0, 2, 1, 0.5], [1.0, 1, 1, 1]])  # two query heads share the KV head
        expected = press.received[0] / seen_by
        assert torch.allclose(press._evidence(0, state), expected[None])
    assert RDKVBudgetPress(RDKVPress(), budget_tokens=8)._evidence(0, state) is None  # not carried: the call's own


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_token_by_token_the_slack_spares_allocations_and_the_store_stays_within_its_budget(config):
    model, budget = build(config), 64
    counts = {}
    for slack in (0, 16):
        press = _RecordingPress(RDKVPress(), budget_tokens=budget, realloc_slack=slack)
        _, snapshots = _stream(model, press, chunk=1, tokens=200)
        held = [layer[0] for snapshot in snapshots for layer in snapshot.values()]
        assert max(held) <= _budget_bytes(config, budget)
        assert max(held) > 0.95 * _budget_bytes(config, budget)  # the slack still lets the store fill its budget
        counts[slack] = len(press.allocations)
    assert counts[16] * 8 < counts[0]  # one allocation per ~16 tokens, not one per token


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_h2o_keep_allocates_among_h2os_keep_set_within_the_budget(config):
    model, budget = build(config), 64
    plain = RDKVBudgetPress(RDKVPress(bits=(4,)), budget_tokens=budget)
    first = _RecordingPress(RDKVPress(bits=(4,)), budget_tokens=budget, h2o_keep=1.5)
    _, plain_snapshots = _stream(model, plain, tokens=417)
    _, snapshots = _stream(model, first, tokens=417)
    held = [layer[0] for snapshot in snapshots for layer in snapshot.values()]
    assert max(held) <= _budget_bytes(config, budget) and max(held) > 0.9 * _budget_bytes(config, budget)
    assert len(first.allocations) > 4
    for _, offered, _, kept in first.allocations:
        assert offered.shape[1] <= 96 and kept.shape[1] <= offered.shape[1]  # RD-KV chose among H2O's 96
    assert max(kept.shape[1] for *_, kept in first.allocations) > budget  # 4-bit tokens: more than fp16 holds
    assert any(not torch.equal(a[1].index, b[1].index)  # H2O's set, not RD-KV's own choice
               for before, after in zip(plain_snapshots, snapshots) for a, b in zip(before.values(), after.values()))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_h2o_keep_keeps_the_newest_half_and_the_most_attended_rest(config):
    model, budget = build(config), 64
    press = _RecordingPress(RDKVPress(bits=(4,)), budget_tokens=budget, h2o_keep=1)  # 64 kept: 32 newest and 32 heavy
    kept_sets = []
    original = press._h2o_kept

    def h2o_kept(layer_idx, state):
        kept = original(layer_idx, state)
        if kept is not None:
            kept_sets.append((per_kv_head(press.received[layer_idx][None], state.index.shape[0])[0], state.index, kept))
        return kept

    press._h2o_kept = h2o_kept
    streaming_nll(model, _text(), press, 32)
    assert len(kept_sets) > 4
    for score, index, kept in kept_sets:
        tokens = index.shape[1]
        assert kept.shape[1] == budget and (kept[:, -32:] == torch.arange(tokens - 32, tokens)).all()
        for head in range(kept.shape[0]):
            heavy = set(score[head, : tokens - 32].topk(32).indices.tolist())
            assert set(kept[head, :32].tolist()) == heavy


def test_h2o_keep_refuses_bad_values():
    with pytest.raises(PressConfigError, match="h2o_keep must be at least 0"):
        RDKVBudgetPress(budget_tokens=64, h2o_keep=-1)
    with pytest.raises(PressConfigError, match="window of 16"):
        RDKVBudgetPress(RDKVPress(window_size=16), budget_tokens=64, h2o_keep=0.4)  # 25 kept: 12 recent < 16
    with pytest.raises(PressConfigError, match="carry_received"):
        RDKVBudgetPress(budget_tokens=64, carry_received=False, h2o_keep=2)
    RDKVBudgetPress(RDKVPress(accumulated=0), budget_tokens=64, h2o_keep=2)  # H2O's sums carried without RD-KV's


def test_narrowing_with_whole_groups_leaves_a_widths_partial_group_at_its_stored_width():
    keys, values = torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8)
    state = StoredLayer.empty(1, "cpu")
    state.grow(12)
    four = torch.full((1, 12), 4)
    eight = torch.full((1, 12), 8)
    new_keys, _, new = narrowed(keys, values, state, four, four, "channel", 8, whole_groups=True)
    assert new.key_bits.tolist() == [[4] * 8 + [16] * 4] and new.value_bits.tolist() == [[4] * 12]
    assert torch.equal(new_keys[0, 0, 8:], keys[0, 0, 8:]) and (new.key_group[0, 8:] == -1).all()
    assert new.stats is None  # no key was quantized per token
    # narrowing again: a key waiting at 8 bits whose target is 8 is not regrouped, nor quantized again
    eight_keys, _, at_eight = narrowed(keys, values, state, eight, eight, "channel", 8)  # 8 grouped, 4 per token
    target = torch.tensor([[4] * 8 + [8] * 4])
    again_keys, _, again = narrowed(eight_keys, values, at_eight, target, target, "channel", 8, whole_groups=True)
    assert again.key_bits.tolist() == [[4] * 8 + [8] * 4] and torch.equal(again_keys[0, 0, 8:], eight_keys[0, 0, 8:])


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_streaming_keys_are_never_quantized_per_token_in_the_channel_layout(config):
    # per-token keys are scaled by channel statistics fixed at the first allocation, which fit the
    # later keys ever worse over a long stream, an error the allocation's per-channel proxy does not see
    model, budget = build(config), 64
    for whole, press in ((True, RDKVBudgetPress(RDKVPress(group_tokens=8), budget_tokens=budget)),
                         (False, RDKVBudgetPress(RDKVPress(group_tokens=8), budget_tokens=budget, whole_key_groups=False))):
        _, snapshots = _stream(model, press, tokens=417)
        per_token = sum(int(((state.key_group < 0) & (state.key_bits < 16)).sum())
                        for snapshot in snapshots for _, state, _, _ in snapshot.values())
        quantized = sum(int((state.key_bits < 16).sum()) for snapshot in snapshots for _, state, _, _ in snapshot.values())
        held = [layer[0] for snapshot in snapshots for layer in snapshot.values()]
        assert quantized > 0 and max(held) <= _budget_bytes(config, budget)
        assert (per_token == 0) == whole, press  # the press as it was stored some keys per token
