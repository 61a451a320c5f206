"""No method sees the future: in both perplexity protocols, changing token t leaves the NLL of
every position before t exactly unchanged, for every registered press (a press added to the
registry is covered without editing this file).

Position j's logits may depend on tokens 0..j only. The NLL at j also uses token j + 1 as its
target, so the positions compared are those whose target comes before t (j <= t - 2); the
change must move something from t - 1 on, or the comparison would prove nothing. Tokens are
fed in chunks, and t sits inside a chunk: a press that ranks with the whole chunk's queries (as
InfLLM's per-chunk retrieval did) changes positions before t in the same chunk.
"""

import pytest
import torch

from evaluation.calibration import needing_calibration
from evaluation.protocols import context_nll, streaming_nll
from presses import NEEDS_EAGER_ATTENTION, Settings, make_press, make_streaming_press, press_names
from presses.registry import method_for
from tests.conftest import build, tiny_llama_config, tiny_neox_config

CONFIGS = {"neox": tiny_neox_config, "llama": tiny_llama_config}
# Settings every press accepts on a tiny model: InfLLM's 32-token blocks with a 32-token local
# window leave room for 2 retrieved blocks; SnapKV's observation window is shorter than a chunk.
SETTINGS = Settings(budget=100, window=32, n_sink=4, chunk_tokens=48)
CONTEXT, EVAL, CHUNK = 256, 64, 16  # context protocol: decode-time presses stream in chunks of 16
STREAM_TOKENS, STREAM_CHUNK = 301, SETTINGS.chunk_tokens
CONTEXT_T = CONTEXT + 1 + 2 * CHUNK + 5  # a scored token inside a chunk
STREAM_T = 4 * STREAM_CHUNK + 9  # inside the fifth chunk, after evictions began


@pytest.fixture(scope="module")
def ids():
    return torch.randint(2, 50000, (CONTEXT + EVAL + 1,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request):
    return build(CONFIGS[request.param]())


@pytest.fixture
def model(tiny, request):
    """The tiny model on the attention back end the CLI gives the press (evaluation/perplexity.py)."""
    name = request.node.callspec.params.get("name")
    tiny.set_attn_implementation("eager" if name in NEEDS_EAGER_ATTENTION else "sdpa")
    return tiny


def changed(ids: torch.Tensor, t: int) -> torch.Tensor:
    other = ids.clone()
    other[t] = (ids[t] + 12345) % 50000
    return other


def calibrated(press, model, ids):
    for part in needing_calibration(press):
        part.calibrate(model, ids[:CONTEXT])
    return press


def context_press(name: str):
    if method_for(name).prefill:
        return make_press(name, 0.5, SETTINGS)
    return make_streaming_press(name, SETTINGS)  # a decode-time method streams the context in


def assert_past_unchanged(before: torch.Tensor, after: torch.Tensor, first_changed: int) -> None:
    assert torch.equal(before[:first_changed], after[:first_changed])
    assert not torch.equal(before[first_changed:], after[first_changed:])


@pytest.mark.parametrize("name", press_names())
def test_context_protocol_sees_no_future(model, ids, name):
    runs = []
    for text in (ids, changed(ids, CONTEXT_T)):
        press = calibrated(context_press(name), model, ids)
        runs.append(context_nll(model, text, press, CONTEXT, EVAL, chunk_tokens=CHUNK).token_nll)
    # token_nll[k] is position CONTEXT + k predicting token CONTEXT + k + 1
    assert_past_unchanged(*runs, first_changed=CONTEXT_T - CONTEXT - 1)


@pytest.mark.parametrize("name", press_names(streaming=True))
def test_streaming_protocol_sees_no_future(model, ids, name):
    text = ids[:STREAM_TOKENS]
    runs = []
    for tokens in (text, changed(text, STREAM_T)):
        press = calibrated(make_streaming_press(name, SETTINGS), model, ids)
        runs.append(streaming_nll(model, tokens, press, STREAM_CHUNK).token_nll)
    # token_nll[j] is position j predicting token j + 1
    assert_past_unchanged(*runs, first_changed=STREAM_T - 1)


def test_infllm_per_chunk_retrieval_would_see_the_future(model, ids):
    """The check above can fail: the paper's one retrieval per chunk (all the chunk's queries
    rank the blocks) moves positions before t, which the causal default does not."""
    from presses.infllm_press import InfLLMPress

    runs = []
    for text in (ids, changed(ids, CONTEXT_T)):
        press = InfLLMPress(n_init=4, local=32, block_size=8, top_k=2, retrieval="chunk")  # 27 blocks to choose from
        runs.append(context_nll(model, text, press, CONTEXT, EVAL, chunk_tokens=CHUNK).token_nll)
    assert not torch.equal(runs[0][: CONTEXT_T - CONTEXT - 1], runs[1][: CONTEXT_T - CONTEXT - 1])
