"""The speed grid runner (evaluation/speed_grid.py): cells, files, the out-of-memory rule, merging."""

import json

import pytest
import torch

from evaluation import grid, speed_grid
from tests.conftest import shared_data_dir

SMALL = ["--model", "EleutherAI/pythia-70m", "--random-init", "--device", "cpu", "--prompt_tokens", "80",
         "--new_tokens", "3", "--repeats", "1"]


def test_a_grid_writes_one_file_per_cell_a_summary_and_plots(tmp_path):
    speed_grid.main(SMALL + ["--decoder", "hf_eager", "neox", "--press", "snapkv", "--compression_ratio", "0.5",
                             "--batch_size", "1", "2", "--output_dir", str(tmp_path)])
    cells = sorted(p.name for p in tmp_path.glob("*.json") if p.name != "summary.json")
    # hf_eager is dense only; neox runs dense and SnapKV; each at batch 1 and 2
    assert cells == sorted([
        "hf_eager_dense_r0_b1_p80_n3.json", "hf_eager_dense_r0_b2_p80_n3.json",
        "neox_sdpa_dense_r0_b1_p80_n3.json", "neox_sdpa_dense_r0_b2_p80_n3.json",
        "neox_sdpa_snapkv_r0.5_b1_p80_n3.json", "neox_sdpa_snapkv_r0.5_b2_p80_n3.json"])
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    baseline = next(r for r in rows if r["decoder"] == "hf_eager" and r["batch_size"] == 2)
    pressed = next(r for r in rows if r["method"] == "snapkv" and r["batch_size"] == 2)
    assert baseline["tpot_speedup"] == 1.0
    assert pressed["tpot_speedup"] == pytest.approx(baseline["tpot_ms"] / pressed["tpot_ms"])
    assert pressed["kv_mib_after_prefill"] == pytest.approx(baseline["kv_mib_final"] * 80 / 83 / 2, rel=0.02)
    assert pressed["tpot_over_floor"] == pytest.approx(pressed["tpot_ms"] / pressed["tpot_floor_ms"])
    assert "| decoder |" in (tmp_path / "summary.md").read_text()
    for plot in ("tpot.png", "throughput.png", "tpot_smallest_batch.png"):
        assert (tmp_path / plot).stat().st_size > 0


def test_real_weights_are_timed_on_a_prompt_cut_from_the_text(tiny_pythia_folder, tmp_path):
    speed_grid.main(["--model", str(tiny_pythia_folder), "--device", "cpu", "--data-dir", str(shared_data_dir()),
                     "--decoder", "kvpress", "--press", "streaming_llm", "--compression_ratio", "0.5",
                     "--prompt_tokens", "64", "--new_tokens", "8", "--repeats", "1", "--output_dir", str(tmp_path)])
    payload = json.loads((tmp_path / "summary.json").read_text())
    dense, pressed = payload["rows"]
    assert dense["kept_tokens_layer0"] == 64 and pressed["kept_tokens_layer0"] == 32
    assert pressed["kv_mib_final"] < dense["kv_mib_final"] and pressed["new_tokens"] == 8
    assert "wikitext" in dense["prompt"].lower() and "tokens" not in dense  # no generated token ids stored
    assert dense["tokens_shape"] == [1, 8] and len(dense["tokens_sha256"]) == 64
    assert {"ttft_ms", "tpot_ms", "decode_tokens_per_s", "prefill_gflops"} <= dense.keys()
    assert list(payload)[:6] == ["command", "model", "model_tier", "dtype", "protocol", "environment"]
    assert payload["model_tier"] == "checkpoint weights" and payload["command"].startswith("python evaluation/speed_grid.py")


def test_presses_that_calibrate_are_calibrated_first(tmp_path):
    speed_grid.main(SMALL + ["--decoder", "kvpress", "--press", "head_merge", "--compression_ratio", "0.5",
                             "--output_dir", str(tmp_path)])
    dense, merged = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert dense["prompt"] == merged["prompt"] == "random token ids" and "error" not in merged
    assert merged["calibration_text"].startswith("random token ids") and "calibration_text" not in dense
    assert merged["kv_mib_final"] < dense["kv_mib_final"]


