"""Weight-only quantization (decoding/weight_quant.py): every Linear holds int8 / fp8 weights, the
decode paths compute the function of the de-quantized weights, and the roofline counts 1 byte a weight
(half a byte for int4, which runs on CUDA only: here only its refusal and its bytes are tested)."""

import copy

import pytest
import torch
from torch import nn

from decoding import fused_projections, neox_decode, weight_quant
from decoding.neox_decode import StepState
from decoding.reference import kvpress_generate
from evaluation import roofline
from presses import make_press
from tests.conftest import build, tiny_neox_config


@pytest.fixture(scope="module")
def model():
    return build(tiny_neox_config(), attn_implementation="sdpa")


def prompt(length: int = 80, seed: int = 3) -> torch.Tensor:
    return torch.randint(2, 1000, (1, length), generator=torch.Generator().manual_seed(seed))


def linears(model) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) or type(module).__name__ == "QLinear"}


@torch.no_grad()
def effective_weight(module) -> torch.Tensor:
    """The (out, in) matrix a quantized Linear applies, whichever library holds it: its output on
    the identity, less the bias."""
    identity = torch.eye(module.in_features)
    bias = 0 if module.bias is None else module.bias
    return (module(identity) - bias).T


def dequantized_copy(model, quantized):
    """``model`` with every Linear's weight replaced by what ``quantized``'s applies."""
    reference = copy.deepcopy(model)
    targets = linears(reference)
    with torch.no_grad():
        for name, module in linears(quantized).items():
            targets[name].weight.copy_(effective_weight(module))
    return reference


def logits_of(model, step_logits, press=None):
    _, groups = neox_decode.prefill(model, [prompt()], press)
    state = StepState(neox_decode.load_buffer(groups, 2), torch.full((1, 1), 17), torch.full((1, 1), 80),
                      torch.zeros(1, dtype=torch.long))
    return step_logits(model, state)


@pytest.mark.parametrize("library", weight_quant.LIBRARIES)
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_step_computes_the_dequantized_weights_function(model, library, scheme):
    quantized = weight_quant.quantize_weights(copy.deepcopy(model), scheme, library)
    assert set(linears(quantized)) == set(linears(model))  # every Linear, the output head included
    reference = dequantized_copy(model, quantized)
    original = dict(model.named_parameters())
    for name, parameter in reference.named_parameters():
        if name.endswith("query_key_value.weight"):
            error = (parameter - original[name]).abs()
            row_max = original[name].abs().amax(dim=1, keepdim=True)
            assert error.max() > 0, "the weights were not quantized"
            if scheme == "int8":  # symmetric per-row int8: half a step of max|row| / 127 at most
                assert (error <= row_max / 127 / 2 * 1.001).all()
    torch.testing.assert_close(logits_of(quantized, neox_decode.forward_logits),
                               logits_of(reference, neox_decode.forward_logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("library", weight_quant.LIBRARIES)
def test_int8_fast_path_gives_the_kvpress_loops_tokens_on_the_same_weights(model, library):
    quantized = weight_quant.quantize_weights(copy.deepcopy(model), "int8", library)
    press = make_press("snapkv", 0.5)
    expected = kvpress_generate(quantized, prompt(), press, new_tokens=8).tokens
    assert torch.equal(neox_decode.generate(quantized, [prompt()], press, 8).tokens, expected)


def test_a_folded_view_quantizes_its_fused_projection_too(model):
    view = weight_quant.quantize_weights(fused_projections.fold_projections(copy.deepcopy(model)), "int8")
    fused = view.gpt_neox.layers[0].fused_in
    assert type(fused.weight).__name__ == "Int8Tensor"
    reference = fused_projections.fold_projections(copy.deepcopy(model))
    with torch.no_grad():
        for layer, folded in zip(reference.gpt_neox.layers, view.gpt_neox.layers):
            layer.fused_in.weight.copy_(effective_weight(folded.fused_in))
        for name, module in linears(view).items():
            if not name.endswith("fused_in"):
                dict(reference.named_modules())[name].weight.copy_(effective_weight(module))
    torch.testing.assert_close(logits_of(view, fused_projections.forward_logits),
                               logits_of(reference, fused_projections.forward_logits), rtol=1e-5, atol=1e-5)


def test_unknown_schemes_and_libraries_are_refused(model):
    with pytest.raises(ValueError, match="int2"):
        weight_quant.quantize_weights(model, "int2")
    with pytest.raises(ValueError, match="bnb"):
        weight_quant.quantize_weights(model, "int8", "bnb")


def test_int4_weights_are_refused_where_tinygemm_cannot_hold_them(model):
    """int4 is torchao's tinygemm layout, a CUDA kernel over whole groups of 128 inputs: through quanto,
    with a Linear of ragged inputs (the tiny model's 64; SmolLM2's 576) and on a CPU the scheme is refused
    before any weight changes (the Linears keep their fp32 weights)."""
    whole = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 8))  # inputs in whole groups
    for target, library, message in ((model, "quanto", "torchao"), (model, "torchao", "whole groups of 128"),
                                     (whole, "torchao", "CUDA")):
        before = {name: module.weight.clone() for name, module in linears(target).items()}
        with pytest.raises(ValueError, match=message):
            weight_quant.quantize_weights(target, "int4", library)
        after = linears(target)
        assert all(type(after[name].weight) is nn.Parameter and after[name].weight.dtype == torch.float32
                   and torch.equal(after[name].weight, weight) for name, weight in before.items())


