"""The plain GPT-NeoX decode step (decoding/neox_decode.py) gives the tokens of the kvpress loop, compiled
(decoding/neox_cuda_graphs.py) or not."""

import json
import weakref

import pytest
import torch
from kvpress import PyramidKVPress

from decoding import neox_cuda_graphs, neox_decode
from decoding.neox_decode import StepState
from decoding.reference import kvpress_generate
from evaluation.check_decoders import agreement
from evaluation.check_decoders import main as check_decoders
from evaluation.check_decoders import margin_recording_step
from presses import make_press
from tests.conftest import build, record_cache_lengths, tiny_neox_config


@pytest.fixture(scope="module")
def model():
    return build(tiny_neox_config(), attn_implementation="sdpa")


def prompts(batch: int, length: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(2, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", neox_decode.ATTENTION_BACKENDS)
@pytest.mark.parametrize("name, ratio", [(None, 0.0), ("snapkv", 0.5), ("streaming_llm", 0.5), ("pyramidkv", 0.5)])
def test_same_greedy_tokens_as_the_kvpress_loop(model, backend, name, ratio):
    prompt = prompts(2, 100)
    press = make_press(name, ratio) if name else None
    expected = kvpress_generate(model, prompt, press, new_tokens=12).tokens
    assert torch.equal(neox_decode.generate(model, list(prompt.split(1)), press, 12, backend=backend).tokens, expected)


def test_layers_keeping_different_lengths_decode_like_the_kvpress_loop(model):
    press = PyramidKVPress(0.5, window_size=4, beta=2)
    lengths = record_cache_lengths(press)
    prompt = prompts(1, 100)
    expected = kvpress_generate(model, prompt, press, new_tokens=12).tokens
    assert len(set(lengths)) > 1, "the press must leave the layers ragged for this test to mean anything"
    generation = neox_decode.generate(model, [prompt], press, 12)
    assert torch.equal(generation.tokens, expected)
    # Each layer's buffer holds its own kept tokens plus the new ones: no padding to the longest layer.
    token_bytes = 2 * model.config.hidden_size * 4  # keys and values, fp32
    assert generation.kv_bytes_final == sum(lengths[-2:]) * token_bytes + 2 * 12 * token_bytes


def test_prompts_of_different_lengths_in_one_batch_decode_as_if_alone(model):
    short, long = prompts(1, 70, seed=4), prompts(1, 100, seed=5)
    press = make_press("snapkv", 0.5)
    alone = [kvpress_generate(model, prompt, press, new_tokens=10).tokens for prompt in (short, long)]
    together = neox_decode.generate(model, [short, long], press, 10).tokens
    assert torch.equal(together, torch.cat(alone))


@pytest.mark.parametrize("name", [None, "snapkv"])
def test_a_prefill_in_micro_batches_gives_the_tokens_and_buffer_of_one_prefill(model, name):
    """--prefill_batch: 5 sequences prefilled 2 at a time (a last micro-batch of 1), prompts of two
    lengths among them, decode exactly as the whole batch prefilled at once."""
    press = make_press(name, 0.5) if name else None
    batch = list(prompts(3, 100).split(1)) + list(prompts(2, 80, seed=6).split(1))
    whole = neox_decode.generate(model, batch, press, 10)
    micro = neox_decode.generate(model, batch, press, 10, prefill_batch=2)
    assert torch.equal(micro.tokens, whole.tokens)
    assert micro.kept_tokens_per_layer == whole.kept_tokens_per_layer
    assert micro.kv_bytes_final == whole.kv_bytes_final and micro.kv_bytes_after_prefill == whole.kv_bytes_after_prefill
    _, groups = neox_decode.prefill(model, batch, press, prefill_batch=2)
    assert [rows for rows, _ in groups] == [[0, 1], [2], [3, 4]]
    with pytest.raises(ValueError, match="prefill_batch"):
        neox_decode.prefill(model, batch, press, prefill_batch=0)


@pytest.mark.parametrize("split_mlp, graphs", [(False, 4), (True, 5)])
def test_branches_compiled_apart_give_the_same_tokens_and_compile_once_for_all_layers(split_mlp, graphs):
    # The two-stream step (CUDA) compiles each layer's attention and MLP branch on its own (with
    # split_mlp the MLP as two, the GELU between them written out); every layer must reuse those
    # graphs (a recompile per layer would hit dynamo's limit and fall back). Its compiled branches,
    # built on the CPU, run here in the plain layer loop.
    from torch._dynamo.utils import counters

    from decoding.neox_cuda_graphs import TwoStreamStep

    model = build(tiny_neox_config(num_hidden_layers=4), attn_implementation="sdpa")
    torch._dynamo.reset()
    counters.clear()
    branches = TwoStreamStep(split_mlp=split_mlp)

    def step(model, state):
        parts = neox_decode.layer_outputs(model, state, branches.attention_fn, branches.mlp_fn)
        return neox_decode.next_token(neox_decode.final_logits(model, parts), state.temperature, state.top_k,
                                      state.noise)

    prompt = prompts(1, 100)
    press = make_press("snapkv", 0.5)
    expected = kvpress_generate(model, prompt, press, new_tokens=5).tokens
    assert torch.equal(neox_decode.generate(model, [prompt], press, 5, step=step).tokens, expected)
    # attention and MLP (its first half, with split_mlp), each for the first layer's one input part
    # and the later layers' three; with split_mlp one more, the output GEMV, the same for every layer
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_one_stream_step_runs_the_mlp_in_line():
    # compile_mode one-stream: the two-stream step's graphs with the MLP on the main stream. Its
    # step (what the graph captures) runs here on the CPU, where any use of a second stream would
    # fail (on a GPU, a wait on the unused side stream broke the capture).
    model = build(tiny_neox_config(num_hidden_layers=2), attn_implementation="sdpa")
    one_stream = neox_cuda_graphs.compiled_step(True, "one-stream")
    assert isinstance(one_stream, neox_cuda_graphs.TwoStreamStep) and not one_stream.overlap
    step = one_stream._step
    prompt = prompts(1, 100)
    press = make_press("snapkv", 0.5)
    expected = kvpress_generate(model, prompt, press, new_tokens=4).tokens
    assert torch.equal(neox_decode.generate(model, [prompt], press, 4, step=step).tokens, expected)


def test_the_mlp_split_in_two_is_the_mlp():
    model = build(tiny_neox_config(num_hidden_layers=1), attn_implementation="sdpa")
    layer = model.gpt_neox.layers[0]
    parts = tuple(torch.randn(2, 1, model.config.hidden_size) for _ in range(3))
    whole = neox_decode.mlp_branch(layer, parts)
    assert torch.equal(neox_decode.mlp_output(layer, neox_decode.mlp_hidden(layer, parts)), whole)
    assert whole.abs().sum() > 0


def test_compiled_step_gives_the_same_tokens(model):
    prompt = prompts(2, 100)
    press = make_press("snapkv", 0.5)
    expected = neox_decode.generate(model, list(prompt.split(1)), press, 6).tokens
    step = neox_cuda_graphs.compiled_step(True, mode="default")  # CPU: inductor, no CUDA graphs
    assert torch.equal(neox_decode.generate(model, list(prompt.split(1)), press, 6, step=step).tokens, expected)


def test_sampling_is_reproducible_and_not_greedy(model):
    prompt = list(prompts(2, 100).split(1))

    def sample(seed, backend="sdpa"):
        generator = torch.Generator().manual_seed(seed)
        return neox_decode.generate(model, prompt, None, 16, backend=backend, temperature=1.0, generator=generator).tokens

    assert torch.equal(sample(0), sample(0, backend="eager"))
    assert not torch.equal(sample(0), sample(1))
    assert not torch.equal(sample(0), neox_decode.generate(model, prompt, None, 16).tokens)


def test_sampler_draws_from_the_tempered_top_k_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    temperature, top_k, draws = 0.7, 3, 40_000
    noise = torch.rand((draws, 5), generator=torch.Generator().manual_seed(0))
    tokens = neox_decode.next_token(logits.expand(draws, -1), temperature, top_k, noise)
    observed = torch.bincount(tokens, minlength=5).float() / draws
    expected = torch.zeros(5)
    expected[:3] = torch.softmax(logits[0, :3] / temperature, dim=0)
    assert (observed - expected).abs().max() < 0.01  # about 4 standard errors at 40k draws


def test_a_verify_pass_of_several_tokens_equals_one_step_per_token(model):
    """Several new tokens in one call (speculative verification) see the cache and each other
    exactly as the same tokens fed one step at a time."""
    prompt, drafted = list(prompts(2, 100).split(1)), prompts(2, 5, seed=9)
    one_by_one = neox_decode.load_buffer(neox_decode.prefill(model, prompt, make_press("snapkv", 0.5))[1], 8)
    together = neox_decode.load_buffer(neox_decode.prefill(model, prompt, make_press("snapkv", 0.5))[1], 8)
    positions = torch.arange(100, 105).expand(2, -1)
    stepped = [neox_decode.decode_step(model, StepState(one_by_one, drafted[:, [i]], positions[:, [i]],
                                                        torch.tensor([i]))) for i in range(5)]
    verified = neox_decode.decode_step(model, StepState(together, drafted, positions, torch.arange(5)))
    assert torch.equal(verified, torch.cat(stepped, dim=1))
    for written_alone, written_together in zip(one_by_one.keys + one_by_one.values, together.keys + together.values):
        torch.testing.assert_close(written_together, written_alone)  # matmul shapes differ: round-off only


def test_a_refilled_buffer_equals_a_new_one_and_keeps_its_addresses(model):
    """The two-stream step's graph reads the buffer's addresses: a second generation of the same
    shape must land in the same tensors, holding exactly what a newly allocated buffer would."""
    press = make_press("snapkv", 0.5)
    first = [prompts(1, 70, seed=4), prompts(1, 100, seed=5)]  # ragged: padding slots in front
    second = [prompts(1, 70, seed=6), prompts(1, 100, seed=7)]
    buffer = neox_decode.load_buffer(neox_decode.prefill(model, first, press)[1], 8)
    for i in range(3):  # written slots and attention the second generation must not inherit
        state = StepState(buffer, prompts(2, 1, seed=i), torch.full((2, 1), 100 + i), torch.tensor([i]))
        neox_decode.decode_step(model, state)
    addresses = [t.data_ptr() for t in buffer.keys + buffer.values + [buffer.kept, buffer.first_valid]]
    refilled = neox_decode.load_buffer(neox_decode.prefill(model, second, press)[1], 8, into=buffer)
    fresh = neox_decode.load_buffer(neox_decode.prefill(model, second, press)[1], 8)
    assert refilled is buffer
    assert [t.data_ptr() for t in refilled.keys + refilled.values + [refilled.kept, refilled.first_valid]] == addresses
    for name in ("keys", "values"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(refilled, name), getattr(fresh, name)))
    assert torch.equal(refilled.kept, fresh.kept) and torch.equal(refilled.first_valid, fresh.first_valid)


def test_two_stream_step_keeps_its_buffer_only_while_the_shapes_match(model):
    def groups(length):
        return neox_decode.prefill(model, [prompts(1, length)])[1]

    step = neox_cuda_graphs.TwoStreamStep(keep_buffer=True)
    first = step.load_buffer(groups(100), 8)
    assert step.load_buffer(groups(100), 8) is first
    old = weakref.ref(first)
    del first
    other = step.load_buffer(groups(60), 8)  # another shape: a new buffer, the old one freed
    assert old() is None and other.keys[0].shape[2] == 60 + 8
    releasing = neox_cuda_graphs.TwoStreamStep(keep_buffer=False)
    assert releasing.load_buffer(groups(100), 8) is not releasing.load_buffer(groups(100), 8)


def test_flex_attention_prefill_runs_under_kvpress_and_matches_sdpa(model):
    # kvpress 0.5.5 alone makes every flex forward a TypeError (patches/flex_attention.py).
    prompt = prompts(2, 100)
    with torch.no_grad():
        expected = model(prompt).logits
        with neox_decode.attention_implementation(model, "flex_attention"):
            assert model.config._attn_implementation == "flex_attention"
            flex = model(prompt).logits
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(flex, expected, rtol=1e-4, atol=1e-5)


def test_flex_attention_hands_presses_no_log_sum_exp_as_weights(monkeypatch):
    # On a GPU transformers' flex returns (output, log-sum-exp); presses read the second as
    # attention probabilities (SnapKV failed on its shape). The CPU path returns no LSE, so it is
    # stood in for here.
    from patches import flex_attention
    output, log_sum_exp = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6)
    monkeypatch.setattr(flex_attention, "flex_attention_forward", lambda *args, **kwargs: (output, log_sum_exp))
    returned, weights = flex_attention.flex_attention_taking_dropout(None, None, None, None, None, 0.0)
    assert returned is output and weights is None


