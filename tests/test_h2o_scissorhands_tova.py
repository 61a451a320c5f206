"""H2O, Scissorhands and TOVA, compress-once and held at a budget while text streams in, on tiny
GPT-NeoX and Llama (GQA): nothing evicted is dense exactly, the cache holds its budget, kept
entries are dense entries, and every choice matches the rule applied by hand to the attention
weights the model itself computes (eager), which the presses never see."""

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from kvpress import TOVAPress
from transformers import DynamicCache

from evaluation.protocols import context_nll, streaming_nll
from presses.budget_press import BudgetPress
from presses.h2o_press import H2OPress
from presses.scissorhands_press import ScissorhandsPress
from tests.conftest import build, record_cache_lengths, tiny_llama_config, tiny_neox_config
from tests.test_gpt_neox_patch import assert_kept_entries_are_dense_entries

IDS = torch.randint(0, 2000, (200,), generator=torch.Generator().manual_seed(0))
CONFIGS = {"neox": tiny_neox_config, "llama": tiny_llama_config}
HISTORY = 6  # Scissorhands history window
SCORERS = {
    "h2o": lambda ratio=0.0: H2OPress(ratio),
    "scissorhands": lambda ratio=0.0: ScissorhandsPress(ratio, history_window=HISTORY),
    "tova": lambda ratio=0.0: TOVAPress(ratio),
}


def cases(test):
    """Every press on every tiny model."""
    return pytest.mark.parametrize("model_name", CONFIGS)(pytest.mark.parametrize("name", SCORERS)(test))


def with_logits(model, run):
    """``run()``'s result and every logits tensor the LM head produced meanwhile."""
    produced = []
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: produced.append(out))
    try:
        return run(), produced
    finally:
        hook.remove()


def all_equal(tensors, others):
    return len(tensors) == len(others) and all(torch.equal(a, b) for a, b in zip(tensors, others))


@cases
def test_context_protocol_ratio_zero_is_dense_and_compression_changes_it(model_name, name):
    model = build(CONFIGS[model_name](), attn_implementation="sdpa")
    settings = dict(context_tokens=64, eval_tokens=16)
    dense, dense_logits = with_logits(model, lambda: context_nll(model, IDS, None, **settings))
    at_zero, zero_logits = with_logits(model, lambda: context_nll(model, IDS, SCORERS[name](0.0), **settings))
    squeezed = context_nll(model, IDS, SCORERS[name](0.75), **settings)
    assert all_equal(zero_logits, dense_logits) and at_zero.nll_sum == dense.nll_sum
    assert squeezed.cache_tokens == 16 and squeezed.nll_sum != dense.nll_sum


@cases
def test_streaming_large_budget_is_dense_and_a_tight_one_holds(model_name, name):
    model = build(CONFIGS[model_name](), attn_implementation="sdpa")
    chunk, tokens = 4, 96
    stream = lambda press: streaming_nll(model, IDS, press, chunk, tokens + 1)  # noqa: E731
    dense, dense_logits = with_logits(model, lambda: stream(None))
    loose = BudgetPress(SCORERS[name](), target_size=tokens)  # the whole text fits: nothing evicted
    _, loose_logits = with_logits(model, lambda: stream(loose))
    assert all_equal(loose_logits, dense_logits)

    given = SCORERS[name]()
    tight = BudgetPress(given, target_size=24)
    held = record_cache_lengths(tight)
    assert stream(tight).nll_sum != dense.nll_sum
    assert given.compression_ratio == SCORERS[name]().compression_ratio  # the caller's press is left as it was
    assert max(held) == 24 and len(held) == 2 * tokens // chunk  # 2 layers x 24 chunks, never above
    assert not getattr(tight.base_press, "accumulated", None) and not getattr(tight.base_press, "history", None)


def prefill(model, ids, press=None):
    cache = DynamicCache()
    with torch.no_grad(), press(model) if press is not None else nullcontext():
        model.model(input_ids=ids[None], past_key_values=cache)
    return cache


@cases
def test_kept_entries_are_dense_entries(model_name, name):
    model = build(CONFIGS[model_name](), attn_implementation="sdpa")
    dense = prefill(model, IDS[:48])
    for press in [SCORERS[name](0.5), BudgetPress(SCORERS[name](), target_size=20)]:
        pressed = prefill(model, IDS[:48], press)
        assert [layer.keys.shape[2] for layer in pressed.layers] == [20 if isinstance(press, BudgetPress) else 24] * 2
        assert_kept_entries_are_dense_entries(dense, pressed)


