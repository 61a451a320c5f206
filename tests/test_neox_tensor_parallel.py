"""Tensor-parallel decoding (decoding/neox_tensor_parallel.py) on two CPU processes (gloo) gives the
tokens of one process, dense and with presses, each rank holding half the heads' KV; its benchmark
(evaluation/tensor_parallel.py, run on two GPUs by evaluation/device/tensor_parallel_speed.sh) runs
through on the CPU."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

from decoding import neox_decode, neox_tensor_parallel
from evaluation import tensor_parallel
from presses import make_press
from tests.conftest import build, tiny_neox_config

WORLD_SIZE = 2
NEW_TOKENS = 12
# SnapKV scores each head on its own; TOVA's score is the mean over all heads (reduced over the ranks).
CASES = [(None, 0.0), ("snapkv", 0.5), ("tova", 0.5)]


def prompts() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(2, 1000, (1, length), generator=generator) for length in (100, 80)]


def _rank(rank: int, model, store: str, folder: str) -> None:
    torch.set_num_threads(1)  # forked: no OpenMP pool of the parent's; one core each
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        group = dist.group.WORLD
        neox_tensor_parallel.shard(model, group)
        results = {}
        for name, ratio in CASES:
            press = make_press(name, ratio) if name else None
            generation = neox_tensor_parallel.generate(model, prompts(), press, NEW_TOKENS, group)
            results[name] = generation.tokens
        results["kv_heads"] = model.gpt_neox.layers[0].attention.query_key_value.weight.shape[0] // (
            3 * model.gpt_neox.layers[0].attention.head_size)
        torch.save(results, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def model():
    return build(tiny_neox_config(), attn_implementation="sdpa")


def test_two_ranks_decode_the_tokens_of_one_process(model, tmp_path):
    expected = {name: neox_decode.generate(model, prompts(), make_press(name, ratio) if name else None,
                                           NEW_TOKENS).tokens for name, ratio in CASES}
    # Forked: each rank shards its own copy of the model built here.
    torch.multiprocessing.start_processes(_rank, (model, str(tmp_path / "store"), str(tmp_path)),
                                          nprocs=WORLD_SIZE, start_method="fork")
    for rank in range(WORLD_SIZE):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert results["kv_heads"] == model.config.num_attention_heads // WORLD_SIZE
        for name, _ in CASES:
            assert torch.equal(results[name], expected[name]), (rank, name)


def _cli_rank(rank: int, port: int, argv: list[str]) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # as torchrun sets them
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    tensor_parallel.main(argv)


def test_the_benchmark_compares_two_ranks_with_one(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = tmp_path / "tp.json"
    argv = ["--model", "EleutherAI/pythia-70m", "--random-init", "--device", "cpu", "--press", "tova",
            "--prompt_tokens", "80", "--new_tokens", "4", "--repeats", "1", "--output", str(output)]
    torch.multiprocessing.start_processes(_cli_rank, (port, argv), nprocs=WORLD_SIZE, start_method="fork")
    rows = json.loads(output.read_text())["rows"]
    assert [(row["method"], row["batch_size"]) for row in rows] == [("dense", 1), ("tova", 1)]
    for row in rows:
        assert row["tp2"]["ranks_agree"] and row["tp2_vs_tp1"]["identical"] and row["tp2_vs_reference"]["identical"]
        assert row["tp2"]["tokens_sha256"] == row["tp1"]["tokens_sha256"] == row["reference_tokens"]["tokens_sha256"]
        assert row["tp2"]["kv_mib_final"] == row["tp1"]["kv_mib_final"] / WORLD_SIZE  # each rank: its heads' KV


def test_a_model_that_does_not_split_evenly_is_refused():
    with pytest.raises(ValueError, match="3 attention heads do not split evenly over 2 ranks"):
        neox_tensor_parallel.check_shardable(tiny_neox_config(num_attention_heads=3, hidden_size=48), 2)
