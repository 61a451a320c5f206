"""The fast GPT-NeoX decode step (decoding/neox_decode.py) under tensor parallelism: each rank holds
its share of the attention heads (their weights and their KV cache) and of the MLP's width.

  torchrun --nproc_per_node 2 evaluation/tensor_parallel.py --model EleutherAI/pythia-12b --random-init

How a model is split: by transformers' plan for GPT-NeoX (``model.tp_plan``, from
``GPTNeoXConfig.base_model_tp_plan``, and the causal LM's own entry, which transformers 5.2's
``tp_plan`` leaves out): ``query_key_value`` and ``dense_h_to_4h`` column-wise (each rank computes
its share of the outputs), ``dense`` and ``dense_4h_to_h`` row-wise (each rank multiplies its share
of the inputs; the ranks' partial sums add up to the output), ``embed_out`` column-wise with its
output gathered (every rank gets the whole logits and picks the same token); the rest is
replicated. The fused ``query_key_value`` weight is laid out per head ([head][q, k, v][head_dim]:
``patches/gpt_neox.py``'s ``split_qkv`` views its output as (..., heads, 3, head_dim)), so a
column-wise shard of it is whole heads, and the row-wise ``dense`` takes exactly those heads' outputs.

Why this file splits the weights and places the collectives itself, instead of loading through
transformers' ``from_pretrained(tp_plan=...)`` or PyTorch's DTensor ``parallelize_module``: both
reduce after every row-wise module, twice per layer. With GPT-NeoX's parallel residual the
attention and MLP outputs are summed anyway, so here each rank adds its two partial sums and the
step reduces once per layer: half the collectives, each of which waits for every rank on the
step's critical path. One reduction on the main stream also keeps every rank's collectives in one
order, which NCCL needs and which the two-stream step (the MLP on a second stream) would not give
with one reduction per branch. And the step wants plain local tensors to compile and capture:
transformers' row-wise hook reduces in place inside an autograd Function and moves the bias off the
module on its first call; DTensor sends every operation through its sharding rules.

The prefill runs through transformers' modules, where the press works: ``ShardedPress`` wraps the
press so that, while it is active, each row-wise output is reduced over the ranks, each attention
module's config says how many heads the rank holds (presses read ``num_attention_heads``), and a
press whose score is the mean over all heads of a layer (TOVA) averages its score over the ranks.
Each rank then keeps, per head it holds, what one process would keep.

``generate`` is ``neox_decode.generate`` on a model ``shard`` has split, with the step of
``tensor_parallel_step``: uncompiled, or on CUDA the two-stream CUDA graph of
decoding/neox_cuda_graphs.py with this file's layer loop (the all-reduce is captured in the graph).
Every rank runs the same calls in the same order; to sample, give each rank a generator seeded alike.
"""

import contextlib
import fnmatch
import functools
from dataclasses import dataclass

import kvpress
import torch
import torch.distributed as dist
from torch import nn

from decoding import neox_cuda_graphs, neox_decode
from decoding.neox_decode import StepState, attention_branch, final_logits, mlp_branch, next_token

# transformers' plan for GPTNeoXForCausalLM, the one this step is written for: its single
# reduction per layer sits after the two row-wise modules; the logits are gathered from the ranks'
# shares of the vocabulary.
PLAN = {"gpt_neox.layers.*.attention.query_key_value": "colwise", "gpt_neox.layers.*.attention.dense": "rowwise",
        "gpt_neox.layers.*.mlp.dense_h_to_4h": "colwise", "gpt_neox.layers.*.mlp.dense_4h_to_h": "rowwise",
        "embed_out": "colwise_gather_output"}
# Presses whose score of a key is its mean over every head of the layer: averaged over the ranks.
HEAD_MEAN_SCORES = (kvpress.TOVAPress,)
# Presses that choose across the heads of a layer in other ways (a budget shared by all heads,
# patterns indexed by the model's head numbers): a rank holding some heads cannot do their part.
ACROSS_HEADS = (kvpress.AdaKVPress, kvpress.CriticalAdaKVPress, kvpress.DuoAttentionPress)


