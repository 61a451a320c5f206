"""InfLLM streaming press on tiny GPT-NeoX (Pythia's partial rotary) and tiny Llama (GQA), through
``evaluation.protocols.streaming_nll``: exact where nothing is lost, bounded, retrieving the blocks
that query . representative-key relevance ranks highest, memory holding the evicted entries."""

import pytest
import torch
from kvpress import BasePress
from transformers.models.llama.modeling_llama import rotate_half

from evaluation.protocols import context_nll, streaming_nll
from patches.gpt_neox import split_qkv
from presses.infllm_press import InfLLMPress
from tests.conftest import build, tiny_llama_config, tiny_neox_config

CHUNK, TOKENS = 16, 129  # 8 chunks
TIGHT = dict(n_init=4, local=32, block_size=8, top_k=2)  # 96 tokens end in memory: 12 blocks
CONFIGS = {"neox": tiny_neox_config, "llama": tiny_llama_config}


class CacheSpy(BasePress):
    """Changes nothing; keeps the cache streaming_nll used (the dense control's entries)."""

    def forward_hook(self, module, input, kwargs, output):
        self.cache = kwargs["past_key_values"]
        return output


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 50000, (TOKENS,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def setup(request, ids):
    """(model, dense Perplexity, dense cache) per architecture, built once for the module."""
    model = build(CONFIGS[request.param]())
    spy = CacheSpy()
    dense = streaming_nll(model, ids, spy, CHUNK)
    return model, dense, spy.cache


def rotary(model, positions):
    """The model's own cos/sin at ``positions`` (an int, or a 1-D tensor: (n, D) each)."""
    positions = torch.as_tensor(positions).reshape(1, -1)
    cos, sin = model.model.rotary_emb(torch.zeros(1), positions)
    return cos[0].squeeze(0), sin[0].squeeze(0)


def direct_queries(module, kwargs):
    """This call's post-RoPE queries, computed from the attention module's own projection."""
    hidden = kwargs["hidden_states"]
    if hasattr(module, "query_key_value"):  # GPT-NeoX, in the patch's reordered basis
        queries = split_qkv(module, hidden)[0]
    else:
        queries = module.q_proj(hidden).view(*hidden.shape[:2], -1, module.head_dim).transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]
    return queries * cos[:, None] + rotate_half(queries) * sin[:, None]


