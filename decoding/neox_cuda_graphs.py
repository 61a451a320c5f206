"""The plain GPT-NeoX decode step (decoding/neox_decode.py) compiled and replayed as CUDA graphs.

``compiled_step`` picks how, by ``--compile_mode``:
- ``reduce-overhead`` / ``max-autotune``: torch.compile of the whole step, one graph through
  torch's cudagraph trees. One such step object serves several models and buffers in turn (the
  speculative decoders use it).
- ``two-stream``: ``TwoStreamStep``, each layer's two branches compiled, in one graph captured
  by hand on two streams. It owns the buffer its graph reads between generations.
- ``one-stream``: the same step with both branches on one stream (``TwoStreamStep(overlap=False)``).
"""

import weakref
from dataclasses import replace

import torch

from decoding.neox_decode import (KVBuffer, StepState, attention_branch, decode_step, final_logits, layer_outputs,
                                  load_buffer, mlp_branch, mlp_hidden, mlp_output, next_token)

COMPILE_MODES = ("two-stream", "one-stream", "reduce-overhead", "max-autotune")
HAND_CAPTURED = ("two-stream", "one-stream")  # the modes TwoStreamStep runs (its buffer, its prefix buckets)


PREFIX_BUCKET = 64  # new slots per prefix bucket of the two-stream step (see TwoStreamStep)


def compiled_step(compile: bool, mode: str = "reduce-overhead", keep_buffer: bool = True, split_mlp: bool = False,
                  prefix_bucket: int = PREFIX_BUCKET):
    """The decode step compiled whole (CUDA-graph replay with ``reduce-overhead`` and
    ``max-autotune``), or as is. ``max-autotune`` also benchmarks Triton matmul templates
    against cuBLAS and, as gpt-fast does, tunes the fused kernels' launch shapes.
    ``two-stream`` / ``one-stream``: ``TwoStreamStep(keep_buffer, split_mlp, prefix_bucket, overlap)``."""
    if not compile:
        return decode_step
    if mode in HAND_CAPTURED:
        return TwoStreamStep(keep_buffer, split_mlp, prefix_bucket, overlap=mode == "two-stream")
    if mode == "max-autotune":
        torch._inductor.config.coordinate_descent_tuning = True
    return torch.compile(decode_step, mode=mode, fullgraph=True)


