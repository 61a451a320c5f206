"""The roofline model for Pythia-2.8B agrees with a hand computation and with evaluation/flops.py."""

import pytest

from evaluation import flops
from evaluation.roofline import GPUS, load_config, operators, step_floor_ms

MATMULS = {"qkv_proj", "out_proj", "mlp_up", "mlp_down", "lm_head"}


def test_pythia_2_8b_decode_floor_by_hand():
    config = load_config("EleutherAI/pythia-2.8b")
    # Weights read once per token: 32 layers x (qkv 2560x7680 + out 2560^2 + MLP 2 x 2560x10240) + LM head 2560x50304
    weight_bytes = 2 * (32 * (2560 * 7680 + 2560 * 2560 + 2 * 2560 * 10240) + 2560 * 50304)
    assert weight_bytes == 5_290_721_280
    kv_bytes = 2 * 2 * 2560 * 32 * 2001  # K and V, fp16, 32 layers, 2000 cached + 1 new token
    by_hand_ms = 1e3 * (weight_bytes + kv_bytes) / GPUS["h100-measured"][1]
    floor = step_floor_ms(config, batch=1, new_tokens=1, cache=2000)
    assert floor == pytest.approx(by_hand_ms, rel=0.01)  # activations add well under 1%
    assert 1.9 < floor < 2.1  # DESIGN.md: about 2 ms per token at 3.0 TB/s


def test_operator_flops_agree_with_the_flop_count():
    config = load_config("EleutherAI/pythia-2.8b")
    ops = {op.name: op for op in operators(config, batch=1, new_tokens=1, cache=2000)}
    assert sum(ops[name].flops for name in MATMULS) == flops.weight_flops_per_token(config)
    assert ops["attention"].flops == flops.attention_flops_per_token(config, 2001)
    # About 2 FLOPs per parameter plus attention, as the issue states.
    assert flops.weight_flops_per_token(config) == pytest.approx(2 * 2.775e9, rel=0.05)


def test_large_batches_turn_matmuls_compute_bound():
    config = load_config("EleutherAI/pythia-2.8b")
    peak, bandwidth, _ = GPUS["h100-measured"]
    decode = {op.name: op for op in operators(config, batch=1, new_tokens=1, cache=2000)}
    prefill = {op.name: op for op in operators(config, batch=1, new_tokens=2000, cache=0)}
    assert decode["mlp_up"].flops / peak < decode["mlp_up"].bytes / bandwidth  # batch-1 decode: memory-bound
    assert prefill["mlp_up"].flops / peak > prefill["mlp_up"].bytes / bandwidth  # 2000-token prefill: compute-bound
