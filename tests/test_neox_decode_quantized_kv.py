"""The plain GPT-NeoX decode step over a quantized KV buffer (decoding/neox_decode.py's ``kv_bits``, read by
decoding/quantized_kv_attention.py's kernel under Triton's interpreter) gives the tokens of the kvpress loop
whose every cached key and value is fake-quantized by the same per-(token, head) rule, in the bytes it counts."""

from functools import partial

import pytest
import torch

from decoding import neox_cuda_graphs, neox_decode, reference
from presses import make_press
from presses.quantize import fake_quantize, token_bytes
from tests.conftest import build, tiny_neox_config
from tests.test_neox_decode import prompts

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def model():
    # Weights 10x the default init's spread: attention sharp enough that 4-bit rounding changes tokens
    # (at the default it changes none, and the tests could not tell quantized from fp storage).
    return build(tiny_neox_config(initializer_range=0.2), attn_implementation="sdpa")


def fake_quantized_update(update, kv_bits, keys, values, cache_kwargs=None):
    key_bits, value_bits = kv_bits
    return update(fake_quantize(keys, key_bits), fake_quantize(values, value_bits), cache_kwargs)


@torch.no_grad()
def fake_quantized_kvpress_generate(model, prompt, press, new_tokens: int, kv_bits) -> torch.Tensor:
    """The reference: transformers' attention over a DynamicCache (the kvpress loop), the pressed prompt's
    keys and values fake-quantized once after the prefill (the press scored the fp ones, as in the
    quantized path) and each new token's as its layer takes them in."""
    key_bits, value_bits = kv_bits
    logits, cache = reference.prefill(model, prompt, press)
    for layer in cache.layers:
        layer.keys, layer.values = fake_quantize(layer.keys, key_bits), fake_quantize(layer.values, value_bits)
        layer.update = partial(fake_quantized_update, layer.update, kv_bits)
    token = logits[:, None].argmax(-1)
    steps = reference.greedy_steps(model, token, cache, new_tokens - 1, lambda step: prompt.shape[1] + step, None)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("kv_bits", [(8, 8), (4, 4), (8, 4)])
def test_same_greedy_tokens_as_the_fake_quantized_kvpress_loop(model, kv_bits):
    prompt = prompts(2, 100)
    expected = fake_quantized_kvpress_generate(model, prompt, None, NEW_TOKENS, kv_bits)
    tokens = neox_decode.generate(model, list(prompt.split(1)), None, NEW_TOKENS, kv_bits=kv_bits).tokens
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("kv_bits", [(4, 4), (8, 4)])
def test_the_reference_tells_4_bit_storage_from_full_precision(model, kv_bits):
    # Else the test above could not tell a quantized buffer from one that stores the fp values.
    prompt = prompts(2, 100)
    full = reference.kvpress_generate(model, prompt, None, NEW_TOKENS).tokens
    assert not torch.equal(fake_quantized_kvpress_generate(model, prompt, None, NEW_TOKENS, kv_bits), full)


def test_with_a_press_and_prompts_of_different_lengths_each_decodes_as_its_reference(model):
    # SnapKV keeps each prompt's share: the shorter one has padding slots in front, masked out
    press, kv_bits = make_press("snapkv", 0.5), (4, 8)
    short, long = prompts(1, 70, seed=4), prompts(1, 100, seed=5)
    alone = [fake_quantized_kvpress_generate(model, prompt, press, NEW_TOKENS, kv_bits) for prompt in (short, long)]
    together = neox_decode.generate(model, [short, long], press, NEW_TOKENS, kv_bits=kv_bits)
    assert torch.equal(together.tokens, torch.cat(alone))
    assert together.kept_tokens_per_layer == [50, 50]


