"""A model split across devices with ``device_map`` (accelerate's dispatch, which kvpress's
pipeline accepts) presses and scores exactly like the same model in one piece. On a CPU-only
machine the second device is the disk: layer 1 and the output projection are offloaded there and
accelerate's hooks bring their weights back for each call, the path a model split over GPUs takes."""

import pytest
import torch
from kvpress import SnapKVPress
from transformers import AutoModelForCausalLM, pipeline

from evaluation.protocols import context_nll

SPLIT = {"gpt_neox.embed_in": "cpu", "gpt_neox.emb_dropout": "cpu", "gpt_neox.rotary_emb": "cpu",
         "gpt_neox.layers.0": "cpu", "gpt_neox.layers.1": "disk", "gpt_neox.final_layer_norm": "cpu",
         "embed_out": "disk"}


@pytest.fixture(scope="module")
def whole_and_split(tiny_pythia_folder, tmp_path_factory):
    folder = tiny_pythia_folder
    whole = AutoModelForCausalLM.from_pretrained(folder).eval()
    split = AutoModelForCausalLM.from_pretrained(folder, device_map=SPLIT,
                                                 offload_folder=tmp_path_factory.mktemp("offload")).eval()
    return whole, split


def test_the_model_is_split(whole_and_split):
    _, split = whole_and_split
    assert split.hf_device_map == SPLIT
    offloaded = split.gpt_neox.layers[1].attention.query_key_value  # its weights wait on the disk between calls
    assert offloaded._hf_hook.offload and offloaded.weight.device.type == "meta"
    assert split.gpt_neox.layers[0].attention.query_key_value.weight.device.type == "cpu"


def test_a_pressed_context_scores_the_same_split(whole_and_split):
    ids = torch.randint(2, 1000, (2 * (96 + 32 + 1),), generator=torch.Generator().manual_seed(0))
    whole, split = (context_nll(model, ids, SnapKVPress(0.5, window_size=8), 96, 32, num_windows=2)
                    for model in whole_and_split)
    assert split.unit_nll == whole.unit_nll and torch.equal(split.token_nll, whole.token_nll)
    assert split.cache_tokens == whole.cache_tokens == 48  # the press did act: half of the 96 context tokens


def test_the_pipeline_generates_the_same_tokens_split(whole_and_split, tokenizer):
    context = "The quick brown fox jumps over the lazy dog. " * 12
    answers = [pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)(
        context, question=" What did the fox do?", press=SnapKVPress(0.5), max_new_tokens=8)["answer"]
        for model in whole_and_split]
    assert answers[0] == answers[1] and answers[0]