def test_unknown_attention_backend_is_refused(model):
    with pytest.raises(ValueError, match="sdpa, flex, eager"):
        neox_decode.generate(model, [prompts(1, 20)], None, 3, backend="flash3")


def test_other_architectures_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="GPT-NeoX"):
        neox_decode.generate(tiny_llama, [prompts(1, 20)], None, 3)


def test_sampled_decoder_check_draws_the_same_noise_on_every_path(tmp_path):
    output = tmp_path / "check.json"
    check_decoders(["--model", "EleutherAI/pythia-70m", "--random-init", "--device", "cpu", "--press", "snapkv",
                    "--prompt_tokens", "80", "--new_tokens", "6", "--temperature", "1.0", "--top_k", "50",
                    "--output", str(output)])
    rows = json.loads(output.read_text())["rows"]
    assert {(row["method"], row["path"]) for row in rows} == {
        (method, path) for method in ("dense", "snapkv") for path in ("neox", "neox_two_stream")}
    assert all(row["identical"] for row in rows)


def test_sampled_reference_records_how_near_a_tie_each_draw_was(model):
    prompt = list(prompts(2, 100).split(1))
    margins, top_k_gaps = [], []

    def sample(step):
        return neox_decode.generate(model, prompt, None, 8, step=step, temperature=1.0, top_k=20,
                                    generator=torch.Generator().manual_seed(1)).tokens

    assert torch.equal(sample(margin_recording_step(margins, top_k_gaps)), sample(neox_decode.decode_step))
    assert len(margins) == len(top_k_gaps) == 7
    assert all(gaps.shape == (2,) and (gaps > 0).all() for gaps in margins + top_k_gaps)


