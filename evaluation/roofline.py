"""Roofline model of a decoder step (LLM-Viewer style): per operator FLOPs, bytes moved,
arithmetic intensity and whether it is compute- or memory-bound, for prefill or decode at any
batch and cache length (one for every layer, or each layer's own), on the ceilings of a GPU. The
sum of per-operator floors is the step's floor: no implementation runs much faster. The command
line that prints it for a model is evaluation/step_floor.py; evaluation/speed.py puts the floors
in every speed row.

The ceilings are measured on the machine that runs (evaluation/ceilings.py: a device-to-device
copy, a weight-sized GEMV and a matrix product) or given; datasheet figures are leads. Bytes
assume fused attention (FlashAttention / SDPA: scores never reach memory), weights and KV in the
given dtype read once per step (or, weight-only quantized, at the bytes of
decoding/weight_quant.py: 1 byte a weight plus its channel's scale, int4 half a byte plus a scale and
zero point per 128 inputs), activations read and written
once per operator. With ``kv_bits`` the KV at the bytes decoding/neox_decode.py's quantized buffer
holds: codes and an fp16 scale and zero point per (token, head).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from decoding.weight_quant import linear_weight_bytes
from presses.quantize import token_bytes
from evaluation import ceilings as ceilings_module
from evaluation.ceilings import Ceilings
from evaluation.models import model_config


@dataclass
class Operator:
    name: str
    flops: float
    bytes: float

    def time(self, peak_flops: float, bandwidth: float) -> float:
        return max(self.flops / peak_flops, self.bytes / bandwidth)


def per_layer_cache(config, cache) -> list:
    """``cache`` as one length per layer: a number is every layer's, a sequence is each layer's own."""
    layers = config.num_hidden_layers
    if isinstance(cache, Sequence):
        if len(cache) != layers:
            raise ValueError(f"{len(cache)} cache lengths for {layers} layers")
        return list(cache)
    return [cache] * layers


def kv_token_bytes(kv_heads: int, head_dim: int, bytes_per_value: int, kv_bits: tuple[int, int] | None) -> float:
    """Bytes of one token's keys and values in one layer: at ``bytes_per_value``, or quantized at ``kv_bits``."""
    if kv_bits is None:
        return bytes_per_value * 2 * kv_heads * head_dim
    return kv_heads * (token_bytes(kv_bits[0], head_dim) + token_bytes(kv_bits[1], head_dim))


