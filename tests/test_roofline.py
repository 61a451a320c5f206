"""The roofline model for Pythia-2.8B agrees with a hand computation and with evaluation/flops.py;
floors divide by the ceilings they are given, per layer for ragged caches."""

import json

import pytest

from evaluation import ceilings, flops
from evaluation.roofline import decode_floors, load_config, operators, step_bytes, step_floor_ms

MATMULS = {"qkv_proj", "out_proj", "mlp_up", "mlp_down", "lm_head"}
H100_MEASURED = ceilings.named("h100-measured")  # what the H100 result files divided by
WEIGHT_BYTES = 2 * (32 * (2560 * 7680 + 2560 * 2560 + 2 * 2560 * 10240) + 2560 * 50304)


def test_pythia_2_8b_decode_floor_by_hand():
    config = load_config("EleutherAI/pythia-2.8b")
    # Weights read once per token: 32 layers x (qkv 2560x7680 + out 2560^2 + MLP 2 x 2560x10240) + LM head 2560x50304
    assert WEIGHT_BYTES == 5_290_721_280
    kv_bytes = 2 * 2 * 2560 * 32 * 2001  # K and V, fp16, 32 layers, 2000 cached + 1 new token
    by_hand_ms = 1e3 * (WEIGHT_BYTES + kv_bytes) / 3.0e12
    floor = step_floor_ms(config, batch=1, new_tokens=1, cache=2000, ceilings=H100_MEASURED)
    assert floor == pytest.approx(by_hand_ms, rel=0.01)  # activations add well under 1%
    assert 1.9 < floor < 2.1  # the H100 files: about 2 ms per token at 3.0 TB/s


def test_batch_1_floor_is_the_step_bytes_over_the_given_bandwidth():
    config = load_config("EleutherAI/pythia-2.8b")
    given = ceilings.given(bandwidth=4.24e12, peak_flops=790e12, gemv_bandwidth=3.66e12, datasheet="h200")
    step = step_bytes(config, 1, 1, 2000)
    assert step / 1e9 == pytest.approx(5.953, abs=1e-3)  # DESIGN.md: 5.95 GB per step
    assert step_floor_ms(config, 1, 1, 2000, given) == pytest.approx(1e3 * step / 4.24e12, rel=1e-12)
    assert step_floor_ms(config, 1, 1, 2000, given, given.gemv_bandwidth) == pytest.approx(1e3 * step / 3.66e12,
                                                                                          rel=1e-12)
    floors = decode_floors(config, 1, [2000 - 128] * 32, 256, given)  # mean cache over 256 new tokens: 2000
    assert floors["tpot_floor_ms"] == pytest.approx(1e3 * step / 4.24e12, rel=1e-12)
    assert floors["tpot_floor_gemv_ms"] == pytest.approx(1e3 * step / 3.66e12, rel=1e-12)
    assert floors["tpot_floor_datasheet_ms"] == pytest.approx(1e3 * step / 4.8e12, rel=1e-12)  # H200 datasheet
    assert floors["step_gb"] == pytest.approx(step / 1e9)


def test_ragged_caches_count_every_layers_own_length():
    config = load_config("EleutherAI/pythia-2.8b")
    given = ceilings.given(bandwidth=4.0e12, peak_flops=800e12)
    # PyramidKV-like at 50% of 2000: 1936 tokens in layer 0, falling to 64 in the top layer (mean 1000)
    ragged = [round(1936 - layer * (1936 - 64) / 31) for layer in range(32)]
    assert ragged[0] == 1936 and sum(ragged) / 32 == pytest.approx(1000, abs=1)
    per_layer = step_floor_ms(config, 1, 1, ragged, given)
    from_layer_0 = step_floor_ms(config, 1, 1, ragged[0], given)
    assert per_layer < from_layer_0
    kv_by_hand = sum(2 * 2 * 2560 * (kept + 1) for kept in ragged)  # K and V of each layer, + the new token
    assert step_bytes(config, 1, 1, ragged) - step_bytes(config, 1, 1, 0) == kv_by_hand - 32 * 2 * 2 * 2560
    assert per_layer == pytest.approx(1e3 * step_bytes(config, 1, 1, ragged) / 4.0e12, rel=1e-12)
    # one length for every layer is the same as a list of it
    assert step_bytes(config, 1, 1, [1000] * 32) == step_bytes(config, 1, 1, 1000)
    with pytest.raises(ValueError, match="32 layers"):
        step_bytes(config, 1, 1, [1000] * 31)


