"""evaluation/perplexity.py: a full offline run writes its result file; bad input gets a
one-line error, exit code 2, no traceback and no result file."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from evaluation.models import data_dir, load_model, tokenized_text
from evaluation.protocols import context_nll
from tests.conftest import REPO_ROOT, shared_data_dir

SCRIPT = str(REPO_ROOT / "evaluation" / "perplexity.py")


def run_cli(*args, data_dir=None):
    env = os.environ | {"KVPRESS_NEOX_DATA": str(data_dir or shared_data_dir()), "HF_HUB_OFFLINE": "1",
                        "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300)


def test_a_context_run_writes_its_result(tiny_pythia_folder, tmp_path):
    output = tmp_path / "context.json"
    result = run_cli("--model", str(tiny_pythia_folder), "--press", "snapkv", "knorm", "--compression_ratio", "0",
                     "0.5", "--eval_tokens", "32", "--num_windows", "2", "--output", str(output))
    assert result.returncode == 0, result.stderr
    payload = json.loads(output.read_text())
    rows = payload["rows"]
    assert [(row["method"], row["compression_ratio"]) for row in rows] == [
        ("dense", 0.0), ("snapkv", 0.0), ("snapkv", 0.5), ("knorm", 0.0), ("knorm", 0.5)]
    assert rows[1]["ppl"] == rows[0]["ppl"] and rows[2]["ppl"] != rows[0]["ppl"]
    assert rows[2]["context_tokens"] == 256 - 32 and rows[2]["mean_cache_tokens"] == 112
    assert "snapkv" in result.stdout and "wrote" in result.stdout
    assert list(payload) == ["command", "model", "model_tier", "dtype", "weight_quant", "weight_quant_library",
                             "protocol", "environment", "rows"]
    assert payload["environment"]["torch"] and payload["command"].startswith("python evaluation/perplexity.py")


def test_int8_weights_are_scored_as_such(tiny_pythia_folder, tmp_path):
    output = tmp_path / "int8.json"
    result = run_cli("--model", str(tiny_pythia_folder), "--press", "knorm", "--compression_ratio", "0",
                     "--eval_tokens", "32", "--num_windows", "2", "--weight_quant", "int8", "--output", str(output))
    assert result.returncode == 0, result.stderr
    payload = json.loads(output.read_text())
    assert (payload["weight_quant"], payload["weight_quant_library"]) == ("int8", "torchao")
    int8 = torch.tensor(payload["rows"][0]["unit_nll"])  # each window's NLL sum, dense, int8 weights
    model = load_model(str(tiny_pythia_folder), device="cpu").model
    text = tokenized_text(str(tiny_pythia_folder), False, "wikitext", data_dir(shared_data_dir()))
    own = torch.tensor(context_nll(model, text.ids, None, 256 - 32, 32, 2).unit_nll)
    assert not torch.equal(int8, own) and torch.allclose(int8, own, rtol=0.05)


@pytest.mark.parametrize("protocol_args", [["--eval_tokens", "32"], ["--protocol", "streaming", "--budget", "128",
                                                                   "--max_tokens", "513"]], ids=["context", "streaming"])
def test_every_registered_press_runs_by_name(tiny_pythia_folder, tmp_path, protocol_args):
    from presses import press_names

    output = tmp_path / "all.json"
    result = run_cli("--model", str(tiny_pythia_folder), "--press", "all", *protocol_args, "--output", str(output))
    assert result.returncode == 0, result.stderr
    rows = json.loads(output.read_text())["rows"]
    streaming = "streaming" in protocol_args  # methods that act once after prefill have no streaming form
    assert [row["method"] for row in rows] == ["dense", *press_names(streaming)]
    # Every method holds less than dense: fewer tokens, or (cross-layer, attention-level) fewer bytes.
    # Stored bytes where the press says how it stores them (low-bit presses keep every token at
    # fewer bits), else the bytes its cache holds (cross-layer, attention-level) or its tokens.
    held = ["mean_cache_tokens"] if streaming else ["stored_kv_bytes", "kv_mib_after_prefill"]
    for row in rows[1:]:
        measure = next(name for name in held if name in row)
        assert row[measure] < rows[0][measure], (row["method"], measure)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "args, message",
    [
        (["--press", "nope"], "unknown press 'nope'; known presses: expected_attention"),
        (["--compression_ratio", "1.0"], "compression ratio must be in [0, 1), got 1.0"),
        (["--compression_ratio", "-0.1"], "compression ratio must be in [0, 1)"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--context_tokens", "4000"], "use --protocol streaming"),
        (["--dataset", "pg19", "--sample_idx", "7"], "out of range: 2 local PG-19 books"),
        (["--attn_implementation", "flash_attention_2"], "needs flash-attn"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_file(tiny_pythia_folder, tmp_path, args, message):
    output = tmp_path / "never.json"
    result = run_cli("--model", str(tiny_pythia_folder), *args, "--output", str(output))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not output.exists()


def test_missing_data_names_both_ways(tiny_pythia_folder, tmp_path):
    empty = tmp_path / "empty"
    (empty / "tokenizer").mkdir(parents=True)
    (empty / "tokenizer" / "tokenizer.json").write_text((shared_data_dir() / "tokenizer" / "tokenizer.json").read_text())
    result = run_cli("--model", str(tiny_pythia_folder), "--output", str(tmp_path / "x.json"), data_dir=empty)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--data-dir" in result.stderr and "KVPRESS_NEOX_DATA" in result.stderr and "datasets" in result.stderr


def test_unsupported_model_lists_supported_ones(gpt2_folder, tmp_path):
    result = run_cli("--model", str(gpt2_folder), "--output", str(tmp_path / "x.json"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "GPT2LMHeadModel is not supported" in result.stderr and "GPTNeoXForCausalLM" in result.stderr


def test_random_init_quality_is_refused():
    result = run_cli("--random-init", "--model", "EleutherAI/pythia-70m")
    assert result.returncode == 2 and "evaluation/speed_grid.py" in result.stderr


def test_random_init_weights_are_the_same_on_every_load():
    first, second = (load_model("EleutherAI/pythia-70m", True, "float32", "cpu").model for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    assert first.gpt_neox.layers[0].mlp.dense_h_to_4h.weight.std() > 0  # random, not zeros


def test_help_documents_every_option():
    result = run_cli("--help")
    for option in ["--model", "--random-init", "--dataset", "--sample_idx", "--press", "--compression_ratio",
                   "--protocol", "--device", "--dtype", "--attn_implementation", "--output", "--data-dir"]:
        assert option in result.stdout
