"""Speculative decoding is lossless: greedy outputs equal plain greedy decoding token for token,
rolled-back caches equal plain decoding's, and rejection sampling emits the target's
distribution. Plus the CLI's errors, the cost measurement and the speedup formula."""

import copy
import json

import pytest
import torch
from transformers import DynamicCache

from decoding.layer_skip import _agreement_and_kl, choose_skip_layers, skipping_model
from decoding.reference import kvpress_generate
from decoding.speculative import LayerSkipDraft, ModelDraft, Stats, accept_sampled, speculative_generate
from evaluation import speculative as cli
from evaluation.data import load_text
from evaluation.models import load_model
from evaluation.speculative_speedup import expected_tokens, predicted_speedup
from evaluation.speculative_speedup import main as speedup_main
from presses import Settings, make_press
from tests.conftest import build, shared_data_dir, tiny_llama_config, tiny_neox_config

NEW = 16


def noisy_copy(model, scale=0.001, seed=1):
    """A draft close to the target (accepts about half its drafts on these tiny models)."""
    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return draft


def make_draft(kind, target, config):
    if kind == "small_model":  # another, smaller model with the same vocabulary
        return ModelDraft(build(config.__class__(**(config.to_dict() | {"num_hidden_layers": 1})), seed=5,
                                attn_implementation="sdpa"))
    if kind == "close_model":
        return ModelDraft(noisy_copy(target))
    if kind == "self_streaming_llm":
        return ModelDraft(target, make_press("streaming_llm", 0.8))
    return LayerSkipDraft(target, [1])


def prompt_ids(batch=1, length=48, seed=3):
    return torch.randint(2, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config", [tiny_neox_config(num_hidden_layers=3), tiny_llama_config(num_hidden_layers=3)],
                         ids=["neox", "llama"])
@pytest.mark.parametrize("kind", ["small_model", "close_model", "self_streaming_llm", "layer_skip"])
@pytest.mark.parametrize("press, cache", [(None, "dynamic"), ("snapkv", "dynamic"), ("snapkv", "static")],
                         ids=["dense-dynamic", "snapkv-dynamic", "snapkv-static"])
def test_greedy_speculation_is_plain_greedy_decoding(config, kind, press, cache):
    target = build(config, attn_implementation="sdpa")
    target_press = make_press(press, 0.5, Settings(window=16)) if press else None
    prompt = prompt_ids(batch=2 if kind == "layer_skip" else 1, length=64)  # a batch advances by its smallest acceptance
    expected = kvpress_generate(target, prompt, target_press, NEW).tokens
    stats = Stats()
    tokens = speculative_generate(target, prompt, make_draft(kind, target, config), NEW, k=3, press=target_press,
                                  cache=cache, adaptive=kind == "self_streaming_llm", stats=stats)
    assert torch.equal(tokens, expected)
    assert sum(stats.accepted) + len(stats.accepted) >= NEW - 1  # every token came from a verify pass
    if kind in ("close_model", "self_streaming_llm"):  # rollback after partial acceptance ran
        assert 0 < sum(stats.accepted) < sum(stats.proposed)
    if kind == "close_model" and press is None:  # and after full acceptance (the draft's backlog)
        assert 3 in stats.accepted


@pytest.mark.parametrize("kind", ["small_model", "close_model", "self_streaming_llm", "layer_skip"])
@pytest.mark.parametrize("press", [None, "snapkv", "pyramidkv"])
def test_greedy_speculation_on_the_neox_path_is_plain_greedy_decoding(kind, press):
    """The GPT-NeoX fast path (decoding/neox_decode.py), whose step costs predict the GPU speedup:
    same tokens as plain decoding, ragged PyramidKV layers included."""
    config = tiny_neox_config(num_hidden_layers=3)
    target = build(config, attn_implementation="sdpa")
    target_press = make_press(press, 0.5, Settings(window=16)) if press else None
    prompt = prompt_ids(batch=2 if kind == "layer_skip" else 1, length=64)
    expected = kvpress_generate(target, prompt, target_press, NEW).tokens
    stats = Stats()
    tokens = speculative_generate(target, prompt, make_draft(kind, target, config), NEW, k=3, press=target_press,
                                  cache="neox", adaptive=kind == "self_streaming_llm", stats=stats)
    assert torch.equal(tokens, expected)
    if kind in ("close_model", "self_streaming_llm"):
        assert 0 < sum(stats.accepted) < sum(stats.proposed)