def check_shardable(config, world_size: int) -> None:
    """Raise ValueError unless ``config`` is a GPT-NeoX that splits evenly over ``world_size`` ranks."""
    if config.model_type != "gpt_neox":
        raise ValueError(f"tensor-parallel decoding is written for GPT-NeoX, not {config.model_type}")
    if not config.use_parallel_residual:
        raise ValueError("tensor-parallel decoding reduces once per layer: it needs GPT-NeoX's parallel residual")
    for what, size in (("attention heads", config.num_attention_heads), ("MLP width", config.intermediate_size),
                       ("vocabulary entries", config.vocab_size)):
        if size % world_size:
            raise ValueError(f"{size} {what} do not split evenly over {world_size} ranks")


def planned_modules(model) -> list[tuple[nn.Module, str]]:
    """(module, style) for every module transformers' plan of ``model`` splits; ValueError if the
    plan is not the one this step is written for (``PLAN``)."""
    # transformers 5.2's model.tp_plan leaves out the causal LM's own entry, which its class declares.
    plan = (getattr(type(model), "_tp_plan", None) or {}) | model.tp_plan
    if plan != PLAN:
        raise ValueError(f"tensor-parallel decoding is written for the plan {PLAN}; the model's is {plan}")
    return [(module, style) for name, module in model.named_modules() for pattern, style in PLAN.items()
            if fnmatch.fnmatchcase(name, pattern)]


class RankAttentionConfig:
    """The model's config as one rank's attention module reads it: with the heads the rank holds.
    Everything else is read from the model's config when asked, so that a change of attention
    implementation (``neox_decode.attention_implementation``) reaches the module."""

    def __init__(self, config, heads: int):
        self.model_config = config
        self.num_attention_heads = self.num_key_value_heads = heads
        self.head_dim = config.hidden_size // config.num_attention_heads

    def __getattr__(self, name):  # only for what __init__ did not set
        if name == "model_config":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.model_config, name)


def _share(tensor: torch.Tensor, dim: int, rank: int, world_size: int) -> torch.Tensor:
    # A copy, so that the whole tensor is freed once the module drops it.
    return tensor.tensor_split(world_size, dim)[rank].clone(memory_format=torch.contiguous_format)


@torch.no_grad()
def shard(model, group) -> None:
    """Split ``model`` in place over the ranks of ``group`` by its plan (``planned_modules``):
    column-wise modules keep the rank's output rows and biases, row-wise modules its input columns;
    a row-wise bias stays on rank 0 only (zero on the others), so that the reduction adds it once.
    The head's outputs are gathered from every rank by a hook of its own, in prefill and decode
    alike; the row-wise outputs are reduced by ``ShardedPress`` (prefill) or the step (decode)."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    check_shardable(model.config, world_size)
    for module, style in planned_modules(model):
        dim = 1 if style == "rowwise" else 0
        module.weight = nn.Parameter(_share(module.weight, dim, rank, world_size), requires_grad=False)
        if module.bias is not None and style != "rowwise":
            module.bias = nn.Parameter(_share(module.bias, 0, rank, world_size), requires_grad=False)
        elif module.bias is not None and rank != 0:
            module.bias.zero_()
        module.in_features, module.out_features = module.weight.shape[1], module.weight.shape[0]
        if style == "colwise_gather_output":
            module.register_forward_hook(lambda module, args, output: _gathered(output, group))
    for layer in model.gpt_neox.layers:
        layer.attention.config = RankAttentionConfig(model.config, model.config.num_attention_heads // world_size)


def _gathered(tensor: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``tensor`` side by side along the last dim (a column-wise module's whole output)."""
    world_size = dist.get_world_size(group)
    every = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(every, tensor.contiguous(), group=group)
    return torch.cat(every.chunk(world_size), dim=-1)


def _presses_in(press):
    """``press`` and the presses it wraps (kvpress's wrappers hold ``press``, ComposedPress ``presses``)."""
    yield press
    for inner in [getattr(press, "press", None)] + list(getattr(press, "presses", [])):
        if inner is not None:
            yield from _presses_in(inner)


def _mean_over_ranks(score, group):
    world_size = dist.get_world_size(group)

    @functools.wraps(score)
    def averaged(*args, **kwargs):
        scores = score(*args, **kwargs).contiguous()  # the collective needs it
        dist.all_reduce(scores, group=group)
        return scores / world_size
    return averaged


