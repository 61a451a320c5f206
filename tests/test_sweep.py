"""Sweeps over several processes (evaluation/sweep.py): ``accelerate launch`` with 2 CPU processes
(gloo) writes the result file of the one-process run, row for row; a failed cell records its
error while the others finish, and a rerun measures only what is missing."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from accelerate import PartialState

from evaluation import grid, perplexity, speed_grid, sweep
from tests.conftest import shared_data_dir

QUALITY = ["--press", "snapkv", "knorm", "--compression_ratio", "0.25", "0.5", "--eval_tokens", "32",
           "--num_windows", "2", "--device", "cpu"]
STREAMING = ["--press", "streaming_llm", "knorm", "--protocol", "streaming", "--budget", "64", "128",
             "--max_tokens", "300", "--device", "cpu"]
SPEED = ["--device", "cpu", "--prompt_tokens", "80", "--new_tokens", "3", "--repeats", "1", "--decoder", "kvpress",
         "--press", "snapkv", "--compression_ratio", "0.5", "--batch_size", "1", "2", "--bandwidth", "3",
         "--peak_tflops", "700"]
# What a speed row measured in time: different in every run; everything else must be equal.
TIMED = {"ttft_ms", "tpot_ms", "decode_tokens_per_s", "end_to_end_tokens_per_s", "first_call_s", "run_s", "compile_s",
         "warmup_runs_s", "timed_runs_s", "tpot_over_floor", "tpot_over_gemv_floor", "tpot_speedup"}

# Both programs in one launch: the processes import torch and transformers once (CI has 2 cores).
DRIVER = """import json, sys
from evaluation import perplexity, speed_grid
quality, speed = json.loads(sys.argv[1]), json.loads(sys.argv[2])
perplexity.main(quality)
speed_grid.main(speed)
"""


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """WikiText-2's first 12,000 characters (about 3,000 tokens): every run here tokenizes it, so
    the short text saves each process the whole text's second of tokenizing."""
    path = tmp_path_factory.mktemp("text") / "wikitext_start.txt"
    path.write_text((shared_data_dir() / "wikitext-2-raw-v1" / "test.raw").read_text()[:12_000])
    return str(path)


