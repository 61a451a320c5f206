"""Split-KV decode attention in Triton (Flash-Decoding: Dao, Haziza, Massa, Sizov, "Flash-Decoding
for long-context inference", 2023): the ``split_kv`` back end of decoding/neox_decode.py's ``attend``.

Why: at decode time each (sequence, head) has one query over the whole cache. A kernel that gives
each (sequence, head) one thread block runs batch x heads blocks: 32 for Pythia-2.8B at batch 1,
on a GPU of 132 multiprocessors (H200), so most of the GPU's memory bandwidth sits idle while the
cache is read. Measured there, SDPA's decode attention took 3.22x the time of its bytes
(results/pythia-2.8b_random_speed_frontier_h200/). Here the cache's slots are also split into
chunks, one program per (sequence, head, new token, chunk), enough programs to fill the GPU:

1. ``split_kv_attention_partial``: each program runs the online softmax over its chunk, in fp32
   whatever the inputs' dtype (fp32, fp16, bf16): the largest score m, the sum l of exp(score - m)
   and the exp-weighted sum of the values, acc, unnormalised.
2. ``split_kv_attention_combine``: per (sequence, head, new token), the chunks merged exactly:
   with M the largest m over chunks, output = sum_c exp(m_c - M) acc_c / sum_c exp(m_c - M) l_c.

The visibility rule is the caller's boolean mask ``visible`` (batch, new, slots), as for the other
back ends: padding in front of a shorter sequence, slots not yet written and (decoding/ring_cache.py)
stale ring slots are False. The key and value loads are masked by the chunk's bounds only, not by
``visible``: a load masked by the mask's load waits for it, which keeps Triton from issuing the next
iterations' loads ahead (software pipelining). That is the likely reason one program over 2000 slots
read at 0.1 TB/s, latency-bound, on the first H200 call (results/pythia-2.8b_random_split_kv_h200/);
not yet measured since this change. So slots nobody sees are read too, and whatever they
hold (the buffers are zeroed, but a caller's need not be: NaN, inf) must count for exactly nothing:
their score is set to -inf, and their values to 0 before the weighted sum (weight 0 times inf or
NaN would be NaN). A chunk that sees nothing has m = -inf and weighs exp(-inf) = 0 in the merge;
every new token sees at least itself, so M is finite. The grid is fixed by the tensors' shapes alone
(the buffer's slots, not the lengths in it), so the op makes no host sync and one CUDA graph serves
every step.

The partial kernel's launch is a ``KernelConfig``: slots per loop iteration (``block``), warps,
pipeline stages, and optionally the chunk count (else ``split_plan``'s). ``DEFAULT_CONFIG`` is what
the op runs when its arguments leave them out; evaluation/split_kv_speed.py sweeps them on a GPU and
names the best per shape, which a run passes as the op's arguments or, for a whole decode step,
by replacing ``DEFAULT_CONFIG`` (evaluation/speed_frontier.py's ``--split_kv_config``).

Head dims that are not a power of two (Pythia's 80) are padded to the next one (128) in registers,
the padding masked off in every load and store. Several new tokens (a speculative verify pass) get
one program each: each reads its chunk again, from L2 mostly.

Wrapped as a torch.library custom op with a fake (shape-only) implementation, so torch.compile
(fullgraph) keeps it as one opaque call in the compiled step. On a CPU it runs under Triton's
interpreter (TRITON_INTERPRET=1 set before triton is imported: tests/conftest.py).
"""

import dataclasses

