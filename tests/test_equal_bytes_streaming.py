"""evaluation/equal_bytes_streaming.py on a tiny GPT-NeoX folder: the baselines and RD-KV parts
write their rows at equal bytes, RD-KV paired against the baselines' best row; bad input is one
line, exit code 2, no file."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, shared_data_dir

SCRIPT = str(REPO_ROOT / "evaluation" / "equal_bytes_streaming.py")
COMMON = ["--dataset", "wikitext", "--budget_tokens", "48", "--chunk_tokens", "32", "--max_tokens", "225",
          "--window", "16"]


def run_cli(folder, *args):
    env = os.environ | {"KVPRESS_NEOX_DATA": str(shared_data_dir()), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, SCRIPT, "--model", str(folder), *COMMON, *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_baselines_and_rdkv_rows_at_equal_bytes_paired_with_the_best_baseline(tiny_pythia_folder, tmp_path):
    baselines, rdkv = tmp_path / "baselines.json", tmp_path / "rdkv.json"
    result = run_cli(tiny_pythia_folder, "--part", "baselines", "--scorers", "streaming_llm", "h2o", "snapkv", "--bits", "4",
                     "--recent_tokens", "16", "--output", str(baselines))
    assert result.returncode == 0, result.stderr
    rows = json.loads(baselines.read_text())["rows"]
    assert [row["method"] for row in rows] == ["dense", "streaming_llm", "streaming_llm+kivi4", "h2o", "h2o+kivi4",
                                               "snapkv", "snapkv+kivi4"]
    for row in rows[1:]:
        assert row["peak_kv_bytes_fraction"] <= 1 and row["kv_bytes_fraction"] <= row["peak_kv_bytes_fraction"]
        assert row["scored_token_range"] == [49, 224] and row["scored_tokens"] == 224 - 48
        assert len(row["unit_nll"]) == 1 and "delta_pct" in row
    assert rows[2]["mean_cache_tokens"] > rows[1]["mean_cache_tokens"]  # 4-bit tokens: more of them in the bytes
    result = run_cli(tiny_pythia_folder, "--part", "rdkv", "--rdkv", "", "key_layout=token", "--versus", str(baselines),
                     "--output", str(rdkv))
    assert result.returncode == 0, result.stderr
    rows_rdkv = json.loads(rdkv.read_text())["rows"]
    best = min(rows[1:], key=lambda row: row["ppl"])
    assert [row["method"] for row in rows_rdkv] == ["dense", "rdkv[]", "rdkv[key_layout=token]"]
    assert rows_rdkv[0]["unit_nll"] == rows[0]["unit_nll"]  # the same dense run
    for row in rows_rdkv[1:]:
        assert row["peak_kv_bytes_fraction"] <= 1 and row["versus_method"] == best["method"]
        expected = 100 * (row["ppl"] / best["ppl"] - 1)
        assert row["versus_pct"] == pytest.approx(expected) and row["ppl"] != rows[0]["ppl"]


def test_first_token_streams_a_later_stretch_and_is_not_paired_with_another(tiny_pythia_folder, tmp_path):
    start, later = tmp_path / "start.json", tmp_path / "later.json"
    for first, output in ((0, start), (64, later)):
        result = run_cli(tiny_pythia_folder, "--part", "baselines", "--scorers", "streaming_llm", "--bits", "4",
                         "--recent_tokens", "16", "--first_token", str(first), "--output", str(output))
        assert result.returncode == 0, result.stderr
    payloads = [json.loads(path.read_text()) for path in (start, later)]
    assert [payload["first_token"] for payload in payloads] == [0, 64]
    assert payloads[0]["rows"][0]["unit_nll"] != payloads[1]["rows"][0]["unit_nll"]  # another stretch of the text
    result = run_cli(tiny_pythia_folder, "--part", "rdkv", "--first_token", "64", "--versus", str(start),
                     "--output", str(tmp_path / "rdkv.json"))
    assert result.returncode == 2 and "first_token" in result.stderr


def test_quantized_only_leaves_out_the_fp16_rows_and_keeps_the_quantized_ones(tiny_pythia_folder, tmp_path):
    output = tmp_path / "quantized.json"
    result = run_cli(tiny_pythia_folder, "--part", "baselines", "--scorers", "h2o", "tova", "--bits", "4",
                     "--recent_tokens", "16", "--quantized_only", "--output", str(output))
    assert result.returncode == 0, result.stderr
    rows = json.loads(output.read_text())["rows"]
    assert [row["method"] for row in rows] == ["dense", "h2o+kivi4", "tova+kivi4"]
    assert all(row["ppl"] != rows[0]["ppl"] and row["peak_kv_bytes_fraction"] <= 1 for row in rows[1:])


def test_chunks_of_one_token_leave_out_snapkv_and_say_why(tiny_pythia_folder, tmp_path):
    output = tmp_path / "chunk1.json"
    result = run_cli(tiny_pythia_folder, "--part", "baselines", "--scorers", "snapkv", "streaming_llm", "--bits", "8",
                     "--recent_tokens", "16", "--chunk_tokens", "1", "--max_tokens", "65", "--output", str(output))
    assert result.returncode == 0, result.stderr
    payload = json.loads(output.read_text())
    assert [row["method"] for row in payload["rows"]] == ["dense", "streaming_llm", "streaming_llm+kivi8"]
    assert "snapkv scores with the last 16 queries" in payload["not_run"]["snapkv"]


@pytest.mark.parametrize("args, message", [
    (["--part", "rdkv", "--rdkv", "after_h2o=0.5"], "its streaming form is h2o_keep"),
    (["--part", "rdkv", "--rdkv", "h2o_keep=-1"], "h2o_keep must be at least 0"),
    (["--part", "rdkv", "--rdkv", "windows=3"], "unknown RD-KV setting"),
    (["--part", "baselines", "--max_tokens", "40"], "scores no token past the budget"),
    (["--part", "baselines", "--recent_tokens", "48"], "below budget_tokens"),
    (["--part", "baselines", "--first_token", "-1"], "--first_token must be at least 0"),
    (["--part", "rdkv", "--rdkv", "carry_received=2"], "carry_received is 0 or 1"),
])
def test_bad_input_is_one_line_exit_2_and_no_file(tiny_pythia_folder, tmp_path, args, message):
    output = tmp_path / "bad.json"
    result = run_cli(tiny_pythia_folder, *args, "--output", str(output))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not output.exists()