@pytest.fixture
def one_thread():
    """The launched processes run one thread each (torchrun sets OMP_NUM_THREADS=1); the reference
    run here too, so both sum in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as probe:  # other test runs on this machine may hold accelerate's default port
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two(tmp_path, quality: list[str], speed: list[str]) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = os.environ | {"KVPRESS_NEOX_DATA": str(shared_data_dir()), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": str(perplexity.REPO_ROOT)}
    # --multi_gpu is accelerate's name for its torchrun launcher; with --device cpu the processes talk through gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(driver), json.dumps(quality), json.dumps(speed)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=perplexity.REPO_ROOT)


def without_run_facts(header: dict) -> dict:
    """A header without what differs between any two runs: the date, and how many processes ran."""
    environment = {k: v for k, v in header["environment"].items() if k not in ("date_utc", "processes")}
    return {k: v for k, v in header.items() if k != "rows"} | {"environment": environment}


def test_two_processes_write_the_one_process_results(tiny_pythia_folder, text_file, tmp_path, one_thread):
    model = ["--model", str(tiny_pythia_folder), "--dataset", text_file]
    quality = [*model, *QUALITY, "--output", str(tmp_path / "ppl.json")]
    speed = [*model, *SPEED, "--output_dir", str(tmp_path / "speed")]
    perplexity.main(quality)
    speed_grid.main(speed)
    alone = json.loads((tmp_path / "ppl.json").read_text())
    speed_alone = json.loads((tmp_path / "speed" / "summary.json").read_text())
    (tmp_path / "ppl.json").unlink()
    for cell in (tmp_path / "speed").iterdir():
        cell.unlink()

    result = launch_two(tmp_path, quality, speed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0 of 2: 3 of the 5 units left" in result.stderr  # dense and SnapKV's two ratios
    assert "process 1 of 2: 2 of the 5 units left" in result.stderr  # KnormPress's two ratios
    merged = json.loads((tmp_path / "ppl.json").read_text())
    assert json.dumps(merged["rows"]) == json.dumps(alone["rows"])  # the same rows, bit for bit, in the same order
    assert without_run_facts(merged) == without_run_facts(alone) and merged["environment"]["processes"] == 2
    assert sorted(p.name for p in (tmp_path / "ppl_cells").iterdir()) == [
        "dense_r0.json", "knorm_r0.25.json", "knorm_r0.5.json", "snapkv_r0.25.json", "snapkv_r0.5.json"]
    assert "knorm" in result.stdout and result.stdout.count("wrote ") == 1  # the main process alone writes

    speed_merged = json.loads((tmp_path / "speed" / "summary.json").read_text())
    assert "process 1 of 2: 1 of the 2 units left" in result.stderr  # SnapKV's batch sizes
    assert len(speed_merged["rows"]) == len(speed_alone["rows"]) == 4
    for two, one in zip(speed_merged["rows"], speed_alone["rows"]):
        assert two.keys() == one.keys()
        assert {k: v for k, v in two.items() if k not in TIMED} == {k: v for k, v in one.items() if k not in TIMED}
    # The ceilings each process's device had (one entry per device: on GPUs one per process).
    assert speed_merged["ceilings"] == [{"command": speed_alone["command"], "device": "cpu"} | speed_alone["ceilings"]]


def sweep_in_this_process(monkeypatch) -> None:
    """From now on the programs take the sweep path in this one process (accelerate's state of one
    process): what each of several processes does, without starting them."""
    monkeypatch.setattr(sweep, "launched", lambda args: PartialState(cpu=True))


def test_a_failed_cell_records_its_error_and_a_rerun_measures_only_that(tiny_pythia_folder, text_file, tmp_path,
                                                                         monkeypatch, one_thread):
    args = ["--model", str(tiny_pythia_folder), "--dataset", text_file, *STREAMING, "--output",
            str(tmp_path / "stream.json")]
    perplexity.main(args)
    alone = json.loads((tmp_path / "stream.json").read_text())["rows"]
    (tmp_path / "stream.json").unlink()

    measured, failing, real_cell_row = [], {("knorm", 64)}, perplexity.cell_row

    def cell_row(args, loaded, ids, name, setting):
        measured.append((name, setting))
        if (name, setting) in failing:
            raise RuntimeError("a cell that fails")
        return real_cell_row(args, loaded, ids, name, setting)

    sweep_in_this_process(monkeypatch)
    monkeypatch.setattr(perplexity, "cell_row", cell_row)
    with pytest.raises(SystemExit) as exit_info:
        perplexity.main(args)
    assert exit_info.value.code == 1
    rows = json.loads((tmp_path / "stream.json").read_text())["rows"]
    assert rows[3] == {"method": "knorm", "budget": 64, "error": "RuntimeError: a cell that fails",
                       "data": alone[3]["data"]}
    # The others finished, paired with dense as before (json: a one-segment interval is NaN, never equal to itself).
    assert json.dumps(rows[:3] + rows[4:]) == json.dumps(alone[:3] + alone[4:])
    assert len(measured) == 5

    measured.clear()
    failing.clear()
    perplexity.main(args)  # the same command again: only the failed cell runs
    assert measured == [("knorm", 64)]
    assert json.dumps(json.loads((tmp_path / "stream.json").read_text())["rows"]) == json.dumps(alone)


def test_a_speed_rerun_skips_the_families_already_measured(tiny_pythia_folder, text_file, tmp_path, monkeypatch):
    args = ["--model", str(tiny_pythia_folder), "--dataset", text_file, *SPEED, "--output_dir", str(tmp_path)]
    sweep_in_this_process(monkeypatch)
    speed_grid.main(args)
    batches, real_measure = [], grid.measure

    def counted(model, prompt, *rest, **kwargs):
        batches.append(prompt.shape[0])
        return real_measure(model, prompt, *rest, **kwargs)

    monkeypatch.setattr(grid, "measure", counted)
    (tmp_path / "kvpress_snapkv_r0.5_b2_p80_n3.json").unlink()  # one family's larger batch, as if cut short
    speed_grid.main(args)
    assert batches == [1, 2]  # SnapKV's family again, whole (the out-of-memory rule needs its smaller batches)
    assert [r["method"] for r in json.loads((tmp_path / "summary.json").read_text())["rows"]] == ["dense"] * 2 + [
        "snapkv"] * 2
