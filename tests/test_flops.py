"""The analytic FLOPs count equals what torch's FlopCounterMode counts, and gives Pythia's size."""

import json

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from evaluation import flops
from evaluation.models import pythia_config_path
from tests.conftest import build, tiny_llama_config, tiny_neox_config


def counted_decode_step(model, cache_tokens: int) -> int:
    ids = torch.randint(0, 1000, (1, cache_tokens + 1))
    cache = DynamicCache()
    with torch.no_grad():
        model(ids[:, :-1], past_key_values=cache)
        with FlopCounterMode(display=False) as counter:
            model(ids[:, -1:], past_key_values=cache)
    return counter.get_total_flops()


def test_decode_step_matches_flop_counter():
    for config in [tiny_neox_config(), tiny_llama_config()]:
        model = build(config, attn_implementation="eager")
        expected = flops.weight_flops_per_token(config) + flops.attention_flops_per_token(config, 41)
        rope_angles = 2 * model.model.rotary_emb.inv_freq.numel()  # RoPE's frequency x position matmul
        assert counted_decode_step(model, cache_tokens=40) == expected + rope_angles


def test_pythia_2_8b_size_and_decode_flops():
    config = AutoConfig.for_model(**json.loads(pythia_config_path("EleutherAI/pythia-2.8b").read_text()))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == 2_775_208_960  # the Pythia paper's count
    # Matrix weights = all parameters but embeddings, biases and layer norms; the LM head counts.
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_in" not in n)
    assert flops.weight_flops_per_token(config) == 2 * matrices
    # Decode at a 2048-token cache: attention adds 4 * layers * hidden * 2048 = 0.67 GFLOPs.
    assert flops.attention_flops_per_token(config, 2048) == 4 * 32 * 2560 * 2048