def test_no_dense_leaves_the_dense_cells_out():
    args = speed_grid.parse_args(["--decoder", "hf_eager", "neox", "--press", "snapkv", "--compression_ratio", "0.75",
                                  "--batch_size", "256", "384", "--no-dense", "--output_dir", "x"])
    assert [(c["decoder"], c["method"], c["batch_size"]) for c in grid.cells(args)] == [
        ("neox", "snapkv", 256), ("neox", "snapkv", 384)]
    assert {c["method"] for c in grid.cells(speed_grid.parse_args(["--output_dir", "x"]))} == {"dense", "snapkv"}


def test_out_of_memory_stops_larger_batches_of_the_same_method(tmp_path, monkeypatch):
    real_measure = grid.measure

    def measure_fitting_one_sequence(model, prompt, *args, **kwargs):
        if prompt.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_measure(model, prompt, *args, **kwargs)

    monkeypatch.setattr(grid, "measure", measure_fitting_one_sequence)
    speed_grid.main(SMALL + ["--decoder", "neox", "--press", "--batch_size", "1", "2", "4",
                             "--output_dir", str(tmp_path)])
    rows = {r["batch_size"]: r for r in json.loads((tmp_path / "summary.json").read_text())["rows"]}
    assert "tpot_ms" in rows[1]
    assert rows[2]["error"] == "CUDA out of memory"
    assert rows[4]["error"] == "not run: a smaller batch was already out of memory"
    assert rows[2]["compile_mode"] == rows[4]["compile_mode"] == rows[1]["compile_mode"] == "two-stream"
    assert rows[2]["keep_buffer"] is rows[4]["keep_buffer"] is rows[1]["keep_buffer"] is True


def test_an_error_raised_while_out_of_memory_is_out_of_memory():
    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture")  # noqa: B904
    except RuntimeError as error:
        assert str(grid.out_of_memory_in(error)).startswith("CUDA out of memory. Tried")
    assert grid.out_of_memory_in(ValueError("bad")) is None