def operators(config, batch: int, new_tokens: int, cache: float | Sequence[float],
              bytes_per_value: int = 2, weight_quant: str = "none",
              kv_bits: tuple[int, int] | None = None) -> list[Operator]:
    """One forward step of ``new_tokens`` per sequence (1 for decode, the prompt for prefill)
    after ``cache`` cached tokens, for ``batch`` sequences. ``cache``: one length for every layer,
    or a sequence of each layer's own (ragged caches: PyramidKV keeps more in the lower layers);
    the attention and KV-write operators are summed over the layers' own lengths. ``weight_quant``:
    the weights' scheme (decoding/weight_quant.py), activations and KV staying at ``bytes_per_value``;
    ``kv_bits``: the KV quantized (see the module docstring)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    kv_width = kv_heads * head_dim
    kv_token = kv_token_bytes(kv_heads, head_dim, bytes_per_value, kv_bits)
    tokens = batch * new_tokens
    b = bytes_per_value
    mlp_matrices = 2 if config.model_type == "gpt_neox" else 3

    def linear(name: str, n_in: int, n_out: int) -> Operator:
        weight = linear_weight_bytes(n_in, n_out, weight_quant, b)
        return Operator(name, 2 * tokens * n_in * n_out, weight + b * tokens * (n_in + n_out))

    def attention(layer_cache: float) -> Operator:
        keys = layer_cache + new_tokens  # keys each query may attend (causal prefill: the mean is half of this)
        mean_keys = layer_cache + (new_tokens + 1) / 2
        return Operator("attention", 4 * tokens * heads * head_dim * mean_keys,
                        kv_token * batch * keys + b * 2 * tokens * hidden)

    per_layer = [
        Operator("layernorms", 8 * tokens * hidden, b * 4 * tokens * hidden),
        linear("qkv_proj", hidden, hidden + 2 * kv_width),
        Operator("rotary", 6 * tokens * (hidden + kv_width), b * 2 * tokens * (hidden + kv_width)),
        Operator("kv_write", 0, kv_token * tokens),
        None,  # attention: summed over the layers' own cache lengths below
        linear("out_proj", hidden, hidden),
        linear("mlp_up", hidden, config.intermediate_size * (mlp_matrices - 1)),
        Operator("mlp_act", 8 * tokens * config.intermediate_size, b * 2 * tokens * config.intermediate_size),
        linear("mlp_down", config.intermediate_size, hidden),
        Operator("residual", 3 * tokens * hidden, b * 4 * tokens * hidden),
    ]
    attentions = [attention(length) for length in per_layer_cache(config, cache)]
    summed_attention = Operator("attention", sum(op.flops for op in attentions), sum(op.bytes for op in attentions))
    ops = [Operator("embedding", 0, b * 2 * tokens * hidden)]
    ops += [summed_attention if op is None else Operator(op.name, op.flops * layers, op.bytes * layers)
            for op in per_layer]
    ops += [Operator("final_norm", 8 * tokens * hidden, b * 2 * tokens * hidden)]
    ops += [linear("lm_head", hidden, config.vocab_size)]
    return ops


def table(config, batch: int, new_tokens: int, cache, ceilings: Ceilings, weight_quant: str = "none",
          kv_bits: tuple[int, int] | None = None) -> pd.DataFrame:
    peak, bandwidth = ceilings.peak_flops, ceilings.bandwidth
    rows = []
    for op in operators(config, batch, new_tokens, cache, weight_quant=weight_quant, kv_bits=kv_bits):
        intensity = op.flops / op.bytes if op.bytes else float("inf")
        rows.append({"operator": op.name, "GFLOPs": op.flops / 1e9, "MB": op.bytes / 1e6, "FLOP/byte": intensity,
                     "bound": "compute" if op.flops / peak > op.bytes / bandwidth else "memory",
                     "floor_ms": 1e3 * op.time(peak, bandwidth)})
    return pd.DataFrame(rows)


def step_bytes(config, batch: int, new_tokens: int, cache, weight_quant: str = "none",
               kv_bits: tuple[int, int] | None = None) -> float:
    """Bytes one step moves (weights, KV at each layer's length, activations)."""
    return sum(op.bytes for op in operators(config, batch, new_tokens, cache, weight_quant=weight_quant,
                                            kv_bits=kv_bits))


def step_floor_ms(config, batch: int, new_tokens: int, cache, ceilings: Ceilings,
                  bandwidth: float | None = None, weight_quant: str = "none",
                  kv_bits: tuple[int, int] | None = None) -> float:
    """The step's floor: the sum of per-operator floors (TPOT floor for new_tokens=1), each the
    larger of FLOPs / ``ceilings.peak_flops`` and bytes / ``bandwidth`` (default
    ``ceilings.bandwidth``; pass ``ceilings.gemv_bandwidth`` for the GEMV floor)."""
    bandwidth = bandwidth or ceilings.bandwidth
    return 1e3 * sum(op.time(ceilings.peak_flops, bandwidth)
                     for op in operators(config, batch, new_tokens, cache, weight_quant=weight_quant, kv_bits=kv_bits))


def decode_floors(config, batch: int, kept_per_layer: Sequence[int], new_tokens: int, ceilings: Ceilings,
                  weight_quant: str = "none", kv_bits: tuple[int, int] | None = None) -> dict:
    """The TPOT floors of a generation of ``new_tokens`` after a cache of ``kept_per_layer``
    tokens in each layer: one decode step at every layer's mean cache length over the generation
    (kept + new_tokens / 2), from the measured copy bandwidth (``tpot_floor_ms``, the one ratios
    use), from the measured GEMV bandwidth, and from the datasheet when the GPU has one; the
    weights at the bytes of ``weight_quant``, the KV at ``kv_bits``."""
    cache = [kept + new_tokens / 2 for kept in kept_per_layer]
    floors = {"step_gb": step_bytes(config, batch, 1, cache, weight_quant, kv_bits) / 1e9,
              "tpot_floor_ms": step_floor_ms(config, batch, 1, cache, ceilings, weight_quant=weight_quant,
                                             kv_bits=kv_bits),
              "tpot_floor_gemv_ms": (step_floor_ms(config, batch, 1, cache, ceilings, ceilings.gemv_bandwidth,
                                                   weight_quant, kv_bits) if ceilings.gemv_bandwidth else None),
              "tpot_floor_datasheet_ms": None}
    if ceilings.datasheet:
        floors["tpot_floor_datasheet_ms"] = step_floor_ms(config, batch, 1, cache,
                                                          ceilings_module.named(ceilings.datasheet),
                                                          weight_quant=weight_quant, kv_bits=kv_bits)
    return floors


def load_config(name: str):
    """The exact Pythia config from configs/models/, else ``name``'s config.json (hub id or local
    folder); a model with neither is a one-line ModelLoadError naming the offline configs."""
    return model_config(name, random_init=True)
