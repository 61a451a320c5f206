"""evaluation/profile_step.py's kernel groups (the profile itself needs a GPU): kernels grouped by
name, and each group's time held against its operators' bytes over the bandwidth."""

import pandas as pd
import pytest

from evaluation import profile_step, roofline


@pytest.mark.parametrize("name, category", [
    ("nvjet_hsh_64x8_64x16_2x1_v_bz_splitK_TNT", "matmul"),
    ("void gemv2T_kernel_val<int, int, __half, __half, float, 128, 16, 4, 4, false>", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_h161616gemm_32x32_128x2_tn_align8>", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x64_4x1x1_kernel0_0", "attention"),
    ("triton_red_fused__to_copy_addmm_mul_0", "matmul"),  # inductor's GEMV of an int8 weight
    ("triton_red_fused_add_native_layer_norm_1", "other"),
    ("triton_poi_fused_index_copy_2", "other"),
    ("split_kv_attention_partial", "attention"),  # decoding/split_kv_attention.py's two kernels
    ("split_kv_attention_combine", "attention"),
])
def test_kernels_are_grouped_by_name(name, category):
    assert profile_step.kernel_category(name) == category


def test_groups_are_held_against_their_operators_bytes():
    kernels = ["void gemv2T_kernel_val<int>", "flash_fwd_splitkv_kernel", "triton_poi_fused_add_0"]
    frame = pd.DataFrame({"kernel": kernels, "launches_per_step": [160.0, 32.0, 64.0],
                          "us_per_step": [1500.0, 200.0, 100.0]})
    frame["share"] = frame.us_per_step / frame.us_per_step.sum()
    frame["category"] = frame.kernel.map(profile_step.kernel_category)
    config = roofline.load_config("EleutherAI/pythia-2.8b")
    operators = roofline.operators(config, 1, 1, 2000, weight_quant="int8")
    rows = {row["category"]: row for row in profile_step.category_table(frame, operators, 4e12)}
    weights = sum(op.bytes for op in operators if op.name in profile_step.MATMUL_OPERATORS)
    assert rows["matmul"]["bytes"] == weights
    assert rows["matmul"]["over_floor"] == pytest.approx(1500 / (1e6 * weights / 4e12))
    kv = next(op.bytes for op in operators if op.name == "attention")
    assert rows["attention"]["tb_per_s"] == pytest.approx(kv / 200e-6 / 1e12)
    assert "bytes" not in rows["other"]