def test_a_grid_whose_every_cell_is_out_of_memory_still_writes_its_summary(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(grid, "measure", out_of_memory)
    speed_grid.main(SMALL + ["--decoder", "neox", "--press", "--batch_size", "1", "2", "--output_dir", str(tmp_path)])
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert [r["error"] for r in rows] == ["CUDA out of memory", "not run: a smaller batch was already out of memory"]
    assert rows[0]["oom_detail"].startswith("CUDA out of memory. Tried to allocate 2.00 GiB at ")
    assert "| CUDA out of memory |" in (tmp_path / "summary.md").read_text()
    for plot in ("tpot.png", "throughput.png", "tpot_smallest_batch.png"):
        assert (tmp_path / plot).stat().st_size > 0


@pytest.mark.parametrize("start, step, fitting, expected_tries", [
    (16, 4, 23, [16, 20, 28, 24]),  # up from a batch that fits, then bisection
    (64, 8, 23, [64, 56, 40, 8, 24, 16]),  # down from one that does not
    (16, 16, 16, [16, 32]),
    (4, 4, 0, [4, 1]),  # nothing fits
    (1, 4, 1000, [1, 5, 13, 29, 61, 125, 253, 509, 1021, 765, 893, 957, 989, 1005, 997, 1001]),
])
def test_the_largest_batch_search_brackets_then_bisects_to_the_step(start, step, fitting, expected_tries):
    largest, tried = grid.largest_batch(lambda batch: batch <= fitting, start, step)
    assert tried == expected_tries
    fits = [b for b in tried if b <= fitting]
    assert largest == (max(fits) if fits else None)
    if fits:
        # within the step of the first batch that does not fit, and no larger batch was one
        assert min(b for b in tried if b > fitting) - largest <= step


def test_the_largest_batch_search_stops_at_its_tries_and_at_other_failures():
    assert grid.largest_batch(lambda batch: batch <= 23, 16, 4, max_tries=2) == (20, [16, 20])
    assert grid.largest_batch(lambda batch: None if batch > 20 else True, 16, 4) == (20, [16, 20, 28])
    calls = []
    assert grid.largest_batch(lambda batch: calls.append(batch) or True, 8, 8, out_of_time=lambda: len(calls) == 3) == (
        32, [8, 16, 32])


def test_batch_size_max_measures_every_tried_batch_and_marks_the_largest_that_fits(tmp_path, monkeypatch):
    """A fake out of memory above 5 sequences (raised as torch raises it on a GPU) on the CPU."""
    real_measure, batches = grid.measure, []

    def measure_fitting_five(model, prompt, *args, **kwargs):
        batches.append((prompt.shape[0], kwargs["prefill_batch"]))
        if prompt.shape[0] > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_measure(model, prompt, *args, **kwargs)

    monkeypatch.setattr(grid, "measure", measure_fitting_five)
    speed_grid.main(SMALL + ["--decoder", "neox", "--press", "--batch_size", "max", "--max_batch_start", "2",
                             "--max_batch_step", "2", "--prefill_batch", "2", "--output_dir", str(tmp_path)])
    assert batches == [(2, 2), (4, 2), (8, 2), (6, 2)]
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert [(r["batch_size"], r.get("error"), r["largest_fit"]) for r in rows] == [
        (2, None, False), (4, None, True), (8, "CUDA out of memory", False), (6, "CUDA out of memory", False)]
    assert rows[1]["prefill_batch"] == 2 and "tpot_ms" in rows[1]
    assert json.loads((tmp_path / "neox_sdpa_dense_r0_b4_p80_n3.json").read_text())["rows"][0]["largest_fit"] is True
    assert sorted(p.name for p in tmp_path.glob("neox_*.json")) == [
        f"neox_sdpa_dense_r0_b{b}_p80_n3.json" for b in (2, 4, 6, 8)]


def test_batch_size_max_goes_alone_and_prefill_batch_needs_the_neox_decoder(tmp_path):
    for extra in (["--batch_size", "max", "4"], ["--decoder", "kvpress", "--prefill_batch", "4"],
                  ["--batch_size", "max", "--max_batch_step", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            speed_grid.main(SMALL + ["--press"] + extra + ["--output_dir", str(tmp_path)])
        assert exit_info.value.code == 2
    assert not list(tmp_path.iterdir())


def test_the_estimate_fills_the_free_memory_with_kv_and_one_micro_batchs_prefill():
    from evaluation import roofline

    config = roofline.load_config("EleutherAI/pythia-2.8b")
    gib = 2**30
    per_sequence = 32 * 2 * 2560 * 2 * 2256  # dense KV of 2000 + 256 tokens, fp16
    activations = 2 * 2000 * (16 * 2560 + 2 * 10240)
    dense = grid.estimated_largest_batch(config, 2000, 256, 0.0, 133 * gib, 16)
    assert dense == int((133 * gib - 2 * gib - 16 * activations) // per_sequence)
    assert 170 < dense < 190
    snapkv = grid.estimated_largest_batch(config, 2000, 256, 0.75, 133 * gib, 16)
    assert snapkv == int((133 * gib - 2 * gib - 16 * activations) // (32 * 2 * 2560 * 2 * 756))
    # the whole batch prefilled at once: every sequence's activations on top of its KV (why 160 did not fit)
    assert grid.estimated_largest_batch(config, 2000, 256, 0.0, 133 * gib, None) < 160


def test_merge_combines_the_cells_of_several_calls(tmp_path):
    first, second, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    speed_grid.main(SMALL + ["--decoder", "kvpress", "--press", "--output_dir", str(first)])
    speed_grid.main(SMALL + ["--decoder", "neox", "--press", "--output_dir", str(second)])
    speed_grid.main(["--merge", str(first), str(second), "--baseline", "kvpress", "--output_dir", str(merged)])
    payload = json.loads((merged / "summary.json").read_text())
    assert [r["decoder"] for r in payload["rows"]] == ["kvpress", "neox"]
    # The same prompt decoded greedily by two decoders: the same tokens on the CPU, so the same digest.
    assert payload["rows"][0]["tokens_sha256"] == payload["rows"][1]["tokens_sha256"]
    assert len(payload["command"]) == 2
    assert payload["rows"][1]["tpot_speedup"] == pytest.approx(payload["rows"][0]["tpot_ms"] / payload["rows"][1]["tpot_ms"])


def test_floors_divide_by_the_given_bandwidth_and_a_merge_keeps_each_calls_ceilings(tmp_path):
    from evaluation import ceilings, roofline

    first, second, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    speed_grid.main(SMALL + ["--decoder", "neox", "--press", "--bandwidth", "3", "--peak_tflops", "700",
                             "--gemv_bandwidth", "2.5", "--output_dir", str(first)])
    payload = json.loads((first / "summary.json").read_text())
    assert payload["ceilings"]["bandwidth"] == 3e12 and payload["ceilings"]["source"] == "given"
    row = payload["rows"][0]
    config = roofline.load_config("EleutherAI/pythia-70m")
    step = roofline.step_bytes(config, 1, 1, [80 + 3 / 2] * config.num_hidden_layers)
    assert row["kept_tokens_per_layer"] == [80] * config.num_hidden_layers
    assert row["tpot_floor_ms"] == pytest.approx(1e3 * step / 3e12, rel=1e-12)
    assert row["tpot_floor_gemv_ms"] == pytest.approx(1e3 * step / 2.5e12, rel=1e-12)
    assert row["compile_s"] == row["first_call_s"] - row["run_s"]
    speed_grid.main(SMALL + ["--decoder", "neox", "--press", "--output_dir", str(second)])  # measured on the CPU
    measured = json.loads((second / "summary.json").read_text())["ceilings"]
    assert measured["source"].startswith("measured on cpu")
    assert measured["bandwidth"] == ceilings.machine_ceilings("cpu").bandwidth
    speed_grid.main(["--merge", str(first), str(second), "--output_dir", str(merged)])
    sources = [c["source"] for c in json.loads((merged / "summary.json").read_text())["ceilings"]]
    assert sorted(sources) == sorted(["given", measured["source"]])
    assert "copy 3.000 TB/s (the floor), GEMV 2.500 TB/s" in (merged / "summary.md").read_text()


def test_unknown_press_is_refused_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        speed_grid.main(SMALL + ["--press", "nope", "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "known presses: " in capsys.readouterr().err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_kv_bits_times_the_quantized_buffer_and_counts_its_bytes_in_the_floor(tmp_path):
    from evaluation import roofline

    fp, quantized = tmp_path / "fp", tmp_path / "k8v4"
    common = SMALL + ["--decoder", "neox", "--press", "--bandwidth", "3", "--peak_tflops", "700"]
    speed_grid.main(common + ["--output_dir", str(fp)])
    speed_grid.main(common + ["--kv_bits", "8x4", "--output_dir", str(quantized)])
    fp_row = json.loads((fp / "summary.json").read_text())["rows"][0]
    row = json.loads((quantized / "summary.json").read_text())["rows"][0]
    assert fp_row["kv_bits"] is None and row["kv_bits"] == "8x4"
    # pythia-70m: 6 layers, 8 heads of dim 64; 83 slots of batch 1; fp32 on the CPU against 64 + 4 + 32 + 4 bytes
    groups = 6 * 8 * 83
    assert fp_row["kv_mib_final"] * 2**20 == groups * 2 * 64 * 4
    assert row["kv_mib_final"] * 2**20 == groups * (64 + 4 + 32 + 4)
    config = roofline.load_config("EleutherAI/pythia-70m")
    cache = [80 + 3 / 2] * config.num_hidden_layers
    saved = (2 * 64 * 2 - (64 + 4 + 32 + 4)) * 8 * 6 * (cache[0] + 1 + 1)  # attention reads and the write, fp16 vs k8v4
    assert fp_row["step_gb"] * 1e9 - row["step_gb"] * 1e9 == pytest.approx(saved)
    assert row["step_gb"] == pytest.approx(roofline.step_bytes(config, 1, 1, cache, kv_bits=(8, 4)) / 1e9)


@pytest.mark.parametrize("options, message", [(["--kv_bits", "3x8"], "reads 8 or 4-bit codes"),
                                              (["--kv_bits", "8"], "KEYxVALUE"),
                                              (["--kv_bits", "8x8", "--decoder", "kvpress"], "--decoder neox")])
def test_bad_kv_bits_are_refused_before_loading(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        speed_grid.main(SMALL + ["--decoder", "neox", "--press"] + options + ["--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
