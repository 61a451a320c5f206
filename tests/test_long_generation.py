"""evaluation/long_generation.py on the CPU: the ring and dense runs binned, the token check against
the slow path, the result JSON and its plot (evaluation/long_generation_plot.py)."""

import json

import pytest

from evaluation import long_generation, long_generation_plot
from tests.conftest import tiny_neox_config


def test_long_generation_bins_each_run_checks_the_tokens_and_plots(tmp_path):
    tiny_neox_config().save_pretrained(tmp_path / "model")  # a local folder: random init from its config
    output = tmp_path / "long.json"
    long_generation.main(["--model", str(tmp_path / "model"), "--random-init", "--device", "cpu",
                          "--prompt_tokens", "12", "--new_tokens", "42", "--budget", "8", "--dense_tokens", "10",
                          "--bin_tokens", "8", "--check_tokens", "20", "--check_budget", "6", "--output", str(output)])
    result = json.loads(output.read_text())
    ring, dense = result["runs"]
    assert (ring["method"], ring["budget"], dense["method"]) == ("streaming_llm_ring", 8, "dense")
    # 41 steps after the prefill's token: the first alone, then bins of 8 (the last one partial)
    assert [row["steps"] for row in ring["bins"]] == [8] * 5
    assert [row["steps"] for row in dense["bins"]] == [8]
    assert ring["kept_after_prefill"] == 8 and ring["positions_reached"] == 12 + 42
    assert all(row["tpot_ms"] > 0 and row["floor_ms"] > 0 for row in ring["bins"] + dense["bins"])
    assert [row["identical"] for row in result["check"]["rows"]] == [True, True]
    long_generation_plot.main([str(output)])
    assert output.with_suffix(".png").stat().st_size > 0


def test_a_budget_the_ring_cannot_hold_is_refused_before_loading(capsys):
    with pytest.raises(SystemExit) as exit_info:
        long_generation.main(["--model", "EleutherAI/pythia-70m", "--random-init", "--budget", "4", "--n_sink", "8"])
    assert exit_info.value.code == 2
    assert "8 sink tokens do not fit a budget of 4" in capsys.readouterr().err
