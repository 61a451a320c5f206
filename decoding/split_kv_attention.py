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
stale ring slots are False. The mask is read first and used as the mask of the key and value loads,
so a slot nobody sees is never read from memory, and its score is -inf. A chunk that sees nothing
has m = -inf and weighs exp(-inf) = 0 in the merge; every new token sees at least itself, so M is
finite. The grid is fixed by the tensors' shapes alone (the buffer's slots, not the lengths in it),
so the op makes no host sync and one CUDA graph serves every step.

Head dims that are not a power of two (Pythia's 80) are padded to the next one (128) in registers,
the padding masked off in every load and store. Several new tokens (a speculative verify pass) get
one program each: each reads its chunk again, from L2 mostly.

Wrapped as a torch.library custom op with a fake (shape-only) implementation, so torch.compile
(fullgraph) keeps it as one opaque call in the compiled step. On a CPU it runs under Triton's
interpreter (TRITON_INTERPRET=1 set before triton is imported: tests/conftest.py).
"""

import torch
import triton
import triton.language as tl

BLOCK_SLOTS = 32  # slots per loop iteration of a program (a chunk is a whole number of these)
PROGRAMS_PER_MULTIPROCESSOR = 8  # enough resident programs per SM to keep its memory requests in flight
# The interpreter runs one program at a time, so any count is as fast there; this one splits the
# tests' short caches into a few chunks, as a GPU splits long ones.
INTERPRETER_MULTIPROCESSORS = 2


def split_plan(rows: int, slots: int, multiprocessors: int) -> tuple[int, int]:
    """(slots per chunk, chunks) for ``rows`` (batch x heads x new tokens) queries over ``slots``:
    enough chunks that rows x chunks programs give every multiprocessor
    PROGRAMS_PER_MULTIPROCESSOR of them, each chunk at least one block of BLOCK_SLOTS."""
    blocks = triton.cdiv(slots, BLOCK_SLOTS)
    wanted = max(1, min(blocks, triton.cdiv(PROGRAMS_PER_MULTIPROCESSOR * multiprocessors, rows)))
    chunk = BLOCK_SLOTS * triton.cdiv(blocks, wanted)
    return chunk, triton.cdiv(slots, chunk)


def multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_MULTIPROCESSORS


@triton.jit
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
        seen = tl.load(mask_row + slot * m_s, mask=slot < end, other=0) != 0
        tile = seen[:, None] & in_dim[None, :]
        # both loads issued before the scores need the keys: the block's bytes in flight together
        k = tl.load(key_rows + slot[:, None] * k_s + dims[None, :] * k_d, mask=tile, other=0.0)
        v = tl.load(value_rows + slot[:, None] * v_s + dims[None, :] * v_d, mask=tile, other=0.0)
        score = tl.where(seen, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))
        new_largest = tl.maximum(largest, tl.max(score, axis=0))
        # Nothing seen yet: shift by 0, so exp(-inf - 0) = 0 rather than exp(-inf + inf) = nan.
        shift = tl.where(new_largest == float("-inf"), 0.0, new_largest)
        weight = tl.exp(score - shift)
        rescale = tl.exp(largest - shift)
        acc = acc * rescale + tl.sum(weight[:, None] * v.to(tl.float32), axis=0)
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
                       scale: float, chunks: int | None = None) -> torch.Tensor:
    """Attention of ``query`` (batch, heads, new, dim) over ``keys`` and ``values`` (batch, heads,
    slots, dim) where ``visible`` (batch, new, slots) is True; returns (batch, heads, new, dim),
    contiguous, in the query's dtype. ``chunks``: how many chunks the slots are split into
    (default: ``split_plan``'s, from the shapes and the GPU's multiprocessor count)."""
    batch, heads, new, dim = query.shape
    slots, rows = keys.shape[2], batch * heads * new
    if chunks is None:
        chunk, chunks = split_plan(rows, slots, multiprocessors(query.device))
    else:
        chunk = triton.cdiv(slots, chunks)
    partial_acc = query.new_empty((rows, chunks, dim), dtype=torch.float32)
    partial_max = query.new_empty((rows, chunks), dtype=torch.float32)
    partial_sum = torch.empty_like(partial_max)
    output = query.new_empty(query.shape)
    block_dim = triton.next_power_of_2(dim)
    split_kv_attention_partial[(rows, chunks)](
        query, keys, values, visible, partial_acc, partial_max, partial_sum, scale,
        heads, new, slots, chunk, chunks, *query.stride(), *keys.stride(), *values.stride(), *visible.stride(),
        DIM=dim, BLOCK_DIM=block_dim, BLOCK=BLOCK_SLOTS)
    split_kv_attention_combine[(rows,)](partial_acc, partial_max, partial_sum, output, chunks,
                                        DIM=dim, BLOCK_DIM=block_dim, BLOCK_CHUNKS=triton.next_power_of_2(chunks))
    return output


@split_kv_attention.register_fake
def _(query, keys, values, visible, scale, chunks=None):
    return query.new_empty(query.shape)
