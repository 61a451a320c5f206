"""The equal-bytes study's choices: how many tokens a composite baseline keeps, which RD-KV setting
the tuning file selects, and which baseline the report calls the best at a target."""

import json

import pytest

from evaluation.equal_bytes import composites, kept_for, rdkv_press, rdkv_setting, selected
from evaluation.equal_bytes_report import best_baselines, markdown
from presses.quantize import per_channel_bytes, token_bytes


@pytest.mark.parametrize("layout", ["kivi", "token"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_a_composite_keeps_the_fewest_tokens_that_reach_the_target(layout, bits):
    head_dim, tokens, target = 64, 1536, 0.125
    kept = kept_for(target, layout, bits, head_dim, tokens)

    def stored(n):
        keys = per_channel_bytes(n, bits, head_dim, 32) if layout == "kivi" else n * token_bytes(bits, head_dim) + 4 * head_dim
        return keys + n * token_bytes(bits, head_dim)

    budget = target * tokens * 2 * 2 * head_dim
    assert stored(kept) >= budget > stored(kept - 1)


def test_coarser_kivi_key_groups_are_their_own_baselines_at_their_own_bytes():
    head_dim, tokens = 64, 1536
    rows = {name: press for name, _, press in composites([0.125], head_dim, tokens, ["h2o"], groups=(32, 64))}
    assert "h2o+kivi_rot4" in rows and "h2o+kivi_rot4_g64" in rows and "h2o+token4_g64" not in rows
    assert rows["h2o+kivi_rot4_g64"].presses[1].group_tokens == 64 and rows["h2o+kivi_rot4"].presses[1].group_tokens == 32
    # half the key scales per whole group, a longer fp16 tail: the tokens kept are counted at group 64's bytes
    kept = kept_for(0.125, "kivi", 4, head_dim, tokens, 64)
    stored = lambda n: per_channel_bytes(n, 4, head_dim, 64) + n * token_bytes(4, head_dim)
    assert stored(kept) >= 0.125 * tokens * 2 * 2 * head_dim > stored(kept - 1)
    assert kept != kept_for(0.125, "kivi", 4, head_dim, tokens)


def test_symmetric_level_baselines_keep_the_tokens_their_cheaper_groups_pay_for():
    # "_sym" layouts: rotated groups with a scale and no zero point, so a composite holds more tokens at the target
    head_dim, tokens = 64, 1536
    rows = {name: press for name, _, press in composites([0.125], head_dim, tokens, ["h2o"])}
    quantizer = rows["h2o+token_rot_sym2"].presses[1]
    assert quantizer.levels == "symmetric" and quantizer.rotate and rows["h2o+token_rot2"].presses[1].levels == "uniform"
    kept = kept_for(0.125, "token_rot_sym", 2, head_dim, tokens)
    stored = lambda n: 2 * n * token_bytes(2, head_dim, "symmetric") + 4 * head_dim  # keys: their channel statistics too
    assert stored(kept) >= 0.125 * tokens * 2 * 2 * head_dim > stored(kept - 1)
    assert kept > kept_for(0.125, "token_rot", 2, head_dim, tokens)


def test_rdkv_settings_parse_and_bad_ones_are_named():
    assert rdkv_setting("prior=8 bits=2,4,8 window_size=16") == {"prior": 8.0, "bits": (2, 4, 8), "window_size": 16}
    with pytest.raises(ValueError, match="unknown RD-KV setting 'windows'"):
        rdkv_setting("windows=3")
    assert rdkv_setting("merge_evicted=1 rotate=0") == {"merge_evicted": True, "rotate": False}
    with pytest.raises(ValueError, match="merge_evicted is 0 or 1"):
        rdkv_setting("merge_evicted=yes")


def test_rdkv_after_h2o_gives_h2o_the_tokens_and_rdkv_the_rest_of_the_bytes():
    press = rdkv_press(0.125, rdkv_setting("after_h2o=0.5 evict_weight=2"), tokens=1536)
    h2o, rdkv = press.presses
    assert int(1536 * (1 - h2o.compression_ratio)) == 768  # kvpress's rounding: half the tokens
    assert rdkv.compression_ratio == pytest.approx(0.75) and rdkv.evict_weight == 2.0  # 12.5% of all = 25% of the kept
    assert rdkv.accumulated == 0  # H2O's evidence chose the tokens; RD-KV's own needs the whole prefill
    assert rdkv_press(0.125, rdkv_setting("after_h2o=0.5 accumulated=0.5"), tokens=1536).presses[1].accumulated == 0.5
    with pytest.raises(ValueError, match="after_h2o"):
        rdkv_press(0.25, {"after_h2o": 0.2}, tokens=1536)


def _row(method, target, fraction, ppl, units):
    return {"method": method, "target": target, "kv_bytes_fraction": fraction, "ppl": ppl,
            "ppl_ci95": [ppl - 1, ppl + 1], "delta_pct": ppl - 10, "delta_pct_ci95": [ppl - 11, ppl - 9],
            "unit_nll": units, "unit_tokens": [10] * len(units)}


def test_the_tuning_file_selects_the_lowest_ppl_setting_per_target(tmp_path):
    rows = [_row("dense", 1.0, 1.0, 10.0, [1.0]), _row("rdkv[prior=2]", 0.25, 0.25, 11.0, [1.0]),
            _row("rdkv[prior=8]", 0.25, 0.25, 10.5, [1.0]), _row("rdkv[prior=2]", 0.125, 0.125, 12.0, [1.0])]
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"rows": rows}))
    chosen = selected([0.25, 0.125], [path], 1536)
    assert [(name, target, press.prior) for name, target, press in chosen] == [
        ("rdkv[prior=8]", 0.25, 8.0), ("rdkv[prior=2]", 0.125, 2.0)]
    with pytest.raises(ValueError, match="no RD-KV row at target 0.0625"):
        selected([0.0625], [path], 1536)