@pytest.mark.parametrize("kv_bits, fp16_over_quantized", [((8, 8), 64 / 40), ((4, 4), 64 / 24), ((8, 4), 64 / 32)])
def test_the_buffer_holds_codes_and_sides_only(model, kv_bits, fp16_over_quantized):
    """Per (token, head) at head dim 16: 16 x bits / 8 bytes of codes and a 4-byte fp16 scale and zero
    point each for keys and values, against 64 bytes of fp16 keys and values."""
    batch, heads, dim, layers = 2, 4, 16, 2
    slots = 100 + NEW_TOKENS
    prefilled = neox_decode.prefill(model, list(prompts(batch, 100).split(1)))[1]
    buffer = neox_decode.load_buffer(prefilled, NEW_TOKENS, kv_bits=kv_bits)
    assert all(keys.codes.dtype == torch.uint8 and keys.codes.shape == (batch, heads, slots, dim * kv_bits[0] // 8)
               for keys in buffer.keys)
    groups = layers * batch * heads * slots
    assert buffer.nbytes() == groups * (token_bytes(kv_bits[0], dim) + token_bytes(kv_bits[1], dim))
    assert buffer.nbytes() == groups * (2 * dim * (kv_bits[0] + kv_bits[1]) // 16 + 8)
    full = neox_decode.load_buffer(neox_decode.prefill(model, list(prompts(batch, 100).split(1)))[1], NEW_TOKENS)
    fp16_bytes = full.nbytes() // 2  # the tiny model runs in fp32
    assert fp16_bytes / buffer.nbytes() == pytest.approx(fp16_over_quantized)


def test_a_refilled_quantized_buffer_equals_a_new_one_and_keeps_its_addresses(model):
    # The two-stream step's CUDA graph reads the buffer's addresses (as for the fp buffer: test_neox_decode.py).
    press, kv_bits = make_press("snapkv", 0.5), (8, 4)

    def parts(buffer):
        return [part for store in buffer.keys + buffer.values for part in (store.codes, store.scale, store.zero)]

    buffer = neox_decode.load_buffer(neox_decode.prefill(model, [prompts(1, 70, seed=4)], press)[1], 8,
                                     kv_bits=kv_bits)
    state = neox_decode.StepState(buffer, prompts(1, 1), torch.full((1, 1), 70), torch.tensor([0]))
    neox_decode.decode_step(model, state)  # a written slot the refill must clear
    addresses = [part.data_ptr() for part in parts(buffer)]
    second = [prompts(1, 70, seed=6)]
    refilled = neox_decode.load_buffer(neox_decode.prefill(model, second, press)[1], 8, into=buffer, kv_bits=kv_bits)
    fresh = neox_decode.load_buffer(neox_decode.prefill(model, second, press)[1], 8, kv_bits=kv_bits)
    assert refilled is buffer and [part.data_ptr() for part in parts(refilled)] == addresses
    assert all(torch.equal(a, b) for a, b in zip(parts(refilled), parts(fresh)))
    # other bits: a new buffer, not this one
    assert neox_decode.load_buffer(neox_decode.prefill(model, second, press)[1], 8, into=buffer,
                                   kv_bits=(8, 8)) is not buffer


def test_compiled_step_over_the_quantized_buffer_gives_the_same_tokens(model):
    # fullgraph: the quantization of each new key and value compiles into the step (no host syncs)
    prompt, kv_bits = list(prompts(2, 100).split(1)), (4, 4)
    expected = neox_decode.generate(model, prompt, None, 4, kv_bits=kv_bits).tokens
    step = neox_cuda_graphs.compiled_step(True, mode="default")  # CPU: inductor, no CUDA graphs
    assert torch.equal(neox_decode.generate(model, prompt, None, 4, step=step, kv_bits=kv_bits).tokens, expected)


@pytest.mark.parametrize("kv_bits, message", [((3, 8), "reads 8 or 4-bit codes"), ((8, 16), "reads 8 or 4-bit codes"),
                                              ((8,), "key bits, value bits")])
def test_bad_bits_are_refused_before_the_prefill(model, kv_bits, message):
    with pytest.raises(ValueError, match=message):
        neox_decode.generate(model, [prompts(1, 20)], make_press("snapkv", 0.5), 3, kv_bits=kv_bits)