@pytest.mark.parametrize("kind", ["close_model", "layer_skip"])
def test_ragged_target_cache_pyramidkv(kind):
    """PyramidKV leaves layers with different lengths: rollback crops each layer on its own."""
    from kvpress import PyramidKVPress

    config = tiny_neox_config(num_hidden_layers=3)
    target = build(config, attn_implementation="sdpa")
    press = PyramidKVPress(0.5, window_size=4, beta=2)
    expected = kvpress_generate(target, prompt_ids(), press, NEW).tokens
    stats = Stats()
    tokens = speculative_generate(target, prompt_ids(), make_draft(kind, target, config), NEW, k=3, press=press,
                                  stats=stats)
    assert torch.equal(tokens, expected)
    assert len({layer.keys.shape[2] for layer in stats.target.cache.layers}) > 1


def plain_cache(model, prompt, tokens, press=None):
    """The cache plain decoding holds after the prompt (with the press) and ``tokens`` one by one."""
    cache = DynamicCache()
    with torch.no_grad():
        with press(model) if press else torch.no_grad():
            model.model(input_ids=prompt, past_key_values=cache)
        for index in range(tokens.shape[1]):
            position = torch.full((prompt.shape[0], 1), prompt.shape[1] + index)
            model(input_ids=tokens[:, index:index + 1], past_key_values=cache, position_ids=position)
    return cache


def layers_of(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers cache or of the neox buffer."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.keys, cache.values))


@pytest.mark.parametrize("cache, config", [("dynamic", tiny_llama_config(num_hidden_layers=3)),
                                           ("static", tiny_llama_config(num_hidden_layers=3)),
                                           ("neox", tiny_neox_config(num_hidden_layers=3))],
                         ids=["dynamic", "static", "neox"])
@pytest.mark.parametrize("kind", ["close_model", "layer_skip"])
def test_rollback_leaves_the_caches_plain_decoding_holds(cache, config, kind):
    target = build(config, attn_implementation="sdpa")
    draft = make_draft(kind, target, config)
    press = make_press("knorm", 0.5)
    stats = Stats()
    prompt = prompt_ids()
    tokens = speculative_generate(target, prompt, draft, 60, k=4, press=press, cache=cache, stats=stats)
    emitted = 1 + sum(stats.accepted) + len(stats.accepted)  # before truncation to 60
    assert 0 < sum(stats.accepted) < sum(stats.proposed)
    runner = stats.target
    committed = runner.position - prompt.shape[1]
    assert committed == emitted - 1  # every emitted token but the newest, nothing rejected
    reference = plain_cache(target, prompt, tokens[:, :min(committed, 60)], press)
    kept = 24  # knorm at 0.5 of 48
    for (keys, values), expected in zip(layers_of(runner.cache), reference.layers):
        length = expected.keys.shape[2]
        if cache == "dynamic":
            assert keys.shape[2] == kept + committed  # no rejected or draft entries left
        torch.testing.assert_close(keys[:, :, :length], expected.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(values[:, :, :length], expected.values, rtol=1e-4, atol=1e-5)
    if kind == "close_model":  # the draft's own cache: the prompt and what it was fed, nothing rejected
        draft_runner = draft.runner
        fed = draft_runner.position - prompt.shape[1]
        assert fed == committed - draft.backlog.shape[1]
        draft_reference = plain_cache(draft.model, prompt, tokens[:, :min(fed, 60)])
        for (keys, _), expected in zip(layers_of(draft_runner.cache), draft_reference.layers):
            length = expected.keys.shape[2]
            torch.testing.assert_close(keys[:, :, :length], expected.keys, rtol=1e-4, atol=1e-5)


def total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * (counts / counts.sum() - probs).abs().sum().item()


def test_rejection_rule_emits_the_target_distribution_at_every_slot():
    """Fixed p and q (k = 2, vocabulary 4), 12000 trials of the rule alone: the first emitted
    token follows p[0]; given the first was accepted, the second follows p[1]; the bonus p[2]."""
    p = torch.tensor([[[0.6, 0.2, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6], [0.25, 0.25, 0.4, 0.1]]])
    q = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]])
    generator = torch.Generator().manual_seed(0)
    slots = [torch.zeros(4) for _ in range(3)]
    trials = 12000
    drafts = torch.stack([torch.multinomial(q[0, i], trials, replacement=True, generator=generator)
                          for i in range(2)], dim=1)
    for trial in range(trials):
        accepted, last = accept_sampled(p, q, drafts[trial:trial + 1], generator)
        emitted = drafts[trial, :accepted].tolist() + [last.item()]
        for slot, token in enumerate(emitted):
            slots[slot][token] += 1
    for slot in range(3):
        assert total_variation(slots[slot], p[0, slot]) < 0.035, slot
    assert slots[2].sum() > 600  # the bonus slot was reached often enough to be tested
    assert 0.5 * (p[0, :2] - q[0]).abs().sum(-1).min() > 0.3  # emitting the drafts would fail the test


