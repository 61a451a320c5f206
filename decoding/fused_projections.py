"""One GEMM for each GPT-NeoX layer's QKV and MLP-in projections: the folded decode step.

Under the parallel residual (every Pythia) a layer's attention and MLP both read its input x,
through two LayerNorms that differ only in their scale and shift: ln_a(x) = n(x)·γa + βa and
ln_m(x) = n(x)·γm + βm, with n the normalisation without affine (the same eps). So

    W_qkv ln_a(x) + b_qkv = (W_qkv diag(γa)) n(x) + (b_qkv + W_qkv βa)

and likewise for the MLP's first matrix. Folded once at load time (in float32, then cast to the
model's dtype), the two matrices stack into one (hidden -> 3 hidden + intermediate): a decode
step normalises its input once and reads the layer's first matrices in one GEMV, not two
LayerNorms and two GEMVs. Exact up to float rounding (tests/test_fused_projections.py).

``fold_projections`` returns a view of the model (weights shared, as decoding/layer_skip.py's)
whose layers also hold the folded ``fused_in``; transformers' forward (the prefill) still runs
the original modules. ``compiled_step`` gives the decode step over such a view, called like
decoding/neox_decode.py's ``decode_step``: on CUDA the two-stream graph of
decoding/neox_cuda_graphs.py, with each layer's MLP (after the shared GEMV) beside its attention.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from decoding.neox_cuda_graphs import TwoStreamStep
from decoding.neox_decode import StepState, attention_output, final_logits, next_token, sum_in_order
from patches.gpt_neox import qkv_heads


def fold_projections(model) -> nn.Module:
    """A view of the GPT-NeoX ``model`` sharing its weights, each layer with ``fused_in``: the
    LayerNorm-folded QKV and MLP-in projections as one Linear (rows: QKV, then MLP-in)."""
    if model.config.model_type != "gpt_neox":
        raise ValueError(f"folding the projections is written for GPT-NeoX, not {model.config.model_type}")
    if not model.config.use_parallel_residual:
        raise ValueError("folding the QKV and MLP-in projections needs GPT-NeoX's parallel residual "
                         "(use_parallel_residual=True): without it the MLP reads the attention's output")
    base = model.gpt_neox
    view_base = copy.copy(base)
    view_base._modules = dict(base._modules)  # a new module table: the model keeps its own layers
    view_base.layers = nn.ModuleList([_folded_layer(layer) for layer in base.layers])
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view.gpt_neox = view_base
    return view


@torch.no_grad()
def _folded_layer(layer) -> nn.Module:
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if norms[0].eps != norms[1].eps or norms[0].normalized_shape != norms[1].normalized_shape:
        raise ValueError("the two LayerNorms of a layer differ in more than their scale and shift: "
                         "they cannot share one normalisation")
    weights, biases = [], []
    for norm, linear in zip(norms, (layer.attention.query_key_value, layer.mlp.dense_h_to_4h)):
        if type(linear.weight.data) is not torch.Tensor:
            raise ValueError("fold the projections before quantizing the weights (decoding/weight_quant.py)")
        weight = linear.weight.float()
        bias = torch.zeros(weight.shape[0], device=weight.device) if linear.bias is None else linear.bias.float()
        weights.append(weight * norm.weight.float())  # W diag(γ): column j scaled by γ_j
        biases.append(bias + weight @ norm.bias.float())
    dtype = layer.attention.query_key_value.weight.dtype
    fused = nn.Linear(weights[0].shape[1], sum(w.shape[0] for w in weights), device=weights[0].device, dtype=dtype)
    fused.weight.copy_(torch.cat(weights))
    fused.bias.copy_(torch.cat(biases))
    fused.requires_grad_(False)
    view = copy.copy(layer)
    view._modules = dict(layer._modules)  # the original layer keeps its module table
    view.fused_in = fused
    return view


def projections(layer, parts):
    """The layer's input (the sum of ``parts``, see neox_decode.attention_branch), normalised once
    and through ``fused_in``: (the input, the QKV projection, the MLP's first projection)."""
    hidden = sum_in_order(parts)
    norm = layer.input_layernorm
    projected = layer.fused_in(F.layer_norm(hidden, norm.normalized_shape, eps=norm.eps))
    qkv, mlp_in = projected.split([layer.attention.query_key_value.out_features,
                                   layer.mlp.dense_h_to_4h.out_features], dim=-1)
    return hidden, qkv, mlp_in


def attention_from_qkv(layer, qkv, cos, sin, layer_kv, new_index, backend: str):
    """The layer's attention output from its QKV projection (neox_decode.attention_output)."""
    query, key, value = qkv_heads(layer.attention, qkv)
    return attention_output(layer.attention, query, key, value, cos, sin, layer_kv, new_index, backend)


def mlp_from_input(layer, mlp_in):
    """The layer's MLP output from its first projection."""
    return layer.mlp.dense_4h_to_h(layer.mlp.act(mlp_in))


def layer_outputs(model, state: StepState, projections_fn=projections, attention_fn=attention_from_qkv,
                  mlp_fn=mlp_from_input):
    """neox_decode.layer_outputs on a folded view: the same residual terms, in the same order."""
    neox = model.gpt_neox
    if not hasattr(neox.layers[0], "fused_in"):
        raise ValueError("the folded step runs on fold_projections(model), not on the model itself")
    parts = (neox.embed_in(state.token),)
    cos, sin = neox.rotary_emb(parts[0], position_ids=state.position)
    for layer in neox.layers:
        layer_kv = state.buffer.layer(layer.attention.layer_idx)
        hidden, qkv, mlp_in = projections_fn(layer, parts)
        mlp_out = mlp_fn(layer, mlp_in)
        attended = attention_fn(layer, qkv, cos, sin, layer_kv, state.new_index, state.backend)
        parts = (mlp_out, attended, hidden)
    return parts


def forward_logits(model, state: StepState):
    """The new tokens' logits (batch, new, vocab) on a folded view."""
    return final_logits(model, layer_outputs(model, state))


def decode_step(model, state: StepState):
    """neox_decode.decode_step on a folded view."""
    return next_token(forward_logits(model, state), state.temperature, state.top_k, state.noise)


class FoldedTwoStreamStep(TwoStreamStep):
    """TwoStreamStep on a folded view: per layer the shared GEMV on the main stream, then the
    MLP's second matrix on the side stream beside the attention. The graph, its capture and the
    kept buffer are TwoStreamStep's."""

    def __init__(self, keep_buffer: bool = True):
        super().__init__(keep_buffer)
        self.projections_fn = torch.compile(projections, fullgraph=True)
        self.attention_fn = torch.compile(attention_from_qkv, fullgraph=True)
        self.mlp_fn = torch.compile(mlp_from_input, fullgraph=True)

    def _projections_after_mlp(self, layer, parts):
        torch.cuda.current_stream().wait_stream(self.side_stream)  # the previous layer's MLP output
        return self.projections_fn(layer, parts)

    def _mlp_after_projections(self, layer, mlp_in):
        self.side_stream.wait_stream(torch.cuda.current_stream())  # this layer's projections
        with torch.cuda.stream(self.side_stream):
            return self.mlp_fn(layer, mlp_in)

    def _step(self, model, state: StepState):
        # The side stream joins the main stream's work first: the first layer's projections wait on
        # it, and under capture a wait on a stream whose last work was not captured (the warm-up's)
        # invalidates the graph ("dependency created on uncaptured work in another stream").
        self.side_stream.wait_stream(torch.cuda.current_stream())
        parts = layer_outputs(model, state, self._projections_after_mlp, self.attention_fn,
                              self._mlp_after_projections)
        torch.cuda.current_stream().wait_stream(self.side_stream)  # the last layer's MLP output
        return next_token(self.logits_fn(model, parts), state.temperature, state.top_k, state.noise)


def compiled_step(compile: bool, keep_buffer: bool = True):
    """The folded step as a two-stream CUDA graph (``FoldedTwoStreamStep``), or as is."""
    return FoldedTwoStreamStep(keep_buffer) if compile else decode_step