import torch
import triton
import triton.language as tl


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How the partial kernel is launched. Written BLOCKxWARPSxSTAGES[xCHUNKS], e.g. 64x4x3."""

    block: int  # slots per loop iteration of a program, a power of two (a tile is block x padded head dim)
    warps: int  # the program's num_warps
    stages: int  # num_stages: the depth of Triton's software pipeline over the loop (1: none)
    chunks: int | None = None  # the slots split into this many chunks; None: split_plan's

    def __post_init__(self):
        if self.block < 1 or self.block & (self.block - 1):
            raise ValueError(f"block {self.block}: a power of two (tl.arange's length)")
        if min(self.warps, self.stages) < 1 or (self.chunks is not None and self.chunks < 1):
            raise ValueError(f"{self}: warps, stages and chunks are positive")

    def __str__(self) -> str:
        return "x".join(str(value) for value in dataclasses.astuple(self) if value is not None)


def parse_config(text: str) -> KernelConfig:
    parts = text.split("x")
    if len(parts) not in (3, 4) or not all(part.isdigit() for part in parts):
        raise ValueError(f"bad split_kv config {text!r}: BLOCKxWARPSxSTAGES[xCHUNKS], e.g. 64x4x3")
    return KernelConfig(*(int(part) for part in parts))


# Measured on the H200 (results/pythia-2.8b_random_quantized_kv_h200/run_c864b68/, Pythia-2.8B's heads
# over 2000 slots at batch 1 and 64, 8000 at batch 1): 128 slots per iteration, 2 warps, a pipeline 4
# deep is within 7% of the fastest launch tried at every shape, for this kernel in fp16 and for the
# quantized-KV kernel (decoding/quantized_kv_attention.py) at 8 bits. The guess it replaces (64 x 4 x 3)
# took 1.4-1.9x as long; the decode step's 8-bit buffer ran with it, 19.4 against 11.7 us a layer.
DEFAULT_CONFIG = KernelConfig(block=128, warps=2, stages=4)
PROGRAMS_PER_MULTIPROCESSOR = 8  # enough resident programs per SM to keep its memory requests in flight
# The interpreter runs one program at a time, so any count is as fast there; this one splits the
# tests' short caches into a few chunks, as a GPU splits long ones.
INTERPRETER_MULTIPROCESSORS = 2


def split_plan(rows: int, slots: int, multiprocessors: int, block: int) -> tuple[int, int]:
    """(slots per chunk, chunks) for ``rows`` (batch x heads x new tokens) queries over ``slots``:
    enough chunks that rows x chunks programs give every multiprocessor
    PROGRAMS_PER_MULTIPROCESSOR of them, each chunk a whole number of loop iterations of ``block``."""
    blocks = triton.cdiv(slots, block)
    wanted = max(1, min(blocks, triton.cdiv(PROGRAMS_PER_MULTIPROCESSOR * multiprocessors, rows)))
    chunk = block * triton.cdiv(blocks, wanted)
    return chunk, triton.cdiv(slots, chunk)


def launch_plan(rows: int, slots: int, device: torch.device, config: KernelConfig) -> tuple[int, int]:
    """(slots per chunk, chunks) the op runs with: the config's chunk count, else split_plan's."""
    if config.chunks is None:
        return split_plan(rows, slots, multiprocessors(device), config.block)
    return triton.cdiv(slots, config.chunks), config.chunks


def multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_MULTIPROCESSORS


@triton.jit
def online_softmax_step(largest, score):
    """One block of the online softmax: the largest score so far with this block's ``score``s, the
    block's weights exp(score - that) and the factor exp(old largest - that) the running sums take."""
    new_largest = tl.maximum(largest, tl.max(score, axis=0))
    # Nothing seen yet: shift by 0, so exp(-inf - 0) = 0 rather than exp(-inf + inf) = nan.
    shift = tl.where(new_largest == float("-inf"), 0.0, new_largest)
    return new_largest, tl.exp(score - shift), tl.exp(largest - shift)


# Not specialized on the chunking (Triton would compile apart chunk sizes divisible by 16 or not, and
# one chunk), so a launch config compiles once for every chunk count the GPU sweep tries: their
# divisibility would tell only of store indices and of slot offsets that k_s's already aligns.
@triton.jit(do_not_specialize=["chunk", "chunks"])
def split_kv_attention_partial(
    query, keys, values, visible, partial_acc, partial_max, partial_sum, scale,
    heads, new, slots, chunk, chunks,
    q_b, q_h, q_n, q_d, k_b, k_h, k_s, k_d, v_b, v_h, v_s, v_d, m_b, m_n, m_s,
    DIM: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    row, split = tl.program_id(0), tl.program_id(1)  # row: (batch, head, new token) flattened
    # 64-bit: at large batches a sequence's offset into the buffer passes 2**31 elements
    batch, head, token = (row // (heads * new)).to(tl.int64), (row // new) % heads, row % new
    dims = tl.arange(0, BLOCK_DIM)
    in_dim = dims < DIM
    # the scale folded into the query once, as the other back ends scale the scores
    q = tl.load(query + batch * q_b + head * q_h + token * q_n + dims * q_d, mask=in_dim, other=0.0)
    q = q.to(tl.float32) * scale
    key_rows = keys + batch * k_b + head * k_h
    value_rows = values + batch * v_b + head * v_h
    mask_row = visible + batch * m_b + token * m_n
    largest = tl.full([], float("-inf"), tl.float32)
    total = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_DIM], tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, slots)
    for first in range(start, end, BLOCK):
        slot = first + tl.arange(0, BLOCK)
        in_chunk = slot < end
        # Bounds only, not the visibility mask: these loads need no earlier load's result, so the
        # pipeline can issue the next iterations' ahead of this one's arithmetic.
        tile = in_chunk[:, None] & in_dim[None, :]
        k = tl.load(key_rows + slot[:, None] * k_s + dims[None, :] * k_d, mask=tile, other=0.0)
        v = tl.load(value_rows + slot[:, None] * v_s + dims[None, :] * v_d, mask=tile, other=0.0)
        seen = tl.load(mask_row + slot * m_s, mask=in_chunk, other=0) != 0
        # a select, not arithmetic: an unseen slot's score is -inf even where its keys are NaN or inf
        score = tl.where(seen, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))
        new_largest, weight, rescale = online_softmax_step(largest, score)
        # An unseen slot's weight is 0, but 0 times a NaN or inf value is NaN: its values are zeroed.
        v = tl.where(seen[:, None], v.to(tl.float32), 0.0)
        acc = acc * rescale + tl.sum(weight[:, None] * v, axis=0)
        total = total * rescale + tl.sum(weight, axis=0)
        largest = new_largest
    part = row * chunks + split
    tl.store(partial_acc + part * DIM + dims, acc, mask=in_dim)
    tl.store(partial_max + part, largest)
    tl.store(partial_sum + part, total)


