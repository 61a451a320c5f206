"""The folded step (decoding/fused_projections.py: each layer's LayerNorms folded into one QKV +
MLP-in GEMM) computes the plain step's function: the same logits up to float32 rounding and the
same greedy tokens."""

import pytest
import torch

from decoding import fused_projections, neox_decode
from decoding.neox_decode import StepState
from presses import make_press
from tests.conftest import build, tiny_neox_config


def with_random_layer_norms(model):
    # A fresh model's LayerNorms are the identity affine (γ 1, β 0): folding them would test nothing.
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=generator))
                norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def model():
    return with_random_layer_norms(build(tiny_neox_config(num_hidden_layers=3), attn_implementation="sdpa"))


def prompt(length: int = 90, seed: int = 3) -> torch.Tensor:
    return torch.randint(2, 1000, (1, length), generator=torch.Generator().manual_seed(seed))


def step_state(model, prompts, press, index: int = 0) -> StepState:
    _, groups = neox_decode.prefill(model, prompts, press)
    batch = len(prompts)
    buffer = neox_decode.load_buffer(groups, 4)
    lengths = torch.tensor([[p.shape[1]] for p in prompts])
    return StepState(buffer, torch.full((batch, 1), 17), lengths + index, torch.full((1,), index))


@pytest.mark.parametrize("name", [None, "snapkv"])
def test_folded_logits_equal_the_plain_steps(model, name):
    press = make_press(name, 0.5) if name else None
    prompts = [prompt(90), prompt(70, seed=4)]
    view = fused_projections.fold_projections(model)
    plain = neox_decode.forward_logits(model, step_state(model, prompts, press))
    folded = fused_projections.forward_logits(view, step_state(model, prompts, press))
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-5)


def test_folded_greedy_tokens_equal_the_plain_steps(model):
    press = make_press("streaming_llm", 0.5)
    prompts = [prompt(90), prompt(70, seed=4)]
    expected = neox_decode.generate(model, prompts, press, 12).tokens
    view = fused_projections.fold_projections(model)
    assert torch.equal(neox_decode.generate(view, prompts, press, 12, step=fused_projections.decode_step).tokens,
                       expected)


def test_the_view_shares_every_weight_and_leaves_the_model_as_it_was(model):
    view = fused_projections.fold_projections(model)
    for original, folded in zip(model.gpt_neox.layers, view.gpt_neox.layers):
        assert folded.attention is original.attention and folded.mlp is original.mlp
        assert not hasattr(original, "fused_in")
        hidden = model.config.hidden_size
        assert folded.fused_in.weight.shape == (3 * hidden + model.config.intermediate_size, hidden)


def test_branches_compile_whole_and_once_for_all_layers(model):
    # The two-stream folded step (CUDA) compiles the three branches with fullgraph=True; every
    # layer must reuse them (a recompile per layer would hit dynamo's limit and fall back).
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    branches = [torch.compile(fn, fullgraph=True) for fn in (
        fused_projections.projections, fused_projections.attention_from_qkv, fused_projections.mlp_from_input)]

    def step(view, state):
        logits = neox_decode.final_logits(view, fused_projections.layer_outputs(view, state, *branches))
        return neox_decode.next_token(logits, state.temperature, state.top_k, state.noise)

    view = fused_projections.fold_projections(model)
    expected = neox_decode.generate(model, [prompt()], None, 4).tokens
    assert torch.equal(neox_decode.generate(view, [prompt()], None, 4, step=step).tokens, expected)
    # projections for the first layer's one input part and the later layers' three; attention; MLP
    assert counters["stats"]["unique_graphs"] == 4


def test_a_model_without_the_parallel_residual_is_refused():
    serial = build(tiny_neox_config(use_parallel_residual=False))
    with pytest.raises(ValueError, match="parallel residual"):
        fused_projections.fold_projections(serial)


def test_the_folded_step_refuses_a_model_that_was_not_folded(model):
    with pytest.raises(ValueError, match="fold_projections"):
        fused_projections.forward_logits(model, step_state(model, [prompt()], None))
