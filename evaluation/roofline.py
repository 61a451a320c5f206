"""Roofline model of a decoder step (LLM-Viewer style): per operator FLOPs, bytes moved,
arithmetic intensity and whether it is compute- or memory-bound, for prefill or decode at any
batch and cache length, on a named GPU. The sum of per-operator floors is the step's floor:
no implementation runs much faster.

  python evaluation/roofline.py --model EleutherAI/pythia-2.8b --batch 1 --cache 2000 --gpu h100-measured

Bytes assume fused attention (FlashAttention / SDPA: scores never reach memory), weights and KV
in the given dtype read once per step, activations read and written once per operator.
"""

import argparse
import json
from dataclasses import dataclass

import pandas as pd
from transformers import AutoConfig

from evaluation.models import pythia_config_path

GPUS = {
    # name: (matmul FLOP/s, memory bytes/s, source)
    "h100-sxm": (989e12, 3.35e12, "NVIDIA H100 SXM datasheet: dense BF16/FP16 tensor, HBM3"),
    "h100-measured": (798e12, 3.0e12, "measured on this project's H100 (KINDS.md): 8192^3 bf16 matmul, D2D copy"),
}


@dataclass
class Operator:
    name: str
    flops: float
    bytes: float

    def time(self, peak_flops: float, bandwidth: float) -> float:
        return max(self.flops / peak_flops, self.bytes / bandwidth)


def operators(config, batch: int, new_tokens: int, cache: int, bytes_per_value: int = 2) -> list[Operator]:
    """One forward step of ``new_tokens`` per sequence (1 for decode, the prompt for prefill)
    after ``cache`` cached tokens, for ``batch`` sequences."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = hidden // heads
    kv_width = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    tokens = batch * new_tokens
    keys = cache + new_tokens  # keys each query may attend (causal prefill: the mean is half of this)
    mean_keys = cache + (new_tokens + 1) / 2
    b = bytes_per_value
    mlp_matrices = 2 if config.model_type == "gpt_neox" else 3

    def linear(name: str, n_in: int, n_out: int) -> Operator:
        return Operator(name, 2 * tokens * n_in * n_out, b * (n_in * n_out + tokens * (n_in + n_out)))

    per_layer = [
        Operator("layernorms", 8 * tokens * hidden, b * 4 * tokens * hidden),
        linear("qkv_proj", hidden, hidden + 2 * kv_width),
        Operator("rotary", 6 * tokens * (hidden + kv_width), b * 2 * tokens * (hidden + kv_width)),
        Operator("kv_write", 0, b * 2 * tokens * kv_width),
        Operator(
            "attention",
            4 * tokens * heads * head_dim * mean_keys,
            b * (2 * batch * keys * kv_width + 2 * tokens * hidden),
        ),
        linear("out_proj", hidden, hidden),
        linear("mlp_up", hidden, config.intermediate_size * (mlp_matrices - 1)),
        Operator("mlp_act", 8 * tokens * config.intermediate_size, b * 2 * tokens * config.intermediate_size),
        linear("mlp_down", config.intermediate_size, hidden),
        Operator("residual", 3 * tokens * hidden, b * 4 * tokens * hidden),
    ]
    ops = [Operator("embedding", 0, b * 2 * tokens * hidden)]
    ops += [Operator(op.name, op.flops * layers, op.bytes * layers) for op in per_layer]
    ops += [Operator("final_norm", 8 * tokens * hidden, b * 2 * tokens * hidden)]
    ops += [linear("lm_head", hidden, config.vocab_size)]
    return ops


def table(config, batch: int, new_tokens: int, cache: int, gpu: str) -> pd.DataFrame:
    peak, bandwidth, _ = GPUS[gpu]
    rows = []
    for op in operators(config, batch, new_tokens, cache):
        intensity = op.flops / op.bytes if op.bytes else float("inf")
        rows.append({"operator": op.name, "GFLOPs": op.flops / 1e9, "MB": op.bytes / 1e6, "FLOP/byte": intensity,
                     "bound": "compute" if op.flops / peak > op.bytes / bandwidth else "memory",
                     "floor_ms": 1e3 * op.time(peak, bandwidth)})
    return pd.DataFrame(rows)


def step_floor_ms(config, batch: int, new_tokens: int, cache: int, gpu: str = "h100-measured") -> float:
    """The step's floor: the sum of per-operator floors (TPOT floor for new_tokens=1)."""
    peak, bandwidth, _ = GPUS[gpu]
    return 1e3 * sum(op.time(peak, bandwidth) for op in operators(config, batch, new_tokens, cache))


def load_config(name: str):
    path = pythia_config_path(name)
    return AutoConfig.for_model(**json.loads(path.read_text())) if path else AutoConfig.from_pretrained(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="EleutherAI/pythia-2.8b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cache", type=int, default=2000, help="tokens already cached (after compression)")
    parser.add_argument("--new_tokens", type=int, default=1, help="1: decode step; the prompt length: prefill")
    parser.add_argument("--gpu", default="h100-measured", choices=sorted(GPUS))
    args = parser.parse_args()
    config = load_config(args.model)
    print(f"{args.model}, batch {args.batch}, cache {args.cache}, {args.new_tokens} new token(s), {args.gpu} "
          f"({GPUS[args.gpu][2]})")
    print(table(config, args.batch, args.new_tokens, args.cache, args.gpu).to_string(index=False,
                                                                                    float_format=lambda x: f"{x:.4g}"))
    print(f"floor: {step_floor_ms(config, args.batch, args.new_tokens, args.cache, args.gpu):.3f} ms per step")


if __name__ == "__main__":
    main()