def test_agreement_says_where_two_decodings_part():
    reference = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    other = torch.tensor([[1, 2, 9, 9], [5, 6, 7, 8]])
    assert agreement(other, reference) == {"identical": False, "first_difference": [2, None], "agreement": 0.75}


def test_forced_generation_records_how_near_a_tie_each_greedy_choice_was(model):
    prompt = prompts(2, 30)
    margins = []
    tokens = kvpress_generate(model, prompt, None, 4, margins=margins).tokens
    assert torch.equal(tokens, kvpress_generate(model, prompt, None, 4).tokens)
    assert len(margins) == 4 and all(margin.shape == (2,) and bool((margin >= 0).all()) for margin in margins)
    with torch.no_grad():
        top = model(prompt).logits[:, -1].topk(2).values
    torch.testing.assert_close(margins[0], top[:, 0] - top[:, 1])


def test_forced_generation_keeps_no_autograd_graph(model):
    # With autograd on, each step's cache would hold that step's activations (an OOM at 2k tokens
    # on the GPU) and the kvpress loop's timings would include recording them.
    grad_enabled = []
    hook = model.gpt_neox.register_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    try:
        kvpress_generate(model, prompts(1, 100), make_press("snapkv", 0.5), 3)
    finally:
        hook.remove()
    assert grad_enabled == [False] * 3


