"""The split-KV decode attention (decoding/split_kv_attention.py, Triton, run here by Triton's
interpreter on CPU tensors: tests/conftest.py) equals the SDPA back end: on its own, under any
split of the slots, and as the decode step's attention (greedy tokens)."""

import pytest
import torch

from decoding import neox_decode, ring_cache
from decoding.split_kv_attention import KernelConfig, parse_config, split_kv_attention, split_plan
from evaluation import split_kv_speed
from presses import Settings, make_press, make_streaming_press
from tests.conftest import build, tiny_neox_config

HEAD_DIM = 80  # Pythia-2.8B's: not a power of two, padded to 128 in the kernel


def visible_mask(first_valid: list[int], last: list[int], slots: int) -> torch.Tensor:
    """(batch, new, slots): row b's new token n sees slots first_valid[b] .. last[n], as the decode step's mask."""
    slot = torch.arange(slots)
    return (slot <= torch.tensor(last)[:, None]) & (slot >= torch.tensor(first_valid)[:, None, None])


def random_qkv(batch: int, new: int, slots: int, dtype: torch.dtype, heads: int = 3):
    generator = torch.Generator().manual_seed(0)
    # a spread of scores (3x a unit normal's), so the softmax is far from uniform
    query = 3 * torch.randn(batch, heads, new, HEAD_DIM, generator=generator) / HEAD_DIM**0.5
    keys, values = (torch.randn(batch, heads, slots, HEAD_DIM, generator=generator) for _ in range(2))
    return query.to(dtype), keys.to(dtype), values.to(dtype)


TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (block, warps, stages) as the GPU sweep tries them (the interpreter ignores warps and stages); a
# block of 128 is larger than the tests' caches, so one iteration covers a whole chunk, mostly masked
CONFIGS = [(32, 2, 1), (64, 4, 3), (128, 8, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunks", [None, 1, 3, 6])
@pytest.mark.parametrize("block, warps, stages", CONFIGS)
def test_equals_sdpa_for_sequences_of_different_lengths(dtype, chunks, block, warps, stages):
    # 77 slots: no split of 3 or 6 chunks (nor a chunk of any block) divides them. Row 0 sees
    # 60 slots, row 1 only its own new token (slot 60): a chunk of row 1 sees nothing.
    query, keys, values = random_qkv(2, 1, 77, dtype)
    visible = visible_mask([0, 60], [60], 77)
    expected = neox_decode.attend(query, keys, values, visible, 0.7, "sdpa")
    attended = split_kv_attention(query, keys, values, visible, 0.7, chunks, block, warps, stages)
    assert attended.dtype == dtype
    assert torch.allclose(attended.float(), expected.float(), atol=TOLERANCE[dtype], rtol=0)
    # the single visible token's value, exactly as SDPA gives it
    assert torch.allclose(attended[1, :, 0].float(), values[1, :, 60].float(), atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("chunks", [None, 3])
@pytest.mark.parametrize("block, warps, stages", CONFIGS)
def test_garbage_in_slots_nobody_sees_changes_nothing(chunks, block, warps, stages):
    # The kernel reads every slot of its chunk, seen or not; a buffer need not be zeroed. NaN and
    # inf in unseen keys and values (row 0: slots past its last, in the block of its last seen
    # one; row 1: the padding in front of it) must leave the output exactly as a clean buffer's.
    query, keys, values = random_qkv(2, 1, 77, torch.float32)
    visible = visible_mask([0, 60], [60], 77)
    clean = split_kv_attention(query, keys, values, visible, 0.7, chunks, block, warps, stages)
    dirty_keys, dirty_values = keys.clone(), values.clone()
    dirty_keys[0, :, 62], dirty_values[0, :, 61] = float("nan"), float("nan")
    dirty_keys[1, :, 5], dirty_values[1, :, 59] = float("inf"), float("inf")
    dirty_values[1, :, 58] = float("-inf")
    dirty = split_kv_attention(query, dirty_keys, dirty_values, visible, 0.7, chunks, block, warps, stages)
    assert torch.equal(dirty, clean)
    assert torch.allclose(clean, neox_decode.attend(query, keys, values, visible, 0.7, "sdpa"), atol=1e-5, rtol=0)


def test_a_config_is_written_and_read_as_block_warps_stages_and_chunks():
    assert parse_config("64x4x3") == KernelConfig(64, 4, 3)
    assert str(parse_config("128x8x2x32")) == "128x8x2x32"
    for bad in ["64x4", "48x4x3", "64x0x3", "64x4x3x"]:
        with pytest.raises(ValueError):
            parse_config(bad)


def test_several_new_tokens_see_the_cache_and_the_tokens_before_them():
    # a speculative verify pass: new token n sees the cache and new tokens 0..n, each under its own mask
    query, keys, values = random_qkv(2, 4, 50, torch.float32)
    visible = visible_mask([0, 9], [46, 47, 48, 49], 50)
    expected = neox_decode.attend(query, keys, values, visible, 0.5, "sdpa")
    assert torch.allclose(neox_decode.attend(query, keys, values, visible, 0.5, "split_kv"), expected, atol=1e-5, rtol=0)


def test_strided_query_is_read_through_its_strides():
    # the decode step's queries are views of the QKV projection's output, not contiguous copies
    query, keys, values = random_qkv(2, 1, 40, torch.float32)
    wide = torch.cat([query, query.flip(-1)], dim=-1)[..., :HEAD_DIM]
    assert not wide.is_contiguous()
    visible = visible_mask([0, 5], [39], 40)
    expected = neox_decode.attend(wide.contiguous(), keys, values, visible, 0.3, "sdpa")
    assert torch.allclose(split_kv_attention(wide, keys, values, visible, 0.3, 2), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("block", [32, 64, 128])
def test_split_plan_fills_the_h200_at_batch_1_and_splits_nothing_at_large_batches(block):
    h200 = 132
    for rows, slots in [(32, 2256), (32, 8256), (32, 100), (2048, 2256)]:
        chunk, chunks = split_plan(rows, slots, h200, block)
        assert chunk % block == 0
        assert (chunks - 1) * chunk < slots <= chunks * chunk  # every slot in a chunk, no chunk empty
    chunk, chunks = split_plan(32, 2256, h200, block)  # Pythia-2.8B's heads at batch 1 over a 2k cache
    assert 32 * chunks >= 4 * h200
    # batch 64: its 2048 (sequence, head) programs fill it already
    assert split_plan(64 * 32, 2256, h200, block)[1] == 1


@pytest.fixture(scope="module")
def model():
    # Pythia-2.8B's head dim (2 heads of 80, 20 rotary dims) in a tiny random GPT-NeoX
    return build(tiny_neox_config(hidden_size=160, num_attention_heads=2), attn_implementation="sdpa")


def prompts(*lengths: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(2, 1000, (1, length), generator=generator) for length in lengths]


@pytest.mark.parametrize("press", [None, "pyramidkv"])
def test_decode_step_gives_the_sdpa_back_ends_greedy_tokens(model, press):
    # prompts of different lengths in one batch (padding in front of the shorter); PyramidKV
    # leaves each layer its own length
    def tokens(backend):
        return neox_decode.generate(model, prompts(100, 70), press and make_press(press, 0.5), 12,
                                    backend=backend).tokens

    assert torch.equal(tokens("split_kv"), tokens("sdpa"))


def test_compiled_step_gives_the_same_tokens(model):
    # the custom op inside torch.compile(fullgraph=True), as the two-stream step compiles it on CUDA
    expected = neox_decode.generate(model, prompts(100, 70), None, 6, backend="sdpa").tokens
    attention_fn = torch.compile(neox_decode.attention_branch, fullgraph=True)

    def step(model, state):
        logits = neox_decode.final_logits(model, neox_decode.layer_outputs(model, state, attention_fn))
        return neox_decode.next_token(logits, state.temperature, state.top_k, state.noise)

    assert torch.equal(neox_decode.generate(model, prompts(100, 70), None, 6, step=step, backend="split_kv").tokens,
                       expected)


def test_ring_buffer_mask_gives_the_sdpa_back_ends_tokens():
    # decoding/ring_cache.py's mask is no range: sinks, then the ring slots written so far
    model = build(tiny_neox_config(initializer_range=0.1), attn_implementation="sdpa")
    press = make_streaming_press("streaming_llm", Settings(budget=16))

    def tokens(backend):
        return ring_cache.generate(model, prompts(6, 40), press, 40, backend=backend).tokens

    assert torch.equal(tokens("split_kv"), tokens("sdpa"))


def test_the_kernel_benchmark_refuses_a_bad_shape_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        split_kv_speed.main(["--shapes", "1x32x80"])
    assert exit_info.value.code == 2
    assert "BATCHxHEADSxDIMxCACHE" in capsys.readouterr().err


def test_the_sweeps_best_is_the_fastest_configuration_that_agrees_with_sdpa():
    def row(config, us, difference):
        return {"shape": "1x32x80x2000", "backend": "split_kv", "config": config, "block": 64, "warps": 4,
                "stages": 3, "chunks": None, "chunks_run": 32, "us_per_layer": us, "over_floor": us / 5,
                "tb_per_s": 1.0, "max_abs_difference": difference}

    rows = [{"shape": "1x32x80x2000", "backend": "sdpa", "us_per_layer": 15.0},
            row("64x4x3", 12.0, 1e-4), row("128x8x4", 6.0, float("nan")), row("32x2x1", 9.0, 0.5),
            {"shape": "1x32x80x2000", "backend": "split_kv", "config": "128x8x4x16", "error": "OutOfResources"}]
    best = split_kv_speed.best_configs(rows)["1x32x80x2000"]
    assert (best["config"], best["us_per_layer"], best["over_sdpa"]) == ("64x4x3", 12.0, 0.8)


def test_sdpa_held_to_one_kernel_computes_the_same_attention():
    # --sdpa_kernels: the math back end (the one a CPU has besides flash) gives the default dispatch's output,
    # and the sweep's SDPA rows, held or not, come first in what the terminal shows
    generator = torch.Generator().manual_seed(0)
    query, keys, values = (torch.randn(2, 4, n, 16, generator=generator) for n in (1, 30, 30))
    visible = torch.ones(2, 1, 30, dtype=torch.bool)
    visible[0, :, :5] = False
    default = split_kv_speed.compiled_sdpa(query, visible, 0.25)(keys, values)
    held = split_kv_speed.compiled_sdpa(query, visible, 0.25, "math")(keys, values)
    assert torch.allclose(held, default, atol=1e-5) and not torch.allclose(held, default.roll(1, 0))
    rows = [{"shape": "s", "backend": "split_kv", "us_per_layer": 2.0}, {"shape": "s", "backend": "sdpa_math", "us_per_layer": 9.0},
            {"shape": "s", "backend": "sdpa", "us_per_layer": 5.0}]
    assert [row["backend"] for row in split_kv_speed.shown(rows)] == ["sdpa_math", "sdpa", "split_kv"]
