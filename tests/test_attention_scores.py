"""presses.attention.current_attention equals the attention weights the model itself computes."""

import torch
from transformers import DynamicCache

from presses.attention import current_attention
from tests.conftest import build, tiny_llama_config, tiny_neox_config


def test_current_attention_matches_eager_weights():
    for config in [tiny_neox_config(), tiny_llama_config()]:
        model = build(config, attn_implementation="eager")
        ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(1))
        captured = {}
        attention = model.model.layers[1].self_attn

        def keep(module, args, kwargs, output):
            captured.update(kwargs=kwargs, weights=output[1],
                            keys=kwargs["past_key_values"].layers[module.layer_idx].keys)

        cache = DynamicCache()
        with torch.no_grad():
            model(ids[:, :30], past_key_values=cache)
            hook = attention.register_forward_hook(keep, with_kwargs=True)
            model(ids[:, 30:], past_key_values=cache)  # 10 queries over 40 keys
            hook.remove()
            rebuilt = current_attention(attention, captured["kwargs"]["hidden_states"], captured["keys"],
                                        captured["kwargs"])
        assert rebuilt.shape == (1, 4, 10, 40)
        torch.testing.assert_close(rebuilt, captured["weights"].float(), rtol=1e-4, atol=1e-6)
