"""StreamingLLM on the ring buffer (decoding/ring_cache.py) gives, token for token, what the slow
decode-time path gives (BudgetPress, decoding/reference.py's budget_generate), for more new tokens
than the ring holds."""

import pytest
import torch
from kvpress import StreamingLLMPress

from decoding import neox_decode, ring_cache
from decoding.neox_decode import StepState
from decoding.reference import budget_generate
from presses import PressConfigError, Settings, make_press, make_streaming_press
from presses.budget_press import BudgetPress
from tests.conftest import build, tiny_neox_config

NEW_TOKENS = 64  # a budget of 16 with 4 sinks: a ring of 13 slots, wrapped about five times


@pytest.fixture(scope="module")
def model():
    # Larger random weights than the default: peaked attention, so that positions change the tokens.
    return build(tiny_neox_config(initializer_range=0.1), attn_implementation="sdpa")


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(2, 1000, (1, length), generator=torch.Generator().manual_seed(seed))


def test_ring_gives_the_slow_paths_tokens_for_prompts_longer_and_shorter_than_the_budget(model):
    press = make_streaming_press("streaming_llm", Settings(budget=16))
    short, long = prompt(6, 4), prompt(40, 5)  # filling up to the budget first; evicted at prefill
    expected = [budget_generate(model, row, press, NEW_TOKENS).tokens for row in (short, long)]
    generation = ring_cache.generate(model, [short, long], press, NEW_TOKENS)
    assert torch.equal(generation.tokens, torch.cat(expected))
    assert generation.kept_tokens_per_layer == [16, 16]
    # keys and values in 17 slots, 4 sink keys, fp32, 2 rows, 2 layers: the same for any length
    assert generation.kv_bytes_final == 2 * 2 * (2 * 17 + 4) * model.config.hidden_size * 4
    # The check can fail: the same eviction at text positions gives other tokens.
    text_positions = BudgetPress(StreamingLLMPress(n_sink=4), target_size=16)
    assert not torch.equal(budget_generate(model, long, text_positions, NEW_TOKENS).tokens, expected[1])


def test_ring_without_sinks_is_the_sliding_window(model):
    press = make_streaming_press("sliding_window", Settings(budget=12))
    expected = budget_generate(model, prompt(30, 6), press, NEW_TOKENS).tokens
    assert torch.equal(ring_cache.generate(model, [prompt(30, 6)], press, NEW_TOKENS).tokens, expected)


def test_ring_branch_compiles_whole_once_for_all_layers_and_gives_the_same_tokens():
    # What the two-stream graph compiles on CUDA, traced here without graph breaks (fullgraph).
    from torch._dynamo.utils import counters

    model = build(tiny_neox_config(initializer_range=0.1, num_hidden_layers=4), attn_implementation="sdpa")
    torch._dynamo.reset()
    counters.clear()
    attention_fn = torch.compile(ring_cache.attention_branch, fullgraph=True, backend="aot_eager")

    def step(model, state):
        logits = neox_decode.final_logits(model, neox_decode.layer_outputs(model, state, attention_fn))
        return neox_decode.next_token(logits, state.temperature, state.top_k, state.noise)

    press = make_streaming_press("streaming_llm", Settings(budget=8))
    expected = budget_generate(model, prompt(20, 7), press, 24).tokens
    assert torch.equal(ring_cache.generate(model, [prompt(20, 7)], press, 24, step=step).tokens, expected)
    # the first layer's one input part and the later layers' three: no recompile per layer
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("press, message", [
    (make_streaming_press("knorm", Settings(budget=16)), "StreamingLLM"),
    (make_press("streaming_llm", 0.5), "StreamingLLM"),
    (make_streaming_press("streaming_llm", Settings(budget=16, compress_every=4)), "compress_every must be 1"),
    (make_streaming_press("streaming_llm", Settings(budget=4, n_sink=8)), "8 sink tokens do not fit a budget of 4"),
    (BudgetPress(StreamingLLMPress(n_sink=4), target_size=16), "positions_in_cache"),
])
def test_presses_the_ring_cannot_run_are_refused(model, press, message):
    with pytest.raises(PressConfigError, match=message):
        ring_cache.generate(model, [prompt(20, 1)], press, 4)


def test_prompts_shorter_than_the_sinks_and_verify_passes_are_refused(model):
    press = make_streaming_press("streaming_llm", Settings(budget=16))
    with pytest.raises(PressConfigError, match="fewer than the 4 sink tokens"):
        ring_cache.generate(model, [prompt(3, 1)], press, 4)
    step = ring_cache.RingStep(4, 16, model.model.rotary_emb.inv_freq)
    ring = step.load_buffer(neox_decode.prefill(model, [prompt(20, 1)], press)[1], 4)
    with pytest.raises(ValueError, match="one new token per sequence"):
        step(model, StepState(ring, prompt(2, 2), torch.tensor([[20, 21]]), torch.arange(2)))
