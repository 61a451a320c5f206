"""evaluation/streaming_steady_state.py: the fill point it computes is where the quantized baseline
really first evicts in a streamed run (tiny GPT-NeoX and Llama models), rows are rescored on the
stretches after the latest fill point with the best baseline chosen again there, streams of one book
pool their stretches (the best baseline chosen over the pool), and bad input is one line, exit code 2,
no file."""

import json
import math
import subprocess
import sys

import pytest
import torch

from evaluation.protocols import streaming_nll
from evaluation.streaming_steady_state import check_apart, pooled, quantized_fill_end, steady_state
from presses import Settings, make_streaming_press
from presses.quantized_budget_press import QuantizedBudgetPress
from tests.conftest import REPO_ROOT, build, record_cache_lengths, tiny_llama_config, tiny_neox_config

SCRIPT = str(REPO_ROOT / "evaluation" / "streaming_steady_state.py")


@pytest.mark.parametrize("config", [tiny_neox_config(), tiny_llama_config()], ids=["neox", "llama"])
@pytest.mark.parametrize("bits,layout", [(4, "kivi"), (2, "token")])
def test_the_fill_point_is_the_call_after_which_the_baseline_first_evicts(config, bits, layout):
    budget, chunk, recent = 48, 16, 16
    model = build(config)
    press = QuantizedBudgetPress(make_streaming_press("h2o", Settings(budget=budget)).base_press, bits=bits,
                                 key_layout="channel" if layout == "kivi" else "token", recent_tokens=recent,
                                 budget_tokens=budget)
    lengths = record_cache_lengths(press)
    tokens = 321
    streaming_nll(model, torch.randint(0, 1000, (tokens,), generator=torch.Generator().manual_seed(5)), press, chunk)
    layers = config.num_hidden_layers
    fed = [min(chunk * (call + 1), tokens - 1) for call in range(len(lengths) // layers)]
    first_eviction = next(fed[call] for call in range(len(fed)) if lengths[call * layers] < fed[call])
    head_dim = config.hidden_size // config.num_attention_heads
    assert quantized_fill_end(budget, head_dim, bits, layout, chunk, recent) == first_eviction
    assert first_eviction > budget  # quantized tokens: more of them than the budget's fp16 tokens


def _row(method, nll, budget=100, tokens=(50, 50, 50, 30)):
    return {"method": method, "budget_tokens": budget, "unit_nll": list(nll), "unit_tokens": list(tokens),
            "kv_bytes_fraction": 0.9}


def test_rows_are_rescored_after_the_latest_fill_point_and_the_best_baseline_chosen_again():
    dense = _row("dense", [100, 100, 100, 60])
    # b is best over all stretches (its first stretch is good), a is best over the last two
    a, b = _row("h2o+kivi4", [130, 110, 101, 61]), _row("tova+kivi4", [101, 101, 110, 66])
    ours = _row("rdkv[]", [120, 105, 102, 62])
    result = steady_state([(dense, 128), (a, 190), (b, 190), (ours, 128)])
    assert result["steady_from_token"] == 190 and result["units"] == 2 and result["scored_tokens"] == 80
    assert result["best_baseline"] == "h2o+kivi4"
    rows = {row["method"]: row for row in result["rows"]}
    expected = 100 * (math.exp((102 + 62) / 80) / math.exp((101 + 61) / 80) - 1)
    assert rows["rdkv[]"]["versus_method"] == "h2o+kivi4"
    assert rows["rdkv[]"]["versus_pct"] == pytest.approx(expected)
    assert rows["dense"]["delta_pct"] == 0 and "versus_method" not in rows["h2o+kivi4"]


def test_a_text_too_short_for_the_fill_point_is_refused():
    with pytest.raises(ValueError, match="no stretch begins after token 400"):
        steady_state([(_row("dense", [1, 1, 1, 1]), 128), (_row("h2o+kivi4", [1, 1, 1, 1]), 400)])


def test_streams_pool_their_stretches_and_the_best_baseline_is_chosen_over_the_pool():
    """Two streams of one book: every stretch past the budget of each (--all_stretches), pooled. a is
    the better baseline in the first stream and b in the second; over the pool b is, and RD-KV pairs
    with it on all eight stretches."""
    first = [(_row("dense", [100, 100, 100, 60]), 128), (_row("h2o+kivi4", [101, 101, 101, 61]), 190),
             (_row("tova+kivi4", [103, 103, 103, 62]), 190), (_row("rdkv[]", [102, 100, 101, 60]), 128)]
    second = [(_row("dense", [90, 90, 90, 50]), 128), (_row("h2o+kivi4", [96, 96, 96, 55]), 190),
              (_row("tova+kivi4", [91, 91, 91, 51]), 190), (_row("rdkv[]", [91, 90, 91, 51]), 128)]
    result = pooled([first, second], all_stretches=True)
    assert (result["streams"], result["units"], result["scored_tokens"]) == (2, 8, 360)
    assert result["steady_from_token"] == 100 and result["best_baseline"] == "tova+kivi4"
    rows = {row["method"]: row for row in result["rows"]}
    ours = (102 + 100 + 101 + 60 + 91 + 90 + 91 + 51) / 360
    tova = (103 * 3 + 62 + 91 * 3 + 51) / 360
    assert rows["rdkv[]"]["versus_method"] == "tova+kivi4"
    assert rows["rdkv[]"]["versus_pct"] == pytest.approx(100 * (math.exp(ours) / math.exp(tova) - 1))
    # each stream alone picks the other baseline first: the pool is not either stream's choice
    assert steady_state(first, all_stretches=True)["best_baseline"] == "h2o+kivi4"
    # past the fill points (190): the last two stretches of each stream, four in all
    assert pooled([first, second])["units"] == 4


def test_streams_that_differ_in_methods_or_overlap_are_refused():
    one = [(_row("dense", [1, 1, 1, 1]), 128), (_row("h2o+kivi4", [1, 1, 1, 1]), 128)]
    other = [(_row("dense", [1, 1, 1, 1]), 128), (_row("tova+kivi4", [1, 1, 1, 1]), 128)]
    with pytest.raises(ValueError, match="different methods"):
        pooled([one, other])
    check_apart([0, 8193], 8193)
    with pytest.raises(ValueError, match="from tokens 0 and 8192 overlap"):
        check_apart([8192, 0], 8193)


@pytest.mark.parametrize("args,message", [(["missing.json", "--head_dim", "64"], "no such file"),
                                          (["{file}", "--head_dim", "0"], "--head_dim must be positive")])
def test_bad_input_is_one_line_exit_2_and_no_file(tmp_path, args, message):
    present = tmp_path / "rows.json"
    present.write_text(json.dumps({"rows": []}))
    output = tmp_path / "steady"
    args = [arg.replace("{file}", str(present)) for arg in args]
    result = subprocess.run([sys.executable, SCRIPT, *args, "--output", str(output)], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not output.with_suffix(".json").exists()
