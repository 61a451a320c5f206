"""Weight-only quantization of a model's Linear layers, training-free (no calibration data):
int8 or fp8 (e4m3) weights with one scale per output channel, or int4 weights with a scale and a
zero point per group of ``INT4_GROUP`` inputs; activations and the KV cache in the model's dtype.
Through one of two maintained libraries, which one chosen by measured speed
(evaluation/speed_frontier.py times both where both run):

- ``torchao`` (``Int8WeightOnlyConfig`` / ``Float8WeightOnlyConfig``): each weight becomes a
  tensor subclass whose ``F.linear`` is ``mm(x, weight.to(dtype)) * scale``. Compiled with
  inductor's coordinate-descent tuning (``compile_settings``), a batch-1 mm is decomposed into a
  multiply-and-sum reduction, so the conversion fuses into the kernel that reads the 1-byte weight
  (gpt-fast's int8 path); without it the fp16 copy of the weight is written and read again.
- ``torchao`` ``Int4WeightOnlyConfig`` in its ``tile_packed_to_4d`` layout (int4 only): the weight
  packed for PyTorch's tinygemm kernel (``_weight_int4pack_mm``, gpt-fast's int4 path), one opaque
  GEMV that reads the half bytes and unpacks them in registers, whatever inductor would make of it.
  The kernel is CUDA-only and bf16-only: the weights are cast to bf16 before they are quantized, and
  each call casts its input to bf16 and its output back (torchao's linear does), so an fp16 model
  keeps fp16 activations between the Linears. On a CPU the scheme is refused.
- ``quanto`` (optimum-quanto ``qint8`` / ``qfloat8``): QLinear modules; on CUDA an int8 weight
  times fp16 activations is its custom op, which rescales the whole weight and calls matmul.

``as_matmuls`` keeps fp16 weights but computes each Linear as ``matmul`` + bias: F.linear is an
addmm, which inductor leaves to cuBLAS, while an mm it decomposes under coordinate-descent tuning
as above, so the GEMVs become tuned Triton reductions (split where the tuning finds it pays).

``quantize_weights`` works in place on every ``nn.Linear`` the model reaches, the output head
included (the input embedding is gathered, not read, and stays). A view sharing modules with
the model (decoding/fused_projections.py's) quantizes the shared ones for both: fold first, then
quantize, and quantize a copy to keep the original.
"""

import contextlib

import torch
from torch import nn

SCHEMES = ("none", "int8", "fp8", "int4")
LIBRARIES = ("torchao", "quanto")
INT4_GROUP = 128  # inputs per int4 scale and zero point (torchao's default group)
INT4_GROUPS = (32, 64, 128, 256)  # the group sizes tinygemm's layout takes
# Bytes a decode step reads per weight and per output channel and group of inputs (int8 / fp8: one
# group, the fp32 scale torchao keeps; int4: tinygemm's bf16 scale and zero point per INT4_GROUP inputs).
WEIGHT_BYTES = {"int8": (1, 4), "fp8": (1, 4), "int4": (0.5, 4)}


def check(scheme: str, library: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown weight quantization {scheme!r}; choose from {', '.join(SCHEMES)}")
    if library not in LIBRARIES:
        raise ValueError(f"unknown weight quantization library {library!r}; choose from {', '.join(LIBRARIES)}")


def quantize_weights(model, scheme: str, library: str = "torchao", int4_group: int = INT4_GROUP):
    """``model`` with every Linear's weight quantized to ``scheme`` by ``library`` (in place);
    int4: one scale and zero point per ``int4_group`` inputs (the speed path keeps INT4_GROUP; a
    model whose Linears' inputs are not whole groups of it, the SmolLM2 stand-in's 576, needs a smaller one)."""
    check(scheme, library)
    if scheme == "none":
        return model
    if scheme == "int4":
        check_int4(model, library, int4_group)
    if library == "torchao":
        try:
            from torchao.quantization import (Float8WeightOnlyConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig,
                                              quantize_)
        except ImportError:
            raise ImportError("weight quantization with torchao needs it installed: pip install torchao==0.18.0") from None
        # set_inductor_config=False: torchao would switch inductor's tuning on for the whole
        # process; compile_settings scopes it to the quantized step's compilation instead.
        if scheme == "int4":
            for module in model.modules():  # tinygemm reads bf16 scales and takes bf16 inputs only
                if isinstance(module, nn.Linear):
                    module.weight.data = module.weight.data.to(torch.bfloat16)
            config = Int4WeightOnlyConfig(group_size=int4_group, int4_packing_format="tile_packed_to_4d",
                                          set_inductor_config=False)
        else:
            config = (Int8WeightOnlyConfig(set_inductor_config=False) if scheme == "int8"
                      else Float8WeightOnlyConfig(set_inductor_config=False))
        quantize_(model, config)
        return model
    from optimum.quanto import freeze, qfloat8, qint8, quantize
    quantize(model, weights=qint8 if scheme == "int8" else qfloat8)
    freeze(model)  # the quantized weights replace the float ones
    return model


def check_int4(model, library: str, group: int = INT4_GROUP) -> None:
    """Refuse int4 where torchao's tinygemm layout cannot hold every Linear, before any weight changes."""
    if library != "torchao":
        raise ValueError("int4 weights are torchao's (its tinygemm layout); quanto's int4 is not wired here")
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group size {group}: tinygemm's layout takes {', '.join(map(str, INT4_GROUPS))}")
    # torchao skips a Linear whose inputs do not fill whole groups, which would stay in bf16 unquantized
    ragged = [f"{name} ({module.in_features} inputs)" for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and module.in_features % group]
    if ragged:
        raise ValueError(f"int4 weights need every Linear's inputs in whole groups of {group}; not so for "
                         + ", ".join(ragged[:3]) + (" and more" if len(ragged) > 3 else ""))
    if next(model.parameters()).device.type != "cuda":
        raise ValueError("int4 weights need a CUDA GPU: torchao's tinygemm kernel has no CPU version here")


class MatmulLinear(nn.Linear):
    """nn.Linear computed as matmul + bias (see ``as_matmuls``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = torch.matmul(input, self.weight.t())
        return output if self.bias is None else output + self.bias


def as_matmuls(model):
    """``model`` with every (unquantized) nn.Linear computed as ``MatmulLinear`` (in place)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = MatmulLinear  # the same parameters, another forward
    return model


def compile_settings(scheme: str, inductor_gemv: bool = False):
    """Inductor's settings for compiling a step over weights of ``scheme``, as a context manager
    around the first (compiling) call: coordinate-descent tuning for quantized weights (see the
    module docstring), and for fp16 ones with ``inductor_gemv`` (Triton GEMVs with tuned,
    possibly split, reductions in place of cuBLAS's)."""
    if scheme == "none" and not inductor_gemv:
        return contextlib.nullcontext()
    return torch._inductor.config.patch(coordinate_descent_tuning=True)


def linear_weight_bytes(n_in: int, n_out: int, scheme: str, bytes_per_value: int) -> float:
    """Bytes of one (n_out, n_in) weight as a decode step reads it under ``scheme``."""
    if scheme == "none":
        return bytes_per_value * n_in * n_out
    per_weight, per_group = WEIGHT_BYTES[scheme]
    groups = -(-n_in // INT4_GROUP) if scheme == "int4" else 1
    return per_weight * n_in * n_out + per_group * groups * n_out