def test_decoder_check_finds_every_path_identical_on_the_cpu(tmp_path):
    output = tmp_path / "check.json"
    check_decoders(["--model", "EleutherAI/pythia-70m", "--random-init", "--device", "cpu", "--press", "snapkv",
                    "--prompt_tokens", "80", "--new_tokens", "5", "--output", str(output)])
    rows = json.loads(output.read_text())["rows"]
    assert {(row["method"], row["path"]) for row in rows} == {
        (method, path) for method in ("dense", "snapkv") for path in ("static", "neox", "neox_two_stream")}
    assert all(row["identical"] and row["reference_margin_there"] == [None, None] for row in rows)


@pytest.mark.parametrize("backend", neox_decode.ATTENTION_BACKENDS)
def test_a_prefix_of_the_buffer_decodes_as_the_whole_buffer(model, backend):
    """The two-stream step's prefix buckets: attention over each layer's kept slots and the first
    new ones (views of the buffer) gives the logits of attention over every slot, the slots past
    them masked; the keys and values land in the buffer itself. Ragged on both axes: PyramidKV's
    layers keep different lengths, and the shorter prompt leaves padding slots in front."""
    press = PyramidKVPress(0.5, window_size=4, beta=2)
    batch = [prompts(1, 70, seed=4), prompts(1, 100, seed=5)]
    whole = neox_decode.load_buffer(neox_decode.prefill(model, batch, press)[1], 8)
    cut = neox_decode.load_buffer(neox_decode.prefill(model, batch, press)[1], 8)
    assert len(set(cut.kept_slots)) > 1 and cut.first_valid.max() > 0, "ragged layers and rows, or the test means little"
    assert cut.kept_slots == tuple(cut.kept.tolist()) and cut.new_slots() == 8
    for index in range(8):
        token, position = prompts(2, 1, seed=index), torch.tensor([[70 + index], [100 + index]])
        new_slots = 4 if index < 4 else 8  # buckets of 4 new slots
        view = cut.prefix(new_slots)
        assert [keys.shape[2] for keys in view.keys] == [kept + new_slots for kept in cut.kept_slots]
        states = [StepState(buffer, token, position, torch.tensor([index]), backend=backend) for buffer in (whole, view)]
        with torch.no_grad():
            expected, logits = (neox_decode.forward_logits(model, state) for state in states)
        torch.testing.assert_close(logits, expected)  # shorter reductions: round-off only
    for written_whole, written_cut in zip(whole.keys + whole.values, cut.keys + cut.values):
        torch.testing.assert_close(written_cut, written_whole)