def instrument(press, model):
    """Wrap the press's hooks: record cache sizes, check retrieval against a direct relevance
    computation and (fixed positions) the retrieved keys against the model's rotary."""
    log = dict(between=[], retrievals=0, memory={}, distinct_choices=0)
    pre_hook, hook = press.forward_pre_hook, press.forward_hook

    def checked_pre_hook(module, args, kwargs):
        result = pre_hook(module, args, kwargs)
        state = press._layers[module.layer_idx]
        if state.n_blocks:
            queries = direct_queries(module, kwargs)  # (B, H_q, C, D)
            if press.retrieval == "chunk":  # one choice per call, from the mean of its queries
                queries = queries.mean(2, keepdim=True).expand_as(queries)
            else:  # each position: the mean of the call's queries up to it
                queries = torch.stack([queries[:, :, : i + 1].mean(2) for i in range(queries.shape[2])], dim=2)
            first = int(kwargs["position_ids"][0, 0])
            representatives = state.representatives.view()  # (blocks, B, H_q, D)
            if press.positions == "fixed":  # stored pre-RoPE: put them at P = first - local
                cos, sin = rotary(model, first - press.local)
                representatives = representatives * cos + rotate_half(representatives) * sin
            else:  # the mean of the memory keys it names
                mem_keys = press.memory(module.layer_idx)[0]
                heads = queries.shape[1]
                per_head = mem_keys.repeat_interleave(heads // mem_keys.shape[1], dim=1)
                blocks = per_head.unflatten(2, (state.n_blocks, press.block_size))  # (B, H_q, n, bs, D)
                index = state.representative_index.view().permute(1, 2, 0, 3)  # (B, H_q, n, r)
                picked = blocks.gather(3, index[..., None].expand(-1, -1, -1, -1, blocks.shape[-1]))
                torch.testing.assert_close(picked.mean(3).permute(2, 0, 1, 3), representatives)
            relevance = torch.einsum("bhcd,nbhd->bcn", queries, representatives)
            expected = relevance.topk(min(press.top_k, state.n_blocks)).indices.sort().values  # (B, C, k)
            assert torch.equal(state.last_retrieved, expected)
            log["retrievals"] += 1
            union = expected.unique()  # the blocks the cache holds for this call, oldest first
            log["distinct_choices"] = max(log["distinct_choices"], len({tuple(row) for row in expected[0].tolist()}))

            cache_keys = kwargs["past_key_values"].layers[module.layer_idx].keys
            retrieved = cache_keys[:, :, state.init_len : state.init_len + state.n_retrieved]
            mem_keys, _, mem_positions = press.memory(module.layer_idx)
            blocks = [mem_keys[:, :, b * press.block_size : (b + 1) * press.block_size] for b in union]
            if press.positions == "original":
                assert torch.equal(retrieved, torch.cat(blocks, dim=2))
            else:  # each key undone from its own position with the model's rotary, then put at P
                cos, sin = rotary(model, mem_positions.view(state.n_blocks, press.block_size)[union].flatten())
                stored = torch.cat(blocks, dim=2)
                unrotated = stored * cos - rotate_half(stored) * sin
                cos_p, sin_p = rotary(model, first - press.local)
                torch.testing.assert_close(retrieved, unrotated * cos_p + rotate_half(unrotated) * sin_p)
        return result

    def recording_hook(module, args, kwargs, output):
        result = hook(module, args, kwargs, output)
        log["between"].append(kwargs["past_key_values"].layers[module.layer_idx].keys.shape[2])
        if press._layers[module.layer_idx].n_blocks:
            log["memory"][module.layer_idx] = [x.clone() for x in press.memory(module.layer_idx)]
        return result

    press.forward_pre_hook, press.forward_hook = checked_pre_hook, recording_hook
    return log


def assert_memory_matches(memory: dict, dense_cache, layers) -> None:
    for layer in layers:
        keys, values, positions = memory[layer]
        assert torch.equal(positions, torch.arange(4, 4 + positions.numel()))  # after the 4 initial tokens
        assert torch.equal(keys, dense_cache.layers[layer].keys[:, :, positions])
        assert torch.equal(values, dense_cache.layers[layer].values[:, :, positions])


def test_nothing_evicted_is_dense(setup, ids):
    model, dense, _ = setup
    press = InfLLMPress(n_init=4, local=TOKENS, block_size=8, top_k=2)  # fixed positions
    log = instrument(press, model)
    assert streaming_nll(model, ids, press, CHUNK).nll_sum == dense.nll_sum
    assert not log["memory"] and log["retrievals"] == 0


def test_every_block_retrieved_at_original_positions_is_dense(setup, ids):
    """top_k covers all blocks: init + retrieved + local is the dense cache, in order."""
    model, dense, dense_cache = setup
    press = InfLLMPress(**(TIGHT | dict(top_k=100, positions="original")))
    log = instrument(press, model)
    assert streaming_nll(model, ids, press, CHUNK).nll_sum == dense.nll_sum
    assert log["retrievals"] > 0 and max(log["between"]) <= 4 + 32
    assert_memory_matches(log["memory"], dense_cache, layers=range(len(model.model.layers)))


@pytest.mark.parametrize("retrieval", ["causal", "chunk"])
@pytest.mark.parametrize("positions", ["original", "fixed"])
def test_tight_memory_is_bounded_retrieves_by_relevance_and_changes_the_result(setup, ids, positions, retrieval):
    model, dense, dense_cache = setup
    press = InfLLMPress(**TIGHT, positions=positions, retrieval=retrieval)
    log = instrument(press, model)  # checks retrieval and retrieved keys at every call
    tight = streaming_nll(model, ids, press, CHUNK)
    assert tight.nll_sum != dense.nll_sum
    assert log["retrievals"] >= 2 * 4
    # Causal retrieval: the positions of a chunk choose differently (else the mask would hide nothing).
    assert (log["distinct_choices"] > 1) == (retrieval == "causal")
    # Each query attends at most the budget plus the chunk up to itself, though the cache holds
    # the union of the chunk's choices during the call.
    assert tight.peak_attended_keys <= press.budget + CHUNK and max(log["between"]) <= 4 + 32 <= press.budget
    assert log["memory"][0][2].numel() == 96  # 12 blocks of 8 evicted, 28 local tokens left
    # Layer 0's keys and values depend on the token and its position only: equal to dense bit for bit.
    assert_memory_matches(log["memory"], dense_cache, layers=[0])


def test_budget_and_protocol_guard(ids):
    press = InfLLMPress.from_budget(512, n_init=4, local=64, block_size=32)
    assert press.top_k == 13 and press.budget == 484
    with pytest.raises(ValueError, match="no room"):
        InfLLMPress.from_budget(90, n_init=4, local=64, block_size=32)
    with pytest.raises(ValueError, match="local window"):
        InfLLMPress(local=16, block_size=32)


def test_context_protocol_streams_the_context_with_the_press_on(ids):
    """In the context protocol a decode-time press sees the context stream in and stays on while
    the scored tokens are fed: with nothing evicted it is dense exactly, with a tight memory not."""
    model = build(tiny_neox_config())
    settings = dict(context_tokens=96, eval_tokens=16, chunk_tokens=CHUNK)
    dense = context_nll(model, ids, None, **settings)
    roomy = InfLLMPress(n_init=4, local=128, block_size=8, top_k=1, positions="original")
    assert context_nll(model, ids, roomy, **settings).nll_sum == dense.nll_sum
    tight = context_nll(model, ids, InfLLMPress(**TIGHT), **settings)
    assert tight.nll_sum != dense.nll_sum and tight.cache_tokens <= 4 + 32