class TwoStreamStep:
    """The decode step as one CUDA graph captured by hand, in which each layer's MLP runs on a
    second stream beside its attention (GPT-NeoX's parallel residual: both branches read the
    layer's input and meet only in the residual sum). At batch 1 no single kernel keeps the
    GPU's memory busy (cuDNN's decode attention runs one block per head, each GEMV has a ramp-up
    and a tail), so the branches' kernels can overlap. Each branch is compiled by torch.compile
    (no CUDA graphs of its own); the graph is captured at the first call for a buffer, after
    warm-up runs, and replayed after that. CUDA only; called like ``decode_step``.

    The graph reads the buffer's addresses, so a new buffer means a new capture (its cost:
    docs/fast_decode.md). With ``keep_buffer`` the step keeps its buffer between generations, as
    transformers keeps its StaticCache between generate calls, and ``load_buffer`` refills it
    when the shapes match: the next generation of the same shape replays the same graph. The
    price is the buffer's memory held from one generation's end through the next one's prefill,
    which at large batches is most of the GPU's: there pass ``keep_buffer=False``. ``split_mlp``:
    each MLP compiled as two branches, the GELU between them written out (see ``__init__``).

    Prefix buckets: a graph replays fixed shapes, so a graph over the whole buffer reads (and masks)
    every slot at every step, the new tokens' slots not yet written included: 256 of a SnapKV
    buffer's 756 slots at a 2000-token prompt keeping 25%, about a fifth of what its attention reads
    on average. With ``prefix_bucket`` B the step keeps one graph per B new slots, the n-th over each
    layer's kept slots and the first n * B new ones (``KVBuffer.prefix``), and replays the one that
    covers the slots in use (``StepState.filled``): the attention then reads on average B / 2 slots
    past them. The graphs share one memory pool (they replay one after the other); the first is
    captured after three warm-up runs of its step, each later one after one (a new shape: its
    compile and its cuDNN plan happen there, off the capture), the last run's tokens being the
    step's. 0, a step without ``filled``, or a quantized buffer: one graph over the whole buffer.

    ``overlap=False`` runs the MLP on the main stream after the attention (the same kernels, the same
    graphs), to measure what the overlap is worth where one branch's kernels may fill the GPU alone: at
    the largest batches on the H200 the two are level (results/pythia-2.8b_random_speed_frontier_h200/streams_2becd43/)."""

    def __init__(self, keep_buffer: bool = True, split_mlp: bool = False, prefix_bucket: int = PREFIX_BUCKET,
                 overlap: bool = True):
        if prefix_bucket < 0:
            raise ValueError(f"prefix_bucket must be at least 0 (0: read the whole buffer), got {prefix_bucket}")
        self.attention_fn = torch.compile(attention_branch, fullgraph=True)
        if split_mlp:
            # The MLP's two GEMVs compiled apart, so the GELU is written out between them. Compiled
            # whole over quantized weights, inductor decomposes the output GEMV into a reduction and
            # inlines the GELU into it, which then runs once per block of output rows instead of
            # once per input (torchao int8 on the H200: that kernel read its weight at 1.35 TB/s,
            # the input GEMV at 2.59; results/pythia-2.8b_random_speed_frontier_h200/quant_f140e83/).
            hidden_fn = torch.compile(mlp_hidden, fullgraph=True)
            output_fn = torch.compile(mlp_output, fullgraph=True)
            self.mlp_fn = lambda layer, parts: output_fn(layer, hidden_fn(layer, parts))
        else:
            self.mlp_fn = torch.compile(mlp_branch, fullgraph=True)
        # Compiled too: eager, a quantized output head converts its whole weight to fp16 at every
        # step (torchao int8: a 0.33 ms copy per step on the H200, frontier_4e58fce's profile).
        self.logits_fn = torch.compile(final_logits, fullgraph=True)
        self.keep_buffer = keep_buffer
        self.prefix_bucket = prefix_bucket
        self.overlap = overlap
        self.kept_buffer = None  # with keep_buffer: the last generation's buffer
        self.captured_for = None  # a weak reference to the buffer the graphs were captured over
        self.graphs, self.outputs = {}, {}  # by the new slots each reads (None: the whole buffer)

    def load_buffer(self, groups, new_tokens: int, kv_bits: tuple[int, int] | None = None) -> KVBuffer:
        """``load_buffer`` into the kept buffer where it fits (see the class docstring)."""
        buffer = load_buffer(groups, new_tokens, self._hand_over_kept_buffer(), kv_bits)
        if self.keep_buffer:
            self.kept_buffer = buffer
        return buffer

    def _hand_over_kept_buffer(self):
        # Not held here while load_buffer runs, so that it can free a buffer that does not fit.
        buffer, self.kept_buffer = self.kept_buffer, None
        return buffer

    def _mlp_beside_attention(self, layer, parts):
        if not self.overlap:
            return self.mlp_fn(layer, parts)
        main_stream = torch.cuda.current_stream()
        self.side_stream.wait_stream(main_stream)  # the previous layer's attention output
        main_stream.wait_stream(self.side_stream)  # the previous layer's MLP output
        with torch.cuda.stream(self.side_stream):
            return self.mlp_fn(layer, parts)

    def _step(self, model, state: StepState):
        parts = layer_outputs(model, state, self.attention_fn, self._mlp_beside_attention)
        if self.overlap:  # one stream: nothing to wait for (a capture may not wait on a stream it never used)
            torch.cuda.current_stream().wait_stream(self.side_stream)  # the last layer's MLP output
        return next_token(self.logits_fn(model, parts), state.temperature, state.top_k, state.noise)

    def _reset(self, model, state: StepState):
        """Drop the graphs (their memory pool with them) and set up the inputs they will read."""
        if not all(layer.use_parallel_residual for layer in model.gpt_neox.layers):
            raise ValueError("the two-stream step needs GPT-NeoX's parallel residual (use_parallel_residual)")
        self.graphs, self.outputs = {}, {}
        self.pool = torch.cuda.graph_pool_handle()
        # The graphs read their inputs from these copies; each call copies the step's inputs in.
        self.inputs = (state.token.clone(), state.position.clone(), state.new_index.clone(),
                       None if state.noise is None else state.noise.clone())
        self.side_stream = torch.cuda.Stream()
        # A weak reference: without keep_buffer, holding the buffer here would keep a finished
        # generation's KV alive while the next one prefills (no view of it is kept either).
        self.captured_for, self.settings = weakref.ref(state.buffer), settings(state)

    def bucket(self, state: StepState) -> int | None:
        """The new slots the graph for this step reads: the smallest multiple of the bucket that
        covers ``state.filled`` (at most the buffer's), or None for the whole buffer."""
        buffer = state.buffer
        if (not self.prefix_bucket or state.filled is None or not isinstance(buffer, KVBuffer)
                or not all(isinstance(store, torch.Tensor) for store in buffer.keys + buffer.values)):
            return None
        return min(buffer.new_slots(), -(-state.filled // self.prefix_bucket) * self.prefix_bucket)

    def _capture(self, model, state: StepState, new_slots: int | None):
        token, position, new_index, noise = self.inputs
        static = replace(state, token=token, position=position, new_index=new_index, noise=noise,
                         buffer=state.buffer if new_slots is None else state.buffer.prefix(new_slots))
        # Compile and warm up (cuBLAS and cuDNN set up their workspaces) off the capture. Each warm-up
        # run is this very step (it rewrites the slot the step writes, with the same values), so the
        # last one's tokens are the step's: the capture records and runs nothing, and no replay follows.
        warmup_stream = torch.cuda.Stream()
        warmup_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warmup_stream):
            for _ in range(1 if self.graphs else 3):
                tokens = self._step(model, static)
        torch.cuda.current_stream().wait_stream(warmup_stream)
        # cuBLAS keeps one workspace per (handle, stream), and a graph replays the raw address it
        # captured. Others' CUDA graphs (torch.compile's cudagraph trees, which record with their
        # own clear) drop those cached workspaces; one shared with the eager pool is then reused
        # while this graph still writes to it (an illegal memory access on the H100, pytorch issue
        # 193402). Dropped here, so the capture allocates its own in the graphs' private pool,
        # where nothing else allocates (the graphs sharing it replay one at a time).
        torch.cuda.synchronize()
        torch._C._cuda_clearCublasWorkspaces()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[new_slots] = self._step(model, static)
        self.graphs[new_slots] = graph
        return tokens

    def uncaptured(self, model, state: StepState):
        """The step's compiled branches launched one by one on the two streams, no graph: the
        kernels a profiler sees here are the ones the graph replays (evaluation/profile_step.py)."""
        if not hasattr(self, "side_stream"):
            self.side_stream = torch.cuda.Stream()
        return self._step(model, state)

    def __call__(self, model, state: StepState):
        captured = self.captured_for is not None and self.captured_for() is state.buffer
        if not captured or settings(state) != self.settings:
            self._reset(model, state)
        for static, tensor in zip(self.inputs, (state.token, state.position, state.new_index, state.noise)):
            if tensor is not None:
                static.copy_(tensor)
        new_slots = self.bucket(state)
        if new_slots not in self.graphs:
            return self._capture(model, state, new_slots)
        self.graphs[new_slots].replay()
        return self.outputs[new_slots]


def settings(state: StepState) -> tuple:
    """What a captured graph is fixed to besides the buffer: the attention and the sampling rule."""
    return state.backend, state.temperature, state.top_k