# ---- the rules by hand, from the model's own attention weights --------------------------------

def by_kv_head(weights, kv_heads):
    """(batch, heads, ...) -> (batch, kv_heads, ...): sum over the query heads of each group."""
    return weights.view(weights.shape[0], kv_heads, -1, *weights.shape[2:]).sum(2)


def recent_first(scores, n_recent):
    """The last n_recent tokens above every other score, newest highest."""
    scores = scores.clone()
    if n_recent:
        scores[..., -n_recent:] = scores.max() + torch.arange(1, n_recent + 1, dtype=scores.dtype)
    return scores


class ByHand:
    """Follows one layer's cache, call by call, from the eager weights alone."""

    def __init__(self, name, kv_heads, budget):
        self.name, self.kv_heads, self.budget = name, kv_heads, budget
        self.sums = torch.zeros(1, kv_heads, 0)  # H2O: attention received so far
        self.rows = torch.zeros(1, kv_heads, 0, 0)  # Scissorhands: above-average hits of recent queries

    def add_call(self, weights):
        """Weights (1, heads, q, k) of this call; returns the state the press should hold."""
        weights = weights.double()
        q_len, k_len = weights.shape[2:]
        grow = k_len - self.sums.shape[-1]
        self.sums = torch.nn.functional.pad(self.sums, (0, grow)) + by_kv_head(weights.sum(2), self.kv_heads)
        average = 1.0 / torch.arange(k_len - q_len + 1, k_len + 1, dtype=torch.float32)
        hits = by_kv_head((weights.float() >= average[:, None]).double(), self.kv_heads)
        self.rows = torch.cat([torch.nn.functional.pad(self.rows, (0, grow)), hits], dim=2)[:, :, -HISTORY:]
        self.last_query = weights[:, :, -1]
        return self.sums if self.name == "h2o" else self.rows.sum(2)

    def kept(self):
        """Indices (1, kv_heads, budget), sorted, that the rule keeps."""
        k_len = self.sums.shape[-1]
        if self.name == "h2o":
            scores = recent_first(self.sums, self.budget // 2)
        elif self.name == "scissorhands":  # ties go to the newer token
            scores = recent_first(self.rows.sum(2) + torch.arange(k_len) / k_len, min(HISTORY, self.budget // 2))
        else:  # TOVA: the last query's attention, averaged over all heads; the last token stays
            scores = self.last_query[..., :-1].mean(1, keepdim=True).expand(-1, self.kv_heads, -1)
            scores = torch.nn.functional.pad(scores, (0, 1), value=2.0)
        return scores.topk(self.budget, dim=-1).indices.sort(dim=-1).values

    def evict(self, indices):
        self.sums = self.sums.gather(2, indices)
        self.rows = self.rows.gather(3, indices[:, :, None].expand(-1, -1, self.rows.shape[2], -1))


def hide_weights_and_record(press):
    """The press sees no attention weights (it must rebuild them); record what it saw and did."""
    seen = {"weights": [], "states": [], "kept": []}
    forward_hook, keep_indices = press.forward_hook, press.keep_indices

    def hook(module, args, kwargs, output):
        seen["weights"].append((module.layer_idx, output[1]))
        return forward_hook(module, args, kwargs, (output[0], None))

    def keep(module, *rest):
        base = press.base_press
        state = getattr(base, "accumulated", {}).get(module.layer_idx)
        if isinstance(base, ScissorhandsPress):
            state = base.history[module.layer_idx].sum(2)
        seen["states"].append(state if state is None else state.clone())
        seen["kept"].append(keep_indices(module, *rest))
        return seen["kept"][-1]

    press.forward_hook, press.keep_indices = hook, keep
    return seen


CALLS = [24, 1, 1, 1, 3, 1, 2, 1, 1, 1]  # a prefill, then decode steps (some of several tokens)
BUDGET = 16


@cases
def test_streaming_choices_match_the_rule_applied_to_eager_weights(model_name, name):
    model = build(CONFIGS[model_name](), attn_implementation="eager")
    kv_heads = model.config.num_key_value_heads
    press = BudgetPress(SCORERS[name](), target_size=BUDGET)
    seen = hide_weights_and_record(press)
    cache, dense, start = DynamicCache(), DynamicCache(), 0
    with torch.no_grad():
        with press(model):
            for q_len in CALLS:
                positions = torch.arange(start, start + q_len)[None]
                model(input_ids=IDS[None, start : start + q_len], past_key_values=cache, position_ids=positions)
                start += q_len
        start = 0
        for q_len in CALLS:  # dense run with the same calls
            model(input_ids=IDS[None, start : start + q_len], past_key_values=dense)
            start += q_len

    hands = [ByHand(name, kv_heads, BUDGET) for _ in model.model.layers]
    states, kept = iter(seen["states"]), iter(seen["kept"])
    evictions = 0
    for layer, weights in seen["weights"]:
        expected_state = hands[layer].add_call(weights)
        if weights.shape[-1] <= BUDGET:
            continue
        evictions += 1
        state, indices = next(states), next(kept)
        if name == "scissorhands":
            assert torch.equal(state.double(), expected_state)
        elif name == "h2o":
            torch.testing.assert_close(state.double(), expected_state, rtol=1e-5, atol=1e-6)
        assert torch.equal(indices, hands[layer].kept())
        hands[layer].evict(indices)
    assert evictions == 2 * len(CALLS)  # every call (the prefill too: 24 > 16), in both layers
    # Layer 0's keys and values depend on the token and its position only: kept ones are dense ones.
    first_layer = lambda c: SimpleNamespace(layers=c.layers[:1])  # noqa: E731
    assert_kept_entries_are_dense_entries(first_layer(dense), first_layer(cache))


def test_tova_held_at_a_budget_evicts_the_last_querys_least_attended_token():
    """kvpress's TOVAPress in BudgetPress with interval 1: each decode step drops exactly one
    token, the one the new query attends least (head-averaged eager weights), in every KV head."""
    model = build(tiny_llama_config(), attn_implementation="eager")
    press = BudgetPress(TOVAPress(), target_size=BUDGET)
    seen = hide_weights_and_record(press)
    with torch.no_grad(), press(model):
        cache = DynamicCache()
        model(input_ids=IDS[None, :BUDGET], past_key_values=cache)
        for step in range(BUDGET, BUDGET + 6):
            model(input_ids=IDS[None, step : step + 1], past_key_values=cache, position_ids=torch.tensor([[step]]))
    decode = [(w, k) for (_, w), k in zip(seen["weights"][2:], seen["kept"])]
    assert len(decode) == 12 and len(seen["kept"]) == 12
    for weights, indices in decode:
        least = weights[0, :, -1, :-1].mean(0).argmin().item()
        expected = torch.tensor([i for i in range(BUDGET + 1) if i != least])
        assert torch.equal(indices, expected.expand(1, 2, -1))


@pytest.mark.parametrize("model_name", CONFIGS)
@pytest.mark.parametrize("name", ["h2o", "scissorhands"])
def test_prefill_scores_match_the_eager_weights(model_name, name):
    """Compress-once form: the scores from rebuilt attention equal the rule applied to the
    model's own weights, and equal the scores computed from those weights when given."""
    model = build(CONFIGS[model_name](), attn_implementation="eager")
    kv_heads = model.config.num_key_value_heads
    scores = {}
    for hidden in [True, False]:
        press = SCORERS[name](0.5)
        if name == "h2o":
            press.query_chunk = 7  # several chunks of queries
        original, weights = press.score, {}

        def score(module, hidden_states, keys, values, attentions, kwargs):
            weights[module.layer_idx] = attentions
            result = original(module, hidden_states, keys, values, None if hidden else attentions, kwargs)
            scores[hidden, module.layer_idx] = result
            return result

        press.score = score
        prefill(model, IDS[:40], press)
    for layer in range(2):
        hand = ByHand(name, kv_heads, 20)
        state = hand.add_call(weights[layer])
        if name == "h2o":
            expected = recent_first(state, 10)
        else:
            expected = recent_first(state + torch.arange(40) / 40, min(HISTORY, 10))
        torch.testing.assert_close(scores[True, layer].double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(scores[False, layer], scores[True, layer], rtol=1e-5, atol=1e-6)
        if name == "scissorhands":
            assert torch.equal(scores[False, layer], scores[True, layer])
