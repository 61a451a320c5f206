"""The perplexity protocols measure compression: ratio 0 is dense exactly, real compression
changes perplexity, and the streaming cache stays within its budget."""

import pytest
import torch
from torch.nn import functional as F

from evaluation.data import load_text
from evaluation.models import load_model
from evaluation.protocols import ProtocolError, context_nll, streaming_nll
from presses import Settings, make_press, make_streaming_press
from tests.conftest import record_cache_lengths, shared_data_dir


@pytest.fixture(scope="module")
def wikitext_ids(tokenizer):
    text, _ = load_text("wikitext", shared_data_dir())
    return tokenizer(text[:20000], return_tensors="pt").input_ids[0]


def test_context_protocol_dense_equals_one_forward_pass(tiny_neox, wikitext_ids):
    """Prefill + teacher-forced continuation is the ordinary perplexity when nothing is pressed."""
    dense = context_nll(tiny_neox, wikitext_ids, None, context_tokens=96, eval_tokens=32)
    window = wikitext_ids[:129][None]
    with torch.no_grad():
        logits = tiny_neox(window).logits[0, 96:128]
    direct = F.cross_entropy(logits.float(), window[0, 97:129], reduction="sum").item()
    assert dense.tokens == 32 and dense.cache_tokens == 96
    assert dense.nll_sum == pytest.approx(direct, rel=1e-5)


@pytest.mark.parametrize("name", ["snapkv", "knorm", "streaming_llm", "tova", "pyramidkv"])
def test_context_protocol_ratio_zero_is_dense_and_compression_changes_it(tiny_neox, wikitext_ids, name):
    settings = dict(context_tokens=96, eval_tokens=32, num_windows=2)
    dense = context_nll(tiny_neox, wikitext_ids, None, **settings)
    at_zero = context_nll(tiny_neox, wikitext_ids, make_press(name, 0.0), **settings)
    squeezed = context_nll(tiny_neox, wikitext_ids, make_press(name, 0.9), **settings)
    assert at_zero.nll_sum == dense.nll_sum
    assert squeezed.nll_sum != dense.nll_sum
    assert squeezed.cache_tokens == int(96 * 0.1) if name != "pyramidkv" else squeezed.cache_tokens < 96 * 0.2
    # The last scored query attends the largest layer's kept context and the 32 scored tokens.
    assert dense.peak_attended_keys == 96 + 32
    if name != "pyramidkv":
        assert squeezed.peak_attended_keys == int(96 * 0.1) + 32


def test_context_protocol_refuses_windows_past_the_model_context(tiny_neox, wikitext_ids):
    with pytest.raises(ProtocolError, match="streaming"):
        context_nll(tiny_neox, wikitext_ids, None, context_tokens=500, eval_tokens=64)


def test_streaming_holds_the_budget_and_a_large_budget_is_dense(tiny_neox, wikitext_ids):
    dense = streaming_nll(tiny_neox, wikitext_ids, None, chunk_tokens=16, max_tokens=257)
    loose = streaming_nll(tiny_neox, wikitext_ids, make_streaming_press("knorm", Settings(budget=10_000)), 16, 257)
    assert dense.tokens == 256 and loose.nll_sum == dense.nll_sum

    press = make_streaming_press("streaming_llm", Settings(budget=48, chunk_tokens=16))
    held = record_cache_lengths(press)
    tight = streaming_nll(tiny_neox, wikitext_ids, press, chunk_tokens=16, max_tokens=257)
    assert max(held) == 48 and len(held) == 2 * 16  # 2 layers x 16 chunks; never above the budget
    assert tight.nll_sum != dense.nll_sum
    # Between chunks the cache is at the budget; within one, the last query also sees the chunk.
    assert dense.peak_attended_keys == 256 and tight.peak_attended_keys == 48 + 16
    token_by_token = make_streaming_press("streaming_llm", Settings(budget=48, chunk_tokens=1))
    assert streaming_nll(tiny_neox, wikitext_ids, token_by_token, chunk_tokens=1, max_tokens=100).peak_attended_keys == 49


def test_streaming_scores_every_token_up_to_max_tokens(tiny_neox, wikitext_ids):
    """A last chunk shorter than the others is scored too, and the result says which tokens counted."""
    partial = streaming_nll(tiny_neox, wikitext_ids, None, chunk_tokens=16, max_tokens=250)
    assert partial.tokens == 249 and partial.scored_range == (1, 249)
    assert partial.unit_tokens == [249] and partial.token_nll.numel() == 249
    window = wikitext_ids[:250][None]
    with torch.no_grad():
        logits = tiny_neox(window).logits[0, :-1]
    direct = F.cross_entropy(logits.float(), window[0, 1:], reduction="none")
    torch.testing.assert_close(partial.token_nll, direct, rtol=1e-5, atol=1e-5)
    press = make_streaming_press("snapkv", Settings(budget=48, window=12, chunk_tokens=16))  # last chunk: 9 queries
    assert streaming_nll(tiny_neox, wikitext_ids, press, chunk_tokens=16, max_tokens=250).tokens == 249


def test_real_model_compression_changes_perplexity_and_ratio_zero_is_dense():
    """SmolLM2-135M (real weights, offline): the single-forward-pass pitfall is impossible."""
    loaded = load_model("smollm2-135m", dtype="float32")
    text, _ = load_text("wikitext", shared_data_dir())
    ids = loaded.tokenizer()(text[:8000], return_tensors="pt").input_ids[0]
    settings = dict(context_tokens=384, eval_tokens=64)
    dense = context_nll(loaded.model, ids, None, **settings)
    at_zero = context_nll(loaded.model, ids, make_press("snapkv", 0.0), **settings)
    squeezed = context_nll(loaded.model, ids, make_press("snapkv", 0.9), **settings)
    assert at_zero.ppl == dense.ppl
    assert abs(squeezed.ppl - dense.ppl) > 0.01 * dense.ppl
