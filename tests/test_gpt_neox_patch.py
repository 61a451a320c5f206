"""The GPT-NeoX patch computes the same model, reconstructs the right queries/keys, and lets
presses compress Pythia's cache exactly as they do Llama's."""

import torch
from kvpress import KnormPress, SnapKVPress, StreamingLLMPress
from transformers import DynamicCache, GPTNeoXConfig, GPTNeoXForCausalLM, pipeline

import patches
from patches import gpt_neox
from tests.conftest import build, tiny_llama_config, tiny_neox_config

CONTEXT = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
    "structure in Paris. Its base is square, measuring 125 metres on each side. During its construction, "
    "the Eiffel Tower surpassed the Washington Monument to become the tallest man-made structure in the "
    "world, a title it held for 41 years until the Chrysler Building in New York City was finished in 1930."
)


def token_ids(tokenizer, text=CONTEXT):
    return tokenizer(text, return_tensors="pt").input_ids


def prefill(model, ids, press=None):
    cache = DynamicCache()
    with torch.no_grad():
        if press is None:
            model.model(input_ids=ids, past_key_values=cache)
        else:
            with press(model):
                model.model(input_ids=ids, past_key_values=cache)
    return cache


def neox_rotary(x, position, rotary_ndims, base=10000.0):
    """GPT-NeoX rotary written from its definition: rotate dims [0, r) pairing i with i + r/2."""
    half = rotary_ndims // 2
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_ndims, 2, dtype=torch.float32) / rotary_ndims)
    angle = position[:, None].float() * inv_freq[None, :]
    cos, sin = angle.cos(), angle.sin()
    first, second, rest = x[..., :half], x[..., half:rotary_ndims], x[..., rotary_ndims:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin, rest], dim=-1)


def test_reordered_basis_pairs_neox_rotary_dims_like_llama():
    order = gpt_neox.to_kvpress_order(torch.arange(80), rotary_ndims=20)  # Pythia-2.8B head
    assert sorted(order.tolist()) == list(range(80))
    for i in range(10):  # NeoX pair (i, i + 10) must sit at (j, j + 40)
        j = order.tolist().index(i)
        assert j < 40 and order[j + 40] == i + 10
    assert torch.equal(gpt_neox.to_kvpress_order(torch.arange(16), 16), torch.arange(16))  # full rotary: identity


def test_patched_model_matches_untouched_transformers(tokenizer):
    config, ids = tiny_neox_config(), token_ids(tokenizer)
    gpt_neox.revert()
    try:
        reference = build(config)
        with torch.no_grad():
            expected = reference(ids).logits
            expected_tokens = reference.generate(ids, max_new_tokens=8, do_sample=False)
    finally:
        patches.apply()
    patched = build(config)
    patched.load_state_dict(reference.state_dict())
    with torch.no_grad():
        logits = patched(ids).logits
        tokens = patched.generate(ids, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)


def test_reconstructed_queries_and_keys_match_the_weights(tiny_neox, tokenizer):
    ids = token_ids(tokenizer)
    attention = tiny_neox.gpt_neox.layers[0].attention
    hidden = tiny_neox.gpt_neox.layers[0].input_layernorm(tiny_neox.gpt_neox.embed_in(ids))
    heads, head_dim, rotary_ndims = 4, 16, attention.rotary_ndims
    assert rotary_ndims == 4  # partial rotary really exercised: 4 of 16 dims turn
    weight = attention.query_key_value.weight.view(heads, 3, head_dim, -1)
    bias = attention.query_key_value.bias.view(heads, 3, head_dim)
    direct = torch.einsum("btc,hsdc->bhstd", hidden, weight) + bias[None, :, :, None, :]
    direct_q, direct_k = direct[:, :, 0], direct[:, :, 1]

    with torch.no_grad():
        query = attention.q_proj(hidden).view(1, -1, heads, head_dim).transpose(1, 2)
        key = attention.k_proj(hidden).view(1, -1, heads, head_dim).transpose(1, 2)
        cached_key = prefill(tiny_neox, ids).layers[0].keys
    reorder = lambda x: gpt_neox.to_kvpress_order(x, rotary_ndims)  # noqa: E731
    torch.testing.assert_close(query, reorder(direct_q))
    torch.testing.assert_close(key, reorder(direct_k))
    positions = torch.arange(ids.shape[1])
    torch.testing.assert_close(cached_key, reorder(neox_rotary(direct_k, positions, rotary_ndims)))


