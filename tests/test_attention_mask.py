"""Caches whose layers hold different numbers of tokens (PyramidKV) work with eager and SDPA
attention: a multi-token continuation, which needs a mask, gives what token-by-token SDPA
decoding gives (one query: no mask at all, so an independent reference)."""

import copy

import pytest
import torch
from kvpress import PyramidKVPress
from transformers import DynamicCache

from patches.attention_mask import fit_mask_to_keys
from tests.conftest import build, tiny_llama_config, tiny_neox_config

CONTEXT, CONTINUATION = 96, 16


def pyramid_cache(model, ids):
    cache = DynamicCache()
    # window 4, beta 2 on 96 tokens: per-layer budgets 72 and 24 (the default window needs >= 2560 tokens)
    with torch.no_grad(), PyramidKVPress(compression_ratio=0.5, window_size=4, beta=2)(model):
        model.model(input_ids=ids[:, :CONTEXT], past_key_values=cache)
    return cache


@pytest.mark.parametrize(
    "config, attn_implementation",
    [(tiny_neox_config(), "eager"), (tiny_neox_config(), "sdpa"), (tiny_llama_config(), "eager"),
     (tiny_llama_config(), "sdpa")],
    ids=["neox-eager", "neox-sdpa", "llama-eager", "llama-sdpa"],
)
def test_continuation_over_uneven_layers_matches_token_by_token(config, attn_implementation):
    ids = torch.randint(0, 1000, (1, CONTEXT + CONTINUATION), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(CONTEXT, CONTEXT + CONTINUATION)[None]
    model = build(config, attn_implementation=attn_implementation)
    cache = pyramid_cache(model, ids)
    assert [layer.keys.shape[2] for layer in cache.layers] == [72, 24]
    reference_model = build(config, attn_implementation="sdpa")
    reference_cache = copy.deepcopy(cache)
    with torch.no_grad():
        logits = model(ids[:, CONTEXT:], past_key_values=cache, position_ids=positions).logits
        steps = [
            reference_model(ids[:, CONTEXT + i : CONTEXT + i + 1], past_key_values=reference_cache,
                            position_ids=positions[:, i : i + 1]).logits
            for i in range(CONTINUATION)
        ]
    torch.testing.assert_close(logits, torch.cat(steps, dim=1), rtol=1e-5, atol=1e-5)


def test_fit_mask_keeps_the_causal_block_and_refuses_padding():
    causal = torch.tensor([[True, True, True, False], [True, True, True, True]])[None, None]  # 2 past + 2 new
    fitted = fit_mask_to_keys(causal, key_length=5)
    assert fitted.shape[-1] == 5 and fitted[..., :3].all() and torch.equal(fitted[..., 3:], causal[..., 2:])
    padded = causal.clone()
    padded[..., 0] = False
    with pytest.raises(ValueError, match="padded"):
        fit_mask_to_keys(padded, key_length=5)