def test_the_best_baseline_holds_no_more_bytes_than_the_target_allows():
    rows = [_row("dense", 1.0, 1.0, 10.0, [20.0, 20.0]),
            _row("kivi4", None, 0.297, 10.1, [20.1, 20.1]),  # better, but more bytes than 25% allows
            _row("h2o+kivi4", 0.25, 0.2504, 10.3, [20.3, 20.3]),
            _row("h2o", 0.25, 0.25, 11.0, [21.0, 21.0]),
            _row("rdkv[prior=2]", 0.25, 0.2499, 10.2, [20.2, 20.2])]
    assert best_baselines(rows)[0.25]["method"] == "h2o+kivi4"
    table = markdown(rows)
    assert "| 0.25 | h2o+kivi4 (10.300) | 0.2504 |" in table
    assert "rdkv[prior=2] (10.200)" in table


def test_only_runs_the_named_configurations_and_names_the_known_ones(tiny_pythia_folder, tmp_path, capsys):
    from evaluation import equal_bytes

    out = tmp_path / "only.json"
    common = ["--model", str(tiny_pythia_folder), "--dtype", "float32", "--device", "cpu", "--part", "composites",
              "--targets", "0.25", "--context_tokens", "96", "--eval_tokens", "32", "--num_windows", "1",
              "--composed_with", "h2o", "--output", str(out)]
    equal_bytes.main(common + ["--only", "h2o+kivi4", "h2o+token_rot8"])
    assert [row["method"] for row in json.loads(out.read_text())["rows"]] == ["dense", "h2o+kivi4", "h2o+token_rot8"]
    with pytest.raises(SystemExit):
        equal_bytes.main(common + ["--only", "h2o+kivi7"])
    error = capsys.readouterr().err
    assert "no configuration h2o+kivi7" in error and "h2o+kivi_rot4" in error


def test_composites_offer_the_widths_between_4_and_8_bits_at_their_bytes():
    # RD-KV may be offered 5 and 6 bits: the baselines are run at them too, each keeping the tokens its width pays for
    head_dim, tokens = 64, 1536
    rows = {name: press for name, _, press in composites([0.25], head_dim, tokens, ["h2o"])}
    assert rows["h2o+kivi_rot_sym6"].presses[1].bits == 6 and rows["h2o+token5"].presses[1].bits == 5
    kept = [kept_for(0.25, "kivi_rot", bits, head_dim, tokens) for bits in (4, 5, 6, 8)]
    assert kept == sorted(kept, reverse=True) and len(set(kept)) == 4