def test_ratio_zero_gives_the_bare_model_logits_and_tokens(tiny_neox, tokenizer):
    ids = token_ids(tokenizer)
    question = token_ids(tokenizer, " How tall is the tower?")
    positions = torch.arange(ids.shape[1], ids.shape[1] + question.shape[1])[None]
    with torch.no_grad():
        dense = tiny_neox(question, past_key_values=prefill(tiny_neox, ids), position_ids=positions).logits
        pressed_cache = prefill(tiny_neox, ids, SnapKVPress(compression_ratio=0.0, window_size=8))
        pressed = tiny_neox(question, past_key_values=pressed_cache, position_ids=positions).logits
    assert torch.equal(dense, pressed)

    pipe = pipeline("kv-press-text-generation", model=tiny_neox, tokenizer=tokenizer, device="cpu")
    bare = pipe(CONTEXT, question="How tall?", max_new_tokens=12)["answer"]
    at_zero = pipe(CONTEXT, question="How tall?", press=SnapKVPress(compression_ratio=0.0), max_new_tokens=12)
    assert at_zero["answer"] == bare


def assert_kept_entries_are_dense_entries(dense_cache, pressed_cache):
    for dense_layer, pressed_layer in zip(dense_cache.layers, pressed_cache.layers):
        keys, values = dense_layer.keys, dense_layer.values
        kept_keys, kept_values = pressed_layer.keys, pressed_layer.values
        # match[b, h, j, i]: kept key j is dense key i, bit for bit
        match = (kept_keys[:, :, :, None, :] == keys[:, :, None, :, :]).all(-1)
        assert match.any(-1).all(), "a kept key is not an entry of the dense cache"
        index = match.float().argmax(-1)  # kvpress keeps entries in score order, not position order
        assert (index.sort(dim=-1).values.diff(dim=-1) > 0).all(), "an entry was kept twice"
        gathered = values.gather(2, index[..., None].expand(-1, -1, -1, values.shape[-1]))
        assert torch.equal(kept_values, gathered)


def test_kept_entries_equal_dense_entries_and_half_are_kept(tiny_neox, tokenizer):
    ids = token_ids(tokenizer)
    length = ids.shape[1]
    dense = prefill(tiny_neox, ids)
    for press in [SnapKVPress(0.5, window_size=8), KnormPress(0.5), StreamingLLMPress(0.5, n_sink=4)]:
        pressed = prefill(tiny_neox, ids, press)
        assert [layer.keys.shape[2] for layer in pressed.layers] == [length // 2] * 2
        assert_kept_entries_are_dense_entries(dense, pressed)
        # A real choice was made: not just the first or last half for the scoring presses.
        if not isinstance(press, StreamingLLMPress):
            assert not torch.equal(pressed.layers[0].keys, dense.layers[0].keys[:, :, : length // 2])


def test_snapkv_scores_use_neox_partial_rotary(tiny_neox, tokenizer):
    """SnapKV's window attention, rebuilt by kvpress from pre-RoPE queries, equals the model's
    own attention weights (eager) for the last window: the rotary reconstruction is right."""
    ids = token_ids(tokenizer)
    window = 8
    captured = {}

    def keep_weights(module, args, kwargs, output):
        captured["weights"] = output[1]

    attention = tiny_neox.gpt_neox.layers[1].attention
    hook = attention.register_forward_hook(keep_weights, with_kwargs=True)
    calls = {}

    def keep_inputs(module, args, kwargs):
        calls["hidden"], calls["position_embeddings"] = kwargs["hidden_states"], kwargs["position_embeddings"]

    pre_hook = attention.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    try:
        cache = prefill(tiny_neox, ids)
    finally:
        hook.remove()
        pre_hook.remove()
    rebuilt = SnapKVPress.compute_window_attention(
        attention, calls["hidden"], cache.layers[1].keys, window, calls["position_embeddings"]
    )
    expected = captured["weights"][..., -window:, :-window]
    torch.testing.assert_close(rebuilt, expected, rtol=1e-4, atol=1e-6)


def test_llama_is_left_alone(tokenizer):
    config, ids = tiny_llama_config(), token_ids(tokenizer)
    patched = build(config)
    with torch.no_grad():
        logits = patched(ids).logits
    gpt_neox.revert()
    try:
        with torch.no_grad():
            untouched = build(config)(ids).logits
    finally:
        patches.apply()
    assert torch.equal(logits, untouched)
    pressed = prefill(patched, ids, SnapKVPress(0.5, window_size=8))
    assert_kept_entries_are_dense_entries(prefill(patched, ids), pressed)


def test_apply_is_idempotent_and_unsupported_models_are_named():
    patches.apply()
    patches.apply()
    assert GPTNeoXForCausalLM.model.fget is not None and gpt_neox.is_applied()
    assert GPTNeoXConfig(hidden_size=64, num_attention_heads=4).num_key_value_heads == 4
    try:
        patches.require_supported(torch.nn.Linear(2, 2))
    except patches.UnsupportedModelError as error:
        assert "Linear is not supported" in str(error) and "GPTNeoXForCausalLM" in str(error)
        assert "LlamaForCausalLM" in str(error)
    else:
        raise AssertionError("an unsupported model was accepted")
