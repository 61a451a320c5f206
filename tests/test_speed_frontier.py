"""evaluation/speed_frontier.py on the CPU: every cell's tokens equal its reference's, quantized
cells' floors count quantized bytes, and a bad cell is refused before anything loads."""

from types import SimpleNamespace

import pytest
import torch

from evaluation import ceilings, speed_frontier
from presses import make_press
from tests.conftest import build, tiny_neox_config
from tests.test_fused_projections import with_random_layer_norms


def test_every_cell_decodes_its_references_tokens():
    model = with_random_layer_norms(build(tiny_neox_config(), attn_implementation="sdpa"))
    args = SimpleNamespace(new_tokens=5, repeats=1, check_tokens=5, backend="sdpa")
    prompt = torch.randint(2, 1000, (1, 90), generator=torch.Generator().manual_seed(3))
    presses = [("dense", None), ("snapkv", make_press("snapkv", 0.5))]
    measured = ceilings.given(1e11, 1e12)
    rows = []
    cells = ("plain:fp16", "folded:fp16", "folded:fp16_triton", "plain:int8_torchao", "split:int8_torchao",
             "folded:int8_torchao", "plain:int8_quanto")
    for cell in cells:
        speed_frontier.measure_cell(args, model, speed_frontier.parse_cell(cell), prompt, presses, measured, rows)
    assert [row["identical"] for row in rows] == [True] * 2 * len(cells)
    for row in rows:
        quantized = row["weights"] not in ("fp16", "fp16_triton")
        assert row["weight_quant"] == ("int8" if quantized else "none")
        assert (row["tpot_floor_ms"] < row["fp16_floor_ms"]) == quantized
    assert {row["reference"] for row in rows if row["cell"] == "folded:int8_torchao"} == {
        "the uncompiled folded step, same weights"}


def test_the_split_kv_back_end_decodes_the_references_tokens():
    model = build(tiny_neox_config(), attn_implementation="sdpa")
    args = speed_frontier.parse_args(["--backend", "split_kv", "--new_tokens", "5", "--repeats", "1",
                                      "--check_tokens", "5"])
    prompt = torch.randint(2, 1000, (1, 90), generator=torch.Generator().manual_seed(3))
    rows = []
    speed_frontier.measure_cell(args, model, speed_frontier.parse_cell("plain:fp16"), prompt, [("dense", None)],
                                ceilings.given(1e11, 1e12), rows)
    assert [(row["decode_attention"], row["identical"]) for row in rows] == [("split_kv", True)]


def test_the_split_kv_config_is_the_steps_kernel_launch(monkeypatch):
    from decoding import split_kv_attention

    # the option replaces the module's default for the run: restored after the test
    monkeypatch.setattr(split_kv_attention, "DEFAULT_CONFIG", split_kv_attention.DEFAULT_CONFIG)
    model = build(tiny_neox_config(), attn_implementation="sdpa")
    args = speed_frontier.parse_args(["--backend", "split_kv", "--split_kv_config", "128x8x2x3", "--new_tokens", "5",
                                      "--repeats", "1", "--check_tokens", "5"])
    assert str(speed_frontier.split_kv_config(args)) == "128x8x2x3"
    assert split_kv_attention.DEFAULT_CONFIG == split_kv_attention.KernelConfig(128, 8, 2, 3)
    prompt = torch.randint(2, 1000, (1, 90), generator=torch.Generator().manual_seed(3))
    rows = []
    speed_frontier.measure_cell(args, model, speed_frontier.parse_cell("plain:fp16"), prompt, [("dense", None)],
                                ceilings.given(1e11, 1e12), rows)
    assert [row["identical"] for row in rows] == [True]


@pytest.mark.parametrize("options", [["--backend", "split_kv", "--split_kv_config", "64x4"],
                                     ["--split_kv_config", "64x4x3"]])
def test_a_bad_split_kv_config_is_one_line_before_loading(options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        speed_frontier.parse_args(options)
    assert exit_info.value.code == 2
    assert "split_kv" in capsys.readouterr().err


@pytest.mark.parametrize("cell", ["plain", "fused:fp16", "plain:int2_torchao"])
def test_a_bad_cell_is_one_line_before_loading(cell, capsys):
    with pytest.raises(SystemExit) as exit_info:
        speed_frontier.parse_args(["--cells", cell])
    assert exit_info.value.code == 2
    assert "STEP:WEIGHTS" in capsys.readouterr().err