def test_ragged_decode_flops_sum_each_layers_attention():
    config = load_config("EleutherAI/pythia-2.8b")
    ragged = [1936] + [1000] * 30 + [64]
    expected = 10 * flops.weight_flops_per_token(config) + sum(
        4 * 2560 * sum(kept + step + 1 for step in range(10)) for kept in ragged)
    assert flops.decode_flops(config, ragged, 10) == expected
    assert flops.decode_flops(config, ragged, 10) < flops.decode_flops(config, 1936, 10)
    assert flops.decode_flops(config, [500] * 32, 10) == flops.decode_flops(config, 500, 10)


def test_operator_flops_agree_with_the_flop_count():
    config = load_config("EleutherAI/pythia-2.8b")
    ops = {op.name: op for op in operators(config, batch=1, new_tokens=1, cache=2000)}
    assert sum(ops[name].flops for name in MATMULS) == flops.weight_flops_per_token(config)
    assert ops["attention"].flops == flops.attention_flops_per_token(config, 2001)
    # About 2 FLOPs per parameter plus attention, as the issue states.
    assert flops.weight_flops_per_token(config) == pytest.approx(2 * 2.775e9, rel=0.05)


def test_large_batches_turn_matmuls_compute_bound():
    config = load_config("EleutherAI/pythia-2.8b")
    peak, bandwidth = H100_MEASURED.peak_flops, H100_MEASURED.bandwidth
    decode = {op.name: op for op in operators(config, batch=1, new_tokens=1, cache=2000)}
    prefill = {op.name: op for op in operators(config, batch=1, new_tokens=2000, cache=0)}
    assert decode["mlp_up"].flops / peak < decode["mlp_up"].bytes / bandwidth  # batch-1 decode: memory-bound
    assert prefill["mlp_up"].flops / peak > prefill["mlp_up"].bytes / bandwidth  # 2000-token prefill: compute-bound


def test_measured_ceilings_on_the_cpu_and_datasheet_names():
    measured = ceilings.measure("cpu", repeats=2)
    copy = measured.details["copy"]
    assert copy["bytes_moved"] == 2 * 8 * 2**20  # read + write of the 8 MiB tensor
    assert measured.bandwidth == copy["bytes_moved"] / copy["median_s"]
    gemv = measured.details["gemv"]
    assert gemv["bytes_moved"] == 4 * 4 * (1024 * 256 + 1024 + 256)  # four fp32 matrices and their vectors
    assert measured.gemv_bandwidth == gemv["bytes_moved"] / gemv["median_s"]
    assert measured.peak_flops == 2 * 256**3 / measured.details["matmul"]["median_s"]
    assert measured.datasheet is None and measured.source.startswith("measured on cpu")
    assert ceilings.datasheet_for("NVIDIA H200") == "h200"
    assert ceilings.datasheet_for("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert ceilings.datasheet_for("NVIDIA A100-SXM4-80GB") == "a100-sxm-80gb"
    assert ceilings.datasheet_for("NVIDIA H100 PCIe") is None
    assert ceilings.named("a100-sxm-80gb").bandwidth == 2.039e12


def test_pythia_configs_ship_as_package_data():
    """configs/ is a package: the exact Pythia configs are found where it is installed, not only in a checkout."""
    import importlib.resources

    from evaluation.models import PYTHIA_CONFIGS, pythia_config_path

    shipped = importlib.resources.files("configs") / "models" / "pythia-2.8b.json"
    assert shipped.is_file() and pythia_config_path("EleutherAI/pythia-2.8b") == PYTHIA_CONFIGS / "pythia-2.8b.json"
    assert json.loads(shipped.read_text())["num_hidden_layers"] == 32
