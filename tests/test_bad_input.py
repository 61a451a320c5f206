"""Bad input to the command-line programs (issue 14, items 7, 8 and 10): one line ``error: ...``
naming the value and what to do, exit code 2, no traceback and no result file; data and length
errors before the model's weights load; a hub that cannot be reached fails at once; the
pipeline with a tokenizer without BOS says what to set."""

import json
import os
import re
import subprocess

import huggingface_hub
import pytest
import torch
from transformers import PreTrainedTokenizerFast, pipeline

import evaluation.models
from evaluation import cli, perplexity, profile_step, report, speed_grid, step_floor
from evaluation.models import ModelLoadError, hub_reachable, load_model, offline_unless_hub_reachable
from patches.pipeline_bos import MissingBosTokenError
from presses import PressConfigError, Settings, make_streaming_press
from tests.conftest import REPO_ROOT, shared_data_dir


@pytest.fixture
def hub_unreachable(monkeypatch):
    """No network either way: the hub check answers 'unreachable'; offline mode is undone afterwards."""
    monkeypatch.setattr(evaluation.models, "hub_reachable", lambda: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def one_line_error(capsys, run) -> str:
    """Run ``run()``, which must exit with code 2 and write exactly one line, ``error: ...``, to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def perplexity_error(capsys, tmp_path, *args, model=None) -> str:
    output = tmp_path / "never.json"
    line = one_line_error(capsys, lambda: perplexity.main(["--model", str(model), *args, "--output", str(output)]))
    assert not output.exists()
    return line


def test_binary_dataset_file_is_named(tiny_pythia_folder, tmp_path, capsys):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(128, 256)) * 8)
    line = perplexity_error(capsys, tmp_path, "--dataset", str(binary), model=tiny_pythia_folder)
    assert f"{binary} is not UTF-8 text" in line and "plain text file" in line


def test_empty_text_file_is_refused_not_counted_as_one_token(tiny_pythia_folder, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    line = perplexity_error(capsys, tmp_path, "--dataset", str(empty), model=tiny_pythia_folder)
    assert f"{empty} holds no text" in line


@pytest.mark.parametrize("option", ["--num_windows", "--eval_tokens"])
def test_zero_counts_are_named(tiny_pythia_folder, tmp_path, capsys, option):
    line = perplexity_error(capsys, tmp_path, option, "0", model=tiny_pythia_folder)
    assert f"{option} must be at least 1, got 0" in line


def test_eval_tokens_that_leave_no_context_say_what_to_change(tiny_pythia_folder, tmp_path, capsys):
    line = perplexity_error(capsys, tmp_path, "--eval_tokens", "300", model=tiny_pythia_folder)
    assert "no context is left in the model's 256-token context" in line and "--eval_tokens" in line


def test_missing_data_dir_is_named_as_missing(tiny_pythia_folder, tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    line = perplexity_error(capsys, tmp_path, "--data-dir", str(missing), model=tiny_pythia_folder)
    assert f"--data-dir {missing}: no such folder" in line


def test_a_bad_budget_value_is_one_line_not_the_usage(tiny_pythia_folder, tmp_path, capsys):
    line = perplexity_error(capsys, tmp_path, "--protocol", "streaming", "--budget", "x", model=tiny_pythia_folder)
    assert "--budget: invalid int value: 'x'" in line and "--help" in line


def test_a_zero_budget_names_the_option_not_an_internal_object(tiny_pythia_folder, tmp_path, capsys):
    line = perplexity_error(capsys, tmp_path, "--protocol", "streaming", "--budget", "512", "0", model=tiny_pythia_folder)
    assert "--budget must be at least 1" in line and "got 0" in line and "Settings(" not in line
    with pytest.raises(PressConfigError, match=r"--budget 0\b") as error:
        make_streaming_press("streaming_llm", Settings(budget=0))
    assert "Settings(" not in str(error.value)


def test_data_and_length_errors_come_before_the_model_loads(tiny_pythia_folder, tmp_path, capsys, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("the weights loaded before the input was checked")

    monkeypatch.setattr(cli, "load_model", no_weights)
    binary = tmp_path / "binary.dat"
    binary.write_bytes(b"\xff\xfe\x00" * 100)
    assert "not UTF-8 text" in perplexity_error(capsys, tmp_path, "--dataset", str(binary), model=tiny_pythia_folder)
    line = perplexity_error(capsys, tmp_path, "--eval_tokens", "32", "--num_windows", "5000", model=tiny_pythia_folder)
    assert "5000 window(s) of 224 + 32 + 1 need" in line and "--num_windows" in line
    line = one_line_error(capsys, lambda: speed_grid.main(["--model", str(tiny_pythia_folder), "--prompt_tokens", "10000000",
                                                           "--output_dir", str(tmp_path / "never")]))
    assert "fewer than --prompt_tokens 10000000" in line and not (tmp_path / "never").exists()


def test_a_quantized_cache_on_another_decoder_is_refused_before_loading(tmp_path, capsys):
    line = one_line_error(capsys, lambda: speed_grid.main(["--random-init", "--kv_quant", "int4", "--decoder", "neox",
                                                           "--output_dir", str(tmp_path / "never")]))
    assert "--kv_quant runs on the kvpress decoder only" in line and not (tmp_path / "never").exists()


def test_step_floor_with_an_unknown_model_offline_is_one_line(capsys, hub_unreachable):
    line = one_line_error(capsys, lambda: step_floor.main(["--model", "foo/bar", "--gpu", "h200"]))
    assert "no config for foo/bar" in line and "pythia-2.8b" in line and "local model folder" in line


def test_step_floor_usage_errors_are_one_line(capsys):
    assert "one of the arguments" in one_line_error(capsys, lambda: step_floor.main(["--cache", "2000"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal on a machine without CUDA")
def test_profiling_kernels_without_cuda_is_one_line(capsys):
    assert "needs a CUDA device" in one_line_error(capsys, lambda: profile_step.main(["--random-init"]))


def test_an_unreachable_hub_switches_to_offline_mode_and_fails_at_once(hub_unreachable):
    with pytest.raises(ModelLoadError, match="cannot load foo/bar .*hub cannot be reached from here.*smollm2-135m"):
        load_model("foo/bar")
    assert huggingface_hub.constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_reachable_hub_keeps_online_mode(monkeypatch):
    monkeypatch.setattr(evaluation.models, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert offline_unless_hub_reachable() is False and huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_the_hub_check_is_one_short_connection(monkeypatch):
    calls = []

    def refuse(address, timeout):
        calls.append((address, timeout))
        raise OSError("unreachable")

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(evaluation.models.socket, "create_connection", refuse)
    assert hub_reachable.__wrapped__() is False
    assert len(calls) == 1 and calls[0][1] == 2.0  # huggingface.co:443, or the mirror HF_ENDPOINT names
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # a direct connection says nothing behind a proxy
    assert hub_reachable.__wrapped__() is True and len(calls) == 1


def test_local_folders_never_check_the_hub(tiny_pythia_folder, monkeypatch):
    def no_check():
        raise AssertionError("a local folder checked the hub")

    monkeypatch.setattr(evaluation.models, "hub_reachable", no_check)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert load_model(str(tiny_pythia_folder), data_folder=shared_data_dir()).model.config.model_type == "gpt_neox"


def test_pipeline_with_a_tokenizer_without_bos_says_what_to_set(tiny_neox):
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(shared_data_dir() / "tokenizer" / "tokenizer.json"))
    assert tokenizer.bos_token is None and tokenizer.chat_template is None
    pipe = pipeline("kv-press-text-generation", model=tiny_neox, tokenizer=tokenizer, device="cpu")
    with pytest.raises(MissingBosTokenError, match=r"tokenizer.bos_token = '<\|endoftext\|>'"):
        pipe("The tower is tall.", question="How tall?", max_new_tokens=2)
    tokenizer.bos_token = "<|endoftext|>"  # what the message says to set: then it runs
    assert isinstance(pipe("The tower is tall.", question="How tall?", max_new_tokens=2)["answer"], str)


def streaming_result(path, budgets):
    rows = [{"method": "dense", "budget": None, "ppl": 10.0, "mean_nll": 2.3, "data": "text",
             "ppl_per_1024_tokens": [10.0]}]
    rows += [{"method": "streaming_llm", "budget": b, "ppl": 11.0, "mean_nll": 2.4, "data": "text",
              "ppl_per_1024_tokens": [11.0]} for b in budgets]
    path.write_text(json.dumps({"protocol": "streaming", "model": "m", "rows": rows}))
    return path


def test_report_says_why_the_ppl_along_the_text_plot_is_missing(tmp_path, capsys):
    result = streaming_result(tmp_path / "streaming.json", [256, 512])
    report.main([str(result), "--output", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert "no PPL-along-the-text plot" in err and "budget 1024 (--position_budget)" in err and "256, 512" in err
    assert not list(tmp_path.glob("r_by_position*"))
    report.main([str(result), "--output", str(tmp_path / "r"), "--position_budget", "512"])
    assert "no PPL-along-the-text plot" not in capsys.readouterr().err
    assert (tmp_path / "r_by_position_budget512.png").is_file()


def test_report_summary_has_the_readmes_columns_and_precision(tmp_path, capsys):
    rows = [{"method": "dense", "compression_ratio": 0.0, "ppl": 25.15123, "mean_nll": 3.224934, "scored_tokens": 2048,
             "mean_cache_tokens": 1536.0, "data": "w"},
            {"method": "snapkv", "compression_ratio": 0.5, "ppl": 26.8188, "mean_nll": 3.289106, "scored_tokens": 2048,
             "mean_cache_tokens": 768.0, "data": "w"}]
    result = tmp_path / "context.json"
    result.write_text(json.dumps({"protocol": "context", "model": "m", "rows": rows}))
    report.main([str(result), "--summary"])
    assert capsys.readouterr().out.splitlines() == [
        "| method | compression ratio | PPL | mean NLL | scored tokens | cache tokens per layer |",
        "| --- | --- | --- | --- | --- | --- |",
        "| dense | 0 | 25.151 | 3.2249 | 2048 | 1536 |",
        "| snapkv | 0.5 | 26.819 | 3.2891 | 2048 | 768 |"]
    assert not list(tmp_path.glob("*.png"))


def test_perplexity_help_lists_offline_examples_first(capsys):
    with pytest.raises(SystemExit):
        perplexity.main(["--help"])
    help_text = capsys.readouterr().out
    examples = re.findall(r"^  python evaluation/perplexity\.py .*$", help_text, flags=re.MULTILINE)
    hub_from = help_text.index("With the Hugging Face hub")
    offline = [line for line in examples if help_text.index(line) < hub_from]
    assert len(offline) >= 3 and all("smollm2-135m" in line or "--random-init" in line for line in offline)


@pytest.mark.skipif(not (REPO_ROOT / ".git").exists(), reason="needs the git checkout")
def test_make_demo_writes_where_git_ignores_it():
    makefile = (REPO_ROOT / "Makefile").read_text()
    output = re.search(r"^DEMO_OUTPUT \?= (\S+)$", makefile, flags=re.MULTILINE).group(1)
    assert "--output $(DEMO_OUTPUT)" in makefile
    ignored = subprocess.run(["git", "check-ignore", "-q", output], cwd=REPO_ROOT)
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", output], cwd=REPO_ROOT, capture_output=True)
    assert ignored.returncode == 0 and tracked.returncode != 0
