"""The static-cache decode path gives the same greedy tokens as the kvpress loop."""

import pytest
import torch

from decoding.reference import kvpress_generate
from decoding.static_cache import RaggedCacheError, generate
from presses import make_press
from tests.conftest import build, tiny_llama_config, tiny_neox_config


@pytest.mark.parametrize("config", [tiny_neox_config(), tiny_llama_config()], ids=["neox", "llama"])
@pytest.mark.parametrize("name, ratio", [(None, 0.0), ("snapkv", 0.5), ("streaming_llm", 0.5), ("knorm", 0.75)])
def test_static_path_matches_the_kvpress_loop(config, name, ratio):
    model = build(config, attn_implementation="sdpa")
    prompt = torch.randint(2, 1000, (2, 100), generator=torch.Generator().manual_seed(3))
    press = make_press(name, ratio) if name else None
    expected = kvpress_generate(model, prompt, press, new_tokens=12).tokens
    assert torch.equal(generate(model, prompt, press, new_tokens=12).tokens, expected)


def test_ragged_caches_are_refused_with_a_reason():
    model = build(tiny_neox_config(), attn_implementation="sdpa")
    prompt = torch.randint(2, 1000, (1, 100), generator=torch.Generator().manual_seed(3))
    from kvpress import PyramidKVPress

    with pytest.raises(RaggedCacheError, match="one length"):
        generate(model, prompt, PyramidKVPress(0.5, window_size=4, beta=2), new_tokens=4)
