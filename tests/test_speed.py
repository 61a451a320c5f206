"""evaluation/speed.py's measure: floors at every layer's own kept length over the ceilings it is
given, the first call's cost for every decoder, transformers' static cache reused across calls."""

import statistics

import pytest
import torch
from kvpress import PyramidKVPress

from decoding.reference import hf_generate
from decoding.registry import DECODER_NAMES
from evaluation import ceilings, flops, roofline, speed
from tests.conftest import build, record_cache_lengths, tiny_neox_config

GIVEN = ceilings.given(bandwidth=2.0e12, peak_flops=500e12, gemv_bandwidth=1.5e12, datasheet="h200")


@pytest.fixture(scope="module")
def model():
    return build(tiny_neox_config(num_hidden_layers=3), attn_implementation="sdpa")


def prompt(batch: int = 1, length: int = 100) -> torch.Tensor:
    return speed.prompt_ids(1000, batch, length, seed=3)


@pytest.mark.parametrize("decoder", ["kvpress", "neox"])
def test_a_ragged_cache_has_its_floor_and_flops_from_every_layers_length(model, decoder):
    press = PyramidKVPress(0.5, window_size=4, beta=2)
    lengths = record_cache_lengths(press)
    row = speed.measure(model, prompt(), press, new_tokens=6, repeats=1, decoder=decoder, ceilings=GIVEN)
    kept = row["kept_tokens_per_layer"]
    assert kept == lengths[-3:]  # what the press left in each layer (the last prefill's three layers)
    assert len(set(kept)) > 1, "the press must leave the layers ragged for this test to mean anything"
    assert row["kept_tokens_layer0"] == kept[0] and row["kept_tokens_mean"] == sum(kept) / 3
    mean_cache = [k + 6 / 2 for k in kept]
    step = roofline.step_bytes(model.config, 1, 1, mean_cache)
    assert row["tpot_floor_ms"] == pytest.approx(1e3 * step / 2.0e12, rel=1e-12)  # bytes / the given bandwidth
    assert row["tpot_floor_gemv_ms"] == pytest.approx(1e3 * step / 1.5e12, rel=1e-12)
    assert row["tpot_floor_datasheet_ms"] == pytest.approx(1e3 * step / 4.8e12, rel=1e-12)
    assert row["tpot_over_floor"] == pytest.approx(row["tpot_ms"] / row["tpot_floor_ms"])
    from_layer_0 = roofline.step_floor_ms(model.config, 1, 1, kept[0] + 6 / 2, GIVEN)
    assert row["tpot_floor_ms"] < from_layer_0  # PyramidKV keeps most in layer 0
    assert row["decode_gflops_per_token"] == pytest.approx(flops.decode_flops(model.config, kept, 5) / 5 / 1e9)
    assert row["copy_tb_per_s"] == 2.0 and row["gemv_tb_per_s"] == 1.5 and row["ceilings_source"] == "given"


@pytest.mark.parametrize("decoder", DECODER_NAMES)
def test_every_decoder_reports_its_first_calls_cost(model, decoder):
    row = speed.measure(model, prompt(), None, new_tokens=4, repeats=2, warmup=1, decoder=decoder, ceilings=GIVEN)
    assert len(row["warmup_runs_s"]) == 1 and len(row["timed_runs_s"]) == 2
    assert row["first_call_s"] == row["warmup_runs_s"][0] > 0
    assert row["run_s"] == statistics.median(row["timed_runs_s"])
    assert row["compile_s"] == row["first_call_s"] - row["run_s"]
    assert row["kept_tokens_per_layer"] == [100] * 3


def test_hf_static_reuses_one_static_cache_and_keeps_its_tokens(model, monkeypatch):
    made = []

    class CountedStaticCache(speed.StaticCache):
        def __init__(self, *args, **kwargs):
            made.append(self)
            super().__init__(*args, **kwargs)

    ids = prompt(batch=2, length=40)
    fresh = hf_generate(model, ids, 8, speed.StaticCache(config=model.config, max_cache_len=48)).tokens  # a new cache
    monkeypatch.setattr(speed, "StaticCache", CountedStaticCache)
    row = speed.measure(model, ids, None, new_tokens=8, repeats=2, warmup=1, decoder="hf_static", ceilings=GIVEN)
    assert len(made) == 1  # one cache for the warm-up and both timed runs (two generate calls each)
    assert row["tokens"] == fresh.tolist()
    dynamic = speed.measure(model, ids, None, new_tokens=8, repeats=1, decoder="hf_sdpa", ceilings=GIVEN)
    assert dynamic["tokens"] == fresh.tolist() and len(made) == 1


def test_ceilings_default_to_a_measurement_of_the_device_once_per_process(model):
    row = speed.measure(model, prompt(length=20), None, new_tokens=3, repeats=1, decoder="kvpress")
    measured = ceilings.machine_ceilings("cpu")
    assert measured is ceilings.machine_ceilings(torch.device("cpu"))  # measured once, then reused
    assert row["copy_tb_per_s"] == measured.bandwidth / 1e12 and row["ceilings_source"].startswith("measured on cpu")
    expected = roofline.step_floor_ms(model.config, 1, 1, [20 + 3 / 2] * 3, measured)
    assert row["tpot_floor_ms"] == pytest.approx(expected, rel=1e-12)