def test_prefix_refuses_slots_the_buffer_does_not_have(model):
    buffer = neox_decode.load_buffer(neox_decode.prefill(model, [prompts(1, 40)])[1], 8)
    for new_slots in (0, 9):
        with pytest.raises(ValueError, match=r"new_slots must be in \[1, 8\]"):
            buffer.prefix(new_slots)


def test_two_stream_step_picks_the_bucket_that_covers_the_slots_in_use(model):
    buffer = neox_decode.load_buffer(neox_decode.prefill(model, [prompts(1, 40)])[1], 100)

    def bucket(step, filled):
        return step.bucket(StepState(buffer, prompts(1, 1), torch.tensor([[40]]), torch.tensor([0]), filled=filled))

    step = neox_cuda_graphs.TwoStreamStep(prefix_bucket=32)
    assert [bucket(step, filled) for filled in (1, 32, 33, 64, 65, 96, 97, 100)] == [32, 32, 64, 64, 96, 96, 100, 100]
    assert bucket(step, None) is None  # a caller that does not say what is filled: the whole buffer
    assert bucket(neox_cuda_graphs.TwoStreamStep(prefix_bucket=0), 1) is None
    with pytest.raises(ValueError, match="prefix_bucket must be at least 0"):
        neox_cuda_graphs.TwoStreamStep(prefix_bucket=-1)


def test_generate_tells_the_step_how_many_new_slots_are_in_use(model):
    seen = []

    def step(model, state):
        seen.append(state.filled)
        return neox_decode.decode_step(model, state)

    neox_decode.generate(model, [prompts(1, 40)], None, 5, step=step)
    assert seen == [1, 2, 3, 4]  # the first new token comes from the prefill; step i writes slot kept + i
