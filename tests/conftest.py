"""Shared fixtures: tiny seeded random models (GPT-NeoX with Pythia's partial rotary, and
Llama) and the GPT-NeoX tokenizer from the offline data folder."""

import os
from pathlib import Path

# No GPU here: Triton kernels (decoding/split_kv_attention.py) run in Triton's interpreter on CPU
# tensors. It is chosen when a kernel is defined, so this comes before anything imports them.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

import presses  # noqa: F401  -- applies the GPT-NeoX patches before any model is built
from evaluation.models import offline_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
VOCAB = 50304  # Pythia's padded vocabulary, so the real tokenizer's ids fit


def shared_data_dir() -> Path:
    return Path(os.environ.get("KVPRESS_NEOX_DATA", REPO_ROOT.parent / "shared" / "data"))


def tiny_neox_config(**overrides) -> GPTNeoXConfig:
    # head_dim 16 with rotary_pct 0.25: 4 rotary dims and 12 pass-through dims, as in Pythia.
    values = dict(
        vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
        intermediate_size=128, rotary_pct=0.25, max_position_embeddings=512, use_parallel_residual=True,
    )
    return GPTNeoXConfig(**(values | overrides))


def tiny_llama_config(**overrides) -> LlamaConfig:
    values = dict(
        vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=128, max_position_embeddings=512,
    )
    return LlamaConfig(**(values | overrides))


def build(config, seed: int = 0, attn_implementation: str = "eager"):
    torch.manual_seed(seed)
    config._attn_implementation = attn_implementation
    model_class = GPTNeoXForCausalLM if config.model_type == "gpt_neox" else LlamaForCausalLM
    return model_class(config).eval()


def record_cache_lengths(press) -> list[int]:
    """Wrap ``press``'s forward hook: after each layer's call, append that layer's cache length
    (what the press left) to the returned list."""
    lengths, original = [], press.forward_hook

    def record(module, args, kwargs, output):
        result = original(module, args, kwargs, output)
        lengths.append(kwargs["past_key_values"].layers[module.layer_idx].keys.shape[2])
        return result

    press.forward_hook = record
    return lengths


@pytest.fixture(scope="session")
def tokenizer():
    tok = offline_tokenizer(shared_data_dir())
    assert tok is not None, f"GPT-NeoX tokenizer not found under {shared_data_dir()} (set KVPRESS_NEOX_DATA)"
    return tok


@pytest.fixture(scope="session")
def tiny_pythia_folder(tmp_path_factory):
    """A local GPT-NeoX folder without tokenizer files, like a downloaded checkpoint: the
    tokenizer must come from the offline data folder. Read-only for the tests that share it."""
    folder = tmp_path_factory.mktemp("tiny-pythia")
    build(tiny_neox_config(max_position_embeddings=256)).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_neox():
    return build(tiny_neox_config())


@pytest.fixture
def tiny_llama():
    return build(tiny_llama_config())