def test_sampling_on_a_model_emits_the_target_distribution():
    """A tiny model (vocabulary 4, peaked at temperature 0.3) and a different draft model; 16000
    rows of one prompt: the first two speculative tokens follow the target's joint distribution."""
    config = tiny_neox_config(vocab_size=4, num_hidden_layers=2)
    target, other = build(config, seed=0, attn_implementation="sdpa"), build(config, seed=7, attn_implementation="sdpa")
    temperature, rows = 0.3, 16000
    prompt = torch.tensor([[0, 1, 2, 3, 2, 1]]).expand(rows, -1)
    generator = torch.Generator().manual_seed(1)
    tokens = speculative_generate(target, prompt, ModelDraft(other), 3, k=2, temperature=temperature,
                                  generator=generator)
    with torch.no_grad():  # the target's exact joint of tokens 2 and 3 for each token 1, by enumeration
        prefixes = torch.tensor([[a, b] for a in range(4) for b in range(4)])
        context = torch.cat([prompt[:16], prefixes], dim=1)
        p_target = (target(context).logits.float() / temperature).softmax(-1)
        p_other = (other(context).logits.float() / temperature).softmax(-1)
    # context = prompt, a, b: position -2 gives token 2 after token 1 = a, position -1 token 3 after a, b
    second, third = p_target[::4, -2], p_target[:, -1].view(4, 4, 4)
    second_other, third_other = p_other[::4, -2], p_other[:, -1].view(4, 4, 4)
    tested = 0
    for a in range(4):
        rows_a = tokens[:, 0] == a
        if rows_a.sum() < 1500:
            continue
        counts = torch.bincount(tokens[rows_a, 1] * 4 + tokens[rows_a, 2], minlength=16).float()
        joint = (second[a][:, None] * third[a]).flatten()
        joint_other = (second_other[a][:, None] * third_other[a]).flatten()
        assert total_variation(counts, joint) < 0.045, a
        assert 0.5 * (joint - joint_other).abs().sum() > 0.12  # the draft's own distribution is far off
        tested += 1
    assert tested >= 1


def test_layer_choice_first_pick_is_the_most_agreeing_layer():
    model = build(tiny_llama_config(num_hidden_layers=4))
    ids = prompt_ids(length=48)
    skip, history = choose_skip_layers(model, ids, 2)
    assert len(skip) == 2 and len(history) == 2
    reference = model(input_ids=ids).logits[0].float().log_softmax(-1)
    single = [_agreement_and_kl(skipping_model(model, [layer]), ids, reference.argmax(-1), reference) for layer in range(4)]
    best = max(range(4), key=lambda layer: (single[layer][0], -single[layer][1]))
    assert history[0]["added_layer"] == best and history[0]["top1_agreement"] == single[best][0]
    assert len(model.model.layers) == 4  # the view left the model whole