@dataclass
class ShardedPress:
    """``press`` (None: dense) as the prefill of a model ``shard`` split over ``group`` runs it; pass
    it where ``neox_decode.generate`` takes a press (see the module docstring)."""

    press: object
    group: object

    def __post_init__(self):
        for inner in _presses_in(self.press) if self.press is not None else ():
            if isinstance(inner, ACROSS_HEADS):
                raise ValueError(f"{type(inner).__name__} chooses across all heads of a layer: it cannot run "
                                 "tensor-parallel, where each rank holds some of them")

    @contextlib.contextmanager
    def __call__(self, model):
        with contextlib.ExitStack() as stack:
            for module in [module for module, style in planned_modules(model) if style == "rowwise"]:
                # The output is a new tensor of the module's own: reduced in place.
                handle = module.register_forward_hook(lambda module, args, output: _all_reduced(output, self.group))
                stack.callback(handle.remove)
            for inner in _presses_in(self.press) if self.press is not None else ():
                if isinstance(inner, HEAD_MEAN_SCORES):
                    inner.score = _mean_over_ranks(inner.score, self.group)  # the instance's, until the end
                    stack.callback(delattr, inner, "score")
            if self.press is not None:
                stack.enter_context(self.press(model))
            yield


def _all_reduced(tensor: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(tensor, group=group)
    return tensor


def layer_outputs(model, state: StepState, group, attention_fn=attention_branch, mlp_fn=mlp_branch, join=None):
    """``neox_decode.layer_outputs`` on a sharded model: each layer's attention and MLP give this
    rank's partial sums, added and then summed over the ranks once; ``join``: called before that
    sum, once both branches are done (the two-stream step waits for its MLP stream there)."""
    neox = model.gpt_neox
    parts = (neox.embed_in(state.token),)
    cos, sin = neox.rotary_emb(parts[0], position_ids=state.position)
    for layer in neox.layers:
        mlp_out = mlp_fn(layer, parts)
        hidden, attended = attention_fn(layer, parts, cos, sin, state.buffer.layer(layer.attention.layer_idx),
                                        state.new_index, state.backend)
        if join is not None:
            join()
        # The same order of sums as neox_decode's (MLP + attention, then the residual), the first
        # over the ranks: the next layer's branches add the residual inside their layer norm's kernel.
        parts = (_all_reduced(mlp_out + attended, group), hidden)
    return parts


def decode_step(model, state: StepState, group):
    """``neox_decode.decode_step`` on a sharded model (every rank gets the same tokens)."""
    logits = final_logits(model, layer_outputs(model, state, group))
    return next_token(logits, state.temperature, state.top_k, state.noise)


class TwoStreamStep(neox_cuda_graphs.TwoStreamStep):
    """decoding/neox_cuda_graphs.py's two-stream graph of this file's step: each layer's MLP on the
    side stream beside its attention, then on the main stream the one all-reduce, captured in the
    graph (NCCL runs inside CUDA graphs once its communicator exists: the warm-up runs create it)."""

    def __init__(self, group, keep_buffer: bool = True):
        super().__init__(keep_buffer)
        self.group = group

    def _join_side_stream(self):
        torch.cuda.current_stream().wait_stream(self.side_stream)

    def _step(self, model, state: StepState):
        parts = layer_outputs(model, state, self.group, self.attention_fn, self._mlp_beside_attention,
                              self._join_side_stream)
        return next_token(final_logits(model, parts), state.temperature, state.top_k, state.noise)


def tensor_parallel_step(group, compile: bool, keep_buffer: bool = True):
    """The step for ``generate``: on CUDA (``compile``) ``TwoStreamStep(group, keep_buffer)``, else
    ``decode_step`` as is."""
    return TwoStreamStep(group, keep_buffer) if compile else functools.partial(decode_step, group=group)


def generate(model, prompts: list[torch.Tensor], press, new_tokens: int, group, step=None, **options):
    """``neox_decode.generate`` (same ``options``) on a model ``shard`` split over ``group``, the
    press run by ``ShardedPress``; ``step``: one of ``tensor_parallel_step`` (default: compiled on CUDA)."""
    if step is None:
        step = tensor_parallel_step(group, compile=model.device.type == "cuda")
    return neox_decode.generate(model, prompts, ShardedPress(press, group), new_tokens, step=step, **options)