@triton.jit
def split_kv_attention_combine(partial_acc, partial_max, partial_sum, output, chunks,
                               DIM: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_CHUNKS: tl.constexpr):
    row = tl.program_id(0)
    dims = tl.arange(0, BLOCK_DIM)
    split = tl.arange(0, BLOCK_CHUNKS)
    in_dim, in_chunks = dims < DIM, split < chunks
    part = row * chunks + split
    largest = tl.load(partial_max + part, mask=in_chunks, other=float("-inf"))
    total = tl.load(partial_sum + part, mask=in_chunks, other=0.0)
    acc = tl.load(partial_acc + part[:, None] * DIM + dims[None, :], mask=in_chunks[:, None] & in_dim[None, :],
                  other=0.0)
    weight = tl.exp(largest - tl.max(largest, axis=0))  # a chunk that saw nothing (-inf) weighs 0
    merged = tl.sum(weight[:, None] * acc, axis=0) / tl.sum(weight * total, axis=0)
    tl.store(output + row * DIM + dims, merged.to(output.dtype.element_ty), mask=in_dim)


@torch.library.custom_op("kvpress_neox::split_kv_attention", mutates_args=())
def split_kv_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                       scale: float, chunks: int | None = None, block: int | None = None, warps: int | None = None,
                       stages: int | None = None) -> torch.Tensor:
    """Attention of ``query`` (batch, heads, new, dim) over ``keys`` and ``values`` (batch, heads,
    slots, dim) where ``visible`` (batch, new, slots) is True; returns (batch, heads, new, dim),
    contiguous, in the query's dtype. ``chunks``, ``block``, ``warps``, ``stages``: the partial
    kernel's ``KernelConfig``, each left out taken from ``DEFAULT_CONFIG`` (read at every call)."""
    batch, heads, new, dim = query.shape
    slots, rows = keys.shape[2], batch * heads * new
    config = op_config(chunks, block, warps, stages)
    chunk, chunks = launch_plan(rows, slots, query.device, config)
    partial_acc, partial_max, partial_sum = empty_partials(query, chunks)
    split_kv_attention_partial[(rows, chunks)](
        query, keys, values, visible, partial_acc, partial_max, partial_sum, scale,
        heads, new, slots, chunk, chunks, *query.stride(), *keys.stride(), *values.stride(), *visible.stride(),
        DIM=dim, BLOCK_DIM=triton.next_power_of_2(dim), BLOCK=config.block, num_warps=config.warps,
        num_stages=config.stages)
    return combine(query, partial_acc, partial_max, partial_sum)


def op_config(chunks: int | None, block: int | None, warps: int | None, stages: int | None) -> KernelConfig:
    """The op arguments' KernelConfig: each left out (None) taken from ``DEFAULT_CONFIG``, read now."""
    given = {"chunks": chunks, "block": block, "warps": warps, "stages": stages}
    return dataclasses.replace(DEFAULT_CONFIG, **{name: value for name, value in given.items() if value is not None})


def empty_partials(query: torch.Tensor, chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The partial kernel's outputs for ``query`` (batch, heads, new, dim) in ``chunks`` chunks, fp32:
    acc (rows, chunks, dim), largest score and exp-sum (rows, chunks), rows = batch x heads x new."""
    rows, dim = query.shape[:3].numel(), query.shape[3]
    partial_max = query.new_empty((rows, chunks), dtype=torch.float32)
    return query.new_empty((rows, chunks, dim), dtype=torch.float32), partial_max, torch.empty_like(partial_max)


def combine(query, partial_acc, partial_max, partial_sum) -> torch.Tensor:
    """The chunks' partials merged (``split_kv_attention_combine``): the attention output, the query's
    shape and dtype, contiguous."""
    rows, chunks, dim = partial_acc.shape
    output = query.new_empty(query.shape)
    split_kv_attention_combine[(rows,)](partial_acc, partial_max, partial_sum, output, chunks, DIM=dim,
                                        BLOCK_DIM=triton.next_power_of_2(dim),
                                        BLOCK_CHUNKS=triton.next_power_of_2(chunks))
    return output


@split_kv_attention.register_fake
def _(query, keys, values, visible, scale, chunks=None, block=None, warps=None, stages=None):
    return query.new_empty(query.shape)