@pytest.mark.parametrize("spec, message", [
    ("self=magic,k=4", "unknown press"),
    ("draft=x,k=0", "k must be an integer >= 1"),
    ("self=layer_skip,k=4", "needs skip=N"),
    ("draft=x,self=snapkv", "exactly one"),
    ("draft=x,speed=2", "unknown key"),
    ("self=infllm", "no prefill form"),
])
def test_bad_specs_are_one_line_errors(spec, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", "smollm2-135m", "--speculative", spec])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_predicted_speedup_matches_a_hand_computation():
    # alpha 0.8, k 4: (1 - 0.8^5) / 0.2 = 3.3616 tokens; cost 4 * 1 ms + 12 ms = 16 ms; plain 10 ms/token.
    assert expected_tokens(0.8, 4) == pytest.approx(3.3616)
    assert predicted_speedup(0.8, 4, draft_ms=1.0, verify_ms=12.0, decode_ms=10.0) == pytest.approx(2.101)
    assert expected_tokens(1.0, 3) == 4 and expected_tokens(0.0, 3) == 1
    # Leviathan et al.'s Theorem 3.8 (verify = one step, draft cost c = 0.1): (1 - a^(k+1)) / ((1 - a)(k c + 1))
    assert predicted_speedup(0.7, 3, 0.1, 1.0, 1.0) == pytest.approx((1 - 0.7 ** 4) / (0.3 * 1.3))


def test_verify_costs_and_speedup_plot_run_on_cpu(tmp_path):
    """The GPU script's measurement on a small random-init Pythia, eager, a few tokens."""
    costs = tmp_path / "costs.json"
    cli.main(["--model", "EleutherAI/pythia-70m", "--random-init", "--verify_costs", "--draft_model",
              "EleutherAI/pythia-70m", "--prompt_tokens", "24", "--new_tokens", "4", "--batch_size", "1", "2",
              "--k_values", "1", "3", "--self_budget", "8", "--repeats", "1", "--output", str(costs)])
    rows = json.loads(costs.read_text())["rows"]
    assert [(r["what"], r["batch_size"], r["tokens"]) for r in rows[:3]] == [
        ("target decode step", 1, 1), ("target verify pass", 1, 2), ("target verify pass", 1, 4)]
    assert {r["what"] for r in rows} >= {"draft model decode step", "self-draft step, compressed cache",
                                         "self-draft step, layers skipped"}
    speedup_main([str(costs), "--alpha", "0.8", "--output", str(tmp_path / "curve")])
    points = json.loads((tmp_path / "curve.json").read_text())["points"]
    assert {(p["batch_size"], p["k"]) for p in points} == {(1, 1), (1, 3), (2, 1), (2, 3)}
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_smollm2_real_weights_both_self_drafts_are_lossless():
    """SmolLM2-135M (real weights): a compressed-cache and a layer-skip self-draft give plain
    greedy decoding's 20 tokens on a WikiText prompt, and accept some drafts. (Layer 16 is
    what choose_skip_layers picks first on this prompt; the choice is tested above.)"""
    loaded = load_model("smollm2-135m", dtype="float32")
    model = loaded.model
    text, _ = load_text("wikitext", shared_data_dir())
    ids = loaded.tokenizer()(text[:4000], return_tensors="pt").input_ids[:, 200:328]
    expected = kvpress_generate(model, ids, None, 20).tokens
    for draft in [ModelDraft(model, make_press("streaming_llm", 0.75)), LayerSkipDraft(model, [16])]:
        stats = Stats()
        assert torch.equal(speculative_generate(model, ids, draft, 20, k=4, stats=stats), expected)
        assert sum(stats.accepted) > 0