def test_int4_groups_are_the_ones_tinygemm_takes_and_must_divide_the_inputs(model):
    # the SmolLM2 stand-in's 576 inputs are 9 groups of 64, not whole groups of the speed path's 128
    ragged = nn.Sequential(nn.Linear(576, 8))
    with pytest.raises(ValueError, match="whole groups of 128"):
        weight_quant.check_int4(ragged, "torchao")
    with pytest.raises(ValueError, match="CUDA"):  # past the groups: 64 divides 576
        weight_quant.quantize_weights(ragged, "int4", "torchao", int4_group=64)
    with pytest.raises(ValueError, match="takes 32, 64, 128, 256"):
        weight_quant.quantize_weights(ragged, "int4", "torchao", int4_group=48)


def test_int4_quality_needs_bf16_scoring(capsys):
    from evaluation import weight_quant_quality

    with pytest.raises(SystemExit):
        weight_quant_quality.main(["--model", "smollm2-135m", "--weights", "int4", "--int4_group", "64"])
    assert "--dtype bfloat16" in capsys.readouterr().err


def test_roofline_counts_a_byte_a_weight_plus_its_channels_scale():
    config = roofline.load_config("EleutherAI/pythia-2.8b")
    by_name = {scheme: {op.name: op.bytes for op in roofline.operators(config, 1, 1, 2000, weight_quant=scheme)}
               for scheme in ("none", "int8")}
    hidden, inner = config.hidden_size, config.intermediate_size
    vectors = 2 * (hidden + inner)  # the fp16 input and output of one token
    assert by_name["int8"]["mlp_up"] == config.num_hidden_layers * (hidden * inner + 4 * inner + vectors)
    assert by_name["none"]["mlp_up"] == config.num_hidden_layers * (2 * hidden * inner + vectors)
    assert by_name["int8"]["attention"] == by_name["none"]["attention"]  # the KV cache stays fp16


def test_roofline_counts_half_a_byte_an_int4_weight_plus_its_groups_scale_and_zero():
    config = roofline.load_config("EleutherAI/pythia-2.8b")
    ops = {op.name: op.bytes for op in roofline.operators(config, 1, 1, 2000, weight_quant="int4")}
    hidden, inner = config.hidden_size, config.intermediate_size
    vectors = 2 * (hidden + inner)
    groups_up, groups_down = hidden // weight_quant.INT4_GROUP, inner // weight_quant.INT4_GROUP  # 20 and 80
    assert ops["mlp_up"] == config.num_hidden_layers * (hidden * inner / 2 + 4 * groups_up * inner + vectors)
    assert ops["mlp_down"] == config.num_hidden_layers * (inner * hidden / 2 + 4 * groups_down * hidden + vectors)
    assert weight_quant.linear_weight_bytes(200, 3, "int4", 2) == 300 + 4 * 2 * 3  # a part group is a whole one


def test_int8_folded_branches_compile_whole(model):
    # On CUDA the two-stream step compiles each branch with fullgraph=True: an int8 weight's
    # linear must trace without a graph break.
    view = weight_quant.quantize_weights(fused_projections.fold_projections(copy.deepcopy(model)), "int8")
    torch._dynamo.reset()
    branches = [torch.compile(fn, fullgraph=True) for fn in (
        fused_projections.projections, fused_projections.attention_from_qkv, fused_projections.mlp_from_input)]

    def step(view, state):
        logits = neox_decode.final_logits(view, fused_projections.layer_outputs(view, state, *branches))
        return neox_decode.next_token(logits, state.temperature, state.top_k, state.noise)

    expected = neox_decode.generate(view, [prompt()], None, 4, step=fused_projections.decode_step).tokens
    with weight_quant.compile_settings("int8"):
        assert torch.equal(neox_decode.generate(view, [prompt()], None, 4, step=step).tokens, expected)


def test_weight_quant_quality_refuses_random_weights(capsys):
    from evaluation import weight_quant_quality

    with pytest.raises(SystemExit) as exit_info:
        weight_quant_quality.main(["--model", "EleutherAI/pythia-70m", "--random-init"])
    assert exit_info.value.code == 2
    assert "random weights" in capsys.readouterr().err


def test_linears_as_matmuls_compute_the_same_function(model):
    matmuls = weight_quant.as_matmuls(copy.deepcopy(model))
    assert {type(module) for module in linears(matmuls).values()} == {weight_quant.MatmulLinear}
    torch.testing.assert_close(logits_of(matmuls, neox_decode.forward_logits),
                               logits_of(model, neox_decode.forward_logits), rtol=1e-5, atol=1e-5)


def test_step_floor_prints_the_int8_weights_floor(capsys):
    from evaluation import step_floor

    floors = {}
    for scheme in ("none", "int8"):
        step_floor.main(["--cache", "2128", "--bandwidth", "4", "--peak_tflops", "800", "--weight_quant", scheme])
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("floor:"))
        floors[scheme] = float(line.split()[1])
    config = roofline.load_config("EleutherAI/pythia-2.8b")
    saved = (roofline.step_bytes(config, 1, 1, 2128) - roofline.step_bytes(config, 1, 1, 2128, "int8")) / 4e12
    assert floors["none"] - floors["int8"] == pytest.approx(1e3 * saved, abs=1e-3)


def test_folding_quantized_weights_is_refused(model):
    quantized = weight_quant.quantize_weights(copy.deepcopy(model), "int8")
    with pytest.raises(ValueError, match="before quantizing"):
        fused_projections.fold_projections(quantized)
