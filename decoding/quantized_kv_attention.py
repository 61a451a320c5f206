"""Decode attention that reads 8-bit or 4-bit keys and values directly: split-KV (Flash-Decoding,
decoding/split_kv_attention.py) over a quantized cache, dequantized in registers.

Why: presses/quantize.py's stores save memory but the decode step reads the dequantized fp16
tensors, so quantization never turns into speed. Decode attention is bound by the cache's bytes;
this kernel reads the codes (1 or 1/2 byte per element) and each (token, head)'s fp16 scale and zero
point (4 bytes), so at head dim 80 a token's keys and values take 168 bytes at 8 bits and 88 at 4
bits instead of 320: a floor 1.9x and 3.6x lower.

The storage (``QuantizedTensor``, per layer ``QuantizedKV``): per (token, head) one group over the
head dim, rounded to the nearest of 2**bits levels between its minimum (the zero point) and maximum,
presses/quantize.py's per-token rule (its ``quantize_groups``, so a press and this store hold the
same numbers). At 8 bits one byte per code; at 4 bits byte i holds channel i in its low nibble and
channel i + dim/2 in its high one, so unpacking gives the two halves of the head dim as contiguous
tiles (the kernel works on the two halves at 8 bits too). Keys may be stored centred and scaled per
(head, channel) first (presses/quantize.py's ``channel_stats``): then k = c * (scale_t code + zero_t) +
mu, and q.k = (q*c).(scale_t code + zero_t) + q.mu, where q.mu is the same for every slot of the
row, so the softmax drops it: the kernel takes the channel scale c only, folded into the query once.

The partial kernel (``quantized_kv_attention_partial``) is split_kv's, but for what it loads: per
slot, score = scale_t (q.code_t) + zero_t sum(q), and acc += (p_t scale_t) code_t + p_t zero_t,
cheaper than dequantizing each element. Keys and values have their own bits (8 or 4 each). The
chunking, the launch plan and the exact merge of chunks are split_kv's (imported). As there, loads
are masked by the chunk's bounds only; the codes of an unseen slot are read but count for nothing,
its score -inf by select, and its value scale and zero point (which could hold inf or NaN garbage:
codes cannot) zeroed before the weighted sum.

Wrapped as the custom op ``kvpress_neox::quantized_kv_attention`` with a fake implementation, so
torch.compile (fullgraph) keeps it opaque. evaluation/quantized_kv_speed.py times it on a GPU.
decoding/neox_decode.py's ``kv_bits`` decodes over a buffer of ``QuantizedTensor``s through it (keys
per token, not centred: the buffer keeps no channel statistics).
"""

import dataclasses

import torch
import triton
import triton.language as tl

from decoding.split_kv_attention import (KernelConfig, combine, empty_partials, launch_plan, online_softmax_step,
                                         op_config)
from presses.quantize import CHANNEL_STATS_BYTES, channel_stats, quantize_groups

BITS = (8, 4)  # what the kernel unpacks


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"{bits} bits: the quantized KV kernel reads {' or '.join(map(str, BITS))}-bit codes")


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A layer's keys or values, (batch, heads, slots, dim) stored as codes and per-group fp16 sides."""

    codes: torch.Tensor  # uint8 (batch, heads, slots, dim * bits / 8), packed as the module docstring says
    scale: torch.Tensor  # fp16 (batch, heads, slots): one code step
    zero: torch.Tensor  # fp16 (batch, heads, slots): the value of code 0, the group's minimum
    bits: int

    @property
    def nbytes(self) -> int:
        return sum(part.numel() * part.element_size() for part in (self.codes, self.scale, self.zero))

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(batch, heads, slots, dim): the shape of what it stores."""
        return (*self.codes.shape[:3], self.codes.shape[3] * 8 // self.bits)

    # Written like an fp KV buffer's tensors (decoding/neox_decode.py): the fp values given are
    # quantized per (token, head) and their codes and sides stored at the same slots.
    def __setitem__(self, index: tuple, x: torch.Tensor) -> None:
        """``index`` (rows, heads, slots) of the stored shape's first three dims, as tensor indexing."""
        stored = quantize(x, self.bits)
        self.codes[index], self.scale[index], self.zero[index] = stored.codes, stored.scale, stored.zero

    def index_copy_(self, dim: int, index: torch.Tensor, x: torch.Tensor) -> "QuantizedTensor":
        """``x`` (batch, heads, len(index), dim) quantized into the slots ``index`` (``dim`` 2):
        plain tensor operations, so a compiled step can run it inside a CUDA graph."""
        stored = quantize(x, self.bits)
        for part, new in zip((self.codes, self.scale, self.zero), (stored.codes, stored.scale, stored.zero)):
            part.index_copy_(dim, index, new)
        return self

    def zero_(self) -> "QuantizedTensor":
        for part in (self.codes, self.scale, self.zero):
            part.zero_()
        return self

    def dequantize(self) -> torch.Tensor:
        """fp32 (batch, heads, slots, dim): code * scale + zero, the reference the kernel is tested against."""
        codes = self.codes
        if self.bits == 4:
            codes = torch.cat([codes & 15, codes >> 4], dim=-1)
        return codes.float() * self.scale[..., None].float() + self.zero[..., None].float()


def quantize(x: torch.Tensor, bits: int) -> QuantizedTensor:
    """``x`` (batch, heads, slots, dim), dim even, rounded per (token, head) by presses/quantize.py's
    rule, computed in x's dtype as a press computes it."""
    check_bits(bits)
    if x.shape[-1] % 2:
        raise ValueError(f"head dim {x.shape[-1]}: the kernel splits the head dim in halves, so it must be even")
    codes, scale, zero = quantize_groups(x, bits)
    codes = codes.to(torch.uint8)
    if bits == 4:
        low, high = codes.chunk(2, dim=-1)
        codes = low | high << 4
    return QuantizedTensor(codes.contiguous(), scale[..., 0].half(), zero[..., 0].half(), bits)


def empty_quantized(shape: tuple[int, int, int, int], bits: int, device) -> QuantizedTensor:
    """A zeroed store of ``shape`` (batch, heads, slots, dim), its tensors at fixed addresses:
    a compiled decode step writes into them in place, replay after replay."""
    check_bits(bits)
    *groups, dim = shape
    stored = QuantizedTensor(torch.zeros(*groups, dim * bits // 8, dtype=torch.uint8, device=device),
                             torch.zeros(groups, dtype=torch.float16, device=device),
                             torch.zeros(groups, dtype=torch.float16, device=device), bits)
    for part in (stored.codes, stored.scale, stored.zero):
        torch._dynamo.mark_static_address(part)
    return stored


@dataclasses.dataclass(frozen=True)
class QuantizedKV:
    """One layer's quantized cache. With channel statistics, the keys are stored as (k - mean) / scale."""

    keys: QuantizedTensor
    values: QuantizedTensor
    channel_mean: torch.Tensor | None = None  # fp16 (batch, heads, dim)
    channel_scale: torch.Tensor | None = None  # fp16 (batch, heads, dim)

    @property
    def nbytes(self) -> int:
        stats = 0 if self.channel_scale is None else self.channel_scale.shape[:2].numel() * self.channel_scale.shape[2]
        return self.keys.nbytes + self.values.nbytes + CHANNEL_STATS_BYTES * stats

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.keys.dequantize()
        if self.channel_scale is not None:
            keys = keys * self.channel_scale[:, :, None].float() + self.channel_mean[:, :, None].float()
        return keys, self.values.dequantize()


def quantize_kv(keys: torch.Tensor, values: torch.Tensor, key_bits: int, value_bits: int,
                centre_keys: bool = False) -> QuantizedKV:
    """Keys and values (batch, heads, slots, dim) quantized; with ``centre_keys`` the keys are first
    centred and scaled by their channel statistics over the slots, as quantize_per_token(stats=...) does."""
    if not centre_keys:
        return QuantizedKV(quantize(keys, key_bits), quantize(values, value_bits))
    mean, scale = channel_stats(keys)
    return QuantizedKV(quantize((keys - mean) / scale, key_bits), quantize(values, value_bits),
                       mean[:, :, 0].half(), scale[:, :, 0].half())


@triton.jit
def code_float(codes):
    """Codes (integers 0..255) as exact fp32 without an integer-to-float conversion: the float of bits
    0x4B000000 | code is 2**23 + code, so subtracting 2**23 leaves the code. An integer-to-float
    conversion runs at a fraction of the fp32 add rate (16 against 128 a clock per SM in the CUDA
    programming guide's throughput table; not measured here), and there was one per code element
    (sm_90 PTX: 512 cvt.rn.f32.u32 against 501 fma a thread at 128 x 2 x 4)."""
    return (codes.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def load_codes(rows, slot, s_stride, d_stride, dims, tile, HALF: tl.constexpr, BITS: tl.constexpr):
    """The codes of ``slot``'s channels ``dims`` of the first half of the head dim and of the same
    channels of the second half (``dims`` + HALF), each a (block, len(dims)) fp32 tile."""
    first = rows + slot[:, None] * s_stride + dims[None, :] * d_stride
    if BITS == 8:
        low = tl.load(first, mask=tile, other=0)
        high = tl.load(first + HALF * d_stride, mask=tile, other=0)
    else:
        packed = tl.load(first, mask=tile, other=0).to(tl.uint32)  # nibbles unpacked in 32-bit integer ops
        low = packed & 15
        high = packed >> 4
    return code_float(low), code_float(high)


@triton.jit
def load_query(q_row, c_row, dims, in_half, q_d, c_d, scale, HALF: tl.constexpr, CHANNEL_SCALE: tl.constexpr):
    """The query's channels ``dims`` of each half, scaled (and by the keys' channel scale), fp32."""
    low = tl.load(q_row + dims * q_d, mask=in_half, other=0.0).to(tl.float32) * scale
    high = tl.load(q_row + (dims + HALF) * q_d, mask=in_half, other=0.0).to(tl.float32) * scale
    if CHANNEL_SCALE:
        low *= tl.load(c_row + dims * c_d, mask=in_half, other=0.0).to(tl.float32)
        high *= tl.load(c_row + (dims + HALF) * c_d, mask=in_half, other=0.0).to(tl.float32)
    return low, high


@triton.jit(do_not_specialize=["chunk", "chunks"])
def quantized_kv_attention_partial(
    query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, channel_scale, visible,
    partial_acc, partial_max, partial_sum, scale,
    heads, new, slots, chunk, chunks,
    q_b, q_h, q_n, q_d, k_b, k_h, k_s, k_d, ks_b, ks_h, ks_s, v_b, v_h, v_s, v_d, vs_b, vs_h, vs_s,
    c_b, c_h, c_d, m_b, m_n, m_s,
    HALF: tl.constexpr, PIECE: tl.constexpr, BLOCK_REST: tl.constexpr, BLOCK: tl.constexpr,
    KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, CHANNEL_SCALE: tl.constexpr,
    KEY_ALIGN: tl.constexpr, VALUE_ALIGN: tl.constexpr,
):
    row, split = tl.program_id(0), tl.program_id(1)  # row: (batch, head, new token) flattened
    batch, head, token = (row // (heads * new)).to(tl.int64), (row // new) % heads, row % new
    # Triton knows only integer arguments that are multiples of 16, and a 4-bit row of 40 bytes is not: the
    # codes' strides come divided by their alignment and are multiplied back by it here, a constant the
    # compiler sees. Without that (tl.multiple_of on the argument did not do it) every code byte is loaded
    # alone: sm_90 PTX of 4-bit had 258 ld.global.b8 a thread where 8-bit's codes came in ld.global.v2.b32.
    k_b, k_h, k_s = k_b * KEY_ALIGN, k_h * KEY_ALIGN, k_s * KEY_ALIGN
    v_b, v_h, v_s = v_b * VALUE_ALIGN, v_h * VALUE_ALIGN, v_s * VALUE_ALIGN
    # Each half of the head dim in two tiles whose widths are powers of two, as Triton's are: PIECE
    # channels, then the rest (Pythia's 40 = 32 + 8). One tile padded to 64 left 24 of its 64 lanes
    # idle in every load and every multiply.
    dims_a = tl.arange(0, PIECE)
    dims_b = PIECE + tl.arange(0, BLOCK_REST)
    in_a, in_b = dims_a < HALF, dims_b < HALF
    q_row = query + batch * q_b + head * q_h + token * q_n
    c_row = channel_scale + batch * c_b + head * c_h
    q_a_low, q_a_high = load_query(q_row, c_row, dims_a, in_a, q_d, c_d, scale, HALF, CHANNEL_SCALE)
    q_b_low, q_b_high = load_query(q_row, c_row, dims_b, in_b, q_d, c_d, scale, HALF, CHANNEL_SCALE)
    # what each key's zero point adds, per unit
    q_total = tl.sum(q_a_low, axis=0) + tl.sum(q_a_high, axis=0) + tl.sum(q_b_low, axis=0) + tl.sum(q_b_high, axis=0)
    key_rows = key_codes + batch * k_b + head * k_h
    value_rows = value_codes + batch * v_b + head * v_h
    key_sides = batch * ks_b + head * ks_h  # scale and zero point share their strides (the op checks)
    value_sides = batch * vs_b + head * vs_h
    mask_row = visible + batch * m_b + token * m_n
    largest = tl.full([], float("-inf"), tl.float32)
    total = tl.full([], 0.0, tl.float32)
    acc_a_low = tl.zeros([PIECE], tl.float32)
    acc_a_high = tl.zeros([PIECE], tl.float32)
    acc_b_low = tl.zeros([BLOCK_REST], tl.float32)
    acc_b_high = tl.zeros([BLOCK_REST], tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, slots)
    for first in range(start, end, BLOCK):
        slot = first + tl.arange(0, BLOCK)
        in_chunk = slot < end
        # bounds only, as in split_kv: nothing here waits for another load
        tile_a, tile_b = in_chunk[:, None] & in_a[None, :], in_chunk[:, None] & in_b[None, :]
        k_a_low, k_a_high = load_codes(key_rows, slot, k_s, k_d, dims_a, tile_a, HALF, KEY_BITS)
        k_b_low, k_b_high = load_codes(key_rows, slot, k_s, k_d, dims_b, tile_b, HALF, KEY_BITS)
        v_a_low, v_a_high = load_codes(value_rows, slot, v_s, v_d, dims_a, tile_a, HALF, VALUE_BITS)
        v_b_low, v_b_high = load_codes(value_rows, slot, v_s, v_d, dims_b, tile_b, HALF, VALUE_BITS)
        k_step = tl.load(key_scale + key_sides + slot * ks_s, mask=in_chunk, other=0.0).to(tl.float32)
        k_zero = tl.load(key_zero + key_sides + slot * ks_s, mask=in_chunk, other=0.0).to(tl.float32)
        v_step = tl.load(value_scale + value_sides + slot * vs_s, mask=in_chunk, other=0.0).to(tl.float32)
        v_zero = tl.load(value_zero + value_sides + slot * vs_s, mask=in_chunk, other=0.0).to(tl.float32)
        seen = tl.load(mask_row + slot * m_s, mask=in_chunk, other=0) != 0
        dot = (tl.sum(k_a_low * q_a_low[None, :], axis=1) + tl.sum(k_a_high * q_a_high[None, :], axis=1)
               + tl.sum(k_b_low * q_b_low[None, :], axis=1) + tl.sum(k_b_high * q_b_high[None, :], axis=1))
        score = tl.where(seen, k_step * dot + k_zero * q_total, float("-inf"))
        new_largest, weight, rescale = online_softmax_step(largest, score)
        # per slot, not per element: an unseen slot's weight is 0, and its scale and zero point are zeroed
        # so that garbage there (inf, NaN) cannot make 0 * inf = NaN
        v_step = tl.where(seen, weight * v_step, 0.0)
        v_offset = tl.sum(tl.where(seen, weight * v_zero, 0.0), axis=0)
        acc_a_low = acc_a_low * rescale + tl.sum(v_step[:, None] * v_a_low, axis=0) + v_offset
        acc_a_high = acc_a_high * rescale + tl.sum(v_step[:, None] * v_a_high, axis=0) + v_offset
        acc_b_low = acc_b_low * rescale + tl.sum(v_step[:, None] * v_b_low, axis=0) + v_offset
        acc_b_high = acc_b_high * rescale + tl.sum(v_step[:, None] * v_b_high, axis=0) + v_offset
        total = total * rescale + tl.sum(weight, axis=0)
        largest = new_largest
    part = row * chunks + split
    out = partial_acc + part * 2 * HALF
    tl.store(out + dims_a, acc_a_low, mask=in_a)
    tl.store(out + HALF + dims_a, acc_a_high, mask=in_a)
    tl.store(out + dims_b, acc_b_low, mask=in_b)
    tl.store(out + HALF + dims_b, acc_b_high, mask=in_b)
    tl.store(partial_max + part, largest)
    tl.store(partial_sum + part, total)


def check_shapes(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, key_bits, value_bits,
                 key_channel_scale) -> None:
    """ValueError unless the stored tensors fit the query (batch, heads, new, dim) and the bits."""
    batch, heads, _, dim = query.shape
    slots = key_codes.shape[2]
    if dim % 2:
        raise ValueError(f"head dim {dim}: must be even")
    for name, codes, bits, step, zero in [("key", key_codes, key_bits, key_scale, key_zero),
                                          ("value", value_codes, value_bits, value_scale, value_zero)]:
        check_bits(bits)
        if codes.dtype != torch.uint8 or tuple(codes.shape) != (batch, heads, slots, dim * bits // 8):
            raise ValueError(f"{name} codes {codes.dtype} {tuple(codes.shape)}: uint8 (batch, heads, slots, "
                             f"{dim * bits // 8}) for {bits} bits at head dim {dim}")
        if tuple(step.shape) != (batch, heads, slots) or step.shape != zero.shape or step.stride() != zero.stride():
            raise ValueError(f"{name} scale {tuple(step.shape)} and zero {tuple(zero.shape)}: both (batch, heads, "
                             "slots), with the same strides")
    if key_channel_scale is not None and tuple(key_channel_scale.shape) != (batch, heads, dim):
        raise ValueError(f"key channel scale {tuple(key_channel_scale.shape)}: (batch, heads, dim)")


def alignment(strides) -> int:
    """The largest power of two, up to 16 bytes, that divides every one of the codes' ``strides``."""
    return min([16, *(stride & -stride for stride in strides if stride)])


def aligned_strides(codes: torch.Tensor, align: int) -> tuple[int, int, int, int]:
    """The codes' batch, head and slot strides divided by ``align`` (the kernel multiplies them back),
    and the byte stride."""
    *outer, byte = codes.stride()
    return (*(stride // align for stride in outer), byte)


def partial_arguments(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, visible, scale,
                      key_bits, value_bits, key_channel_scale, partials, chunk, chunks, block):
    """The partial kernel's arguments in order, and its constants: what the op launches, and what
    evaluation/kernel_loads.py compiles for a GPU without one."""
    heads, new, dim = query.shape[1], query.shape[2], query.shape[3]
    key_align, value_align = alignment(key_codes.stride()[:3]), alignment(value_codes.stride()[:3])
    # without a channel scale the kernel never reads its pointer: the query stands in for it
    channel = query if key_channel_scale is None else key_channel_scale
    channel_strides = (0, 0, 0) if key_channel_scale is None else key_channel_scale.stride()
    arguments = [query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, channel, visible,
                 *partials, scale, heads, new, key_codes.shape[2], chunk, chunks,
                 *query.stride(), *aligned_strides(key_codes, key_align), *key_scale.stride(),
                 *aligned_strides(value_codes, value_align), *value_scale.stride(), *channel_strides, *visible.stride()]
    half = dim // 2
    piece = 1 << (half.bit_length() - 1)  # the largest power of two in the half; the rest in a second tile
    constants = dict(HALF=half, PIECE=piece, BLOCK_REST=triton.next_power_of_2(max(half - piece, 1)), BLOCK=block,
                     KEY_BITS=key_bits, VALUE_BITS=value_bits, CHANNEL_SCALE=key_channel_scale is not None,
                     KEY_ALIGN=key_align, VALUE_ALIGN=value_align)
    return arguments, constants


@torch.library.custom_op("kvpress_neox::quantized_kv_attention", mutates_args=())
def quantized_kv_attention(query: torch.Tensor, key_codes: torch.Tensor, key_scale: torch.Tensor,
                           key_zero: torch.Tensor, value_codes: torch.Tensor, value_scale: torch.Tensor,
                           value_zero: torch.Tensor, visible: torch.Tensor, scale: float, key_bits: int,
                           value_bits: int, key_channel_scale: torch.Tensor | None = None, chunks: int | None = None,
                           block: int | None = None, warps: int | None = None,
                           stages: int | None = None) -> torch.Tensor:
    """Attention of ``query`` (batch, heads, new, dim) over a quantized cache (``QuantizedTensor``'s
    fields for keys and values, the keys' channel scale if they were stored centred) where ``visible``
    (batch, new, slots) is True; returns (batch, heads, new, dim), contiguous, in the query's dtype.
    ``chunks``, ``block``, ``warps``, ``stages``: the launch, as for split_kv_attention."""
    check_shapes(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, key_bits, value_bits,
                 key_channel_scale)
    batch, heads, new, dim = query.shape
    slots, rows = key_codes.shape[2], batch * heads * new
    config = op_config(chunks, block, warps, stages)
    chunk, chunks = launch_plan(rows, slots, query.device, config)
    partial_acc, partial_max, partial_sum = empty_partials(query, chunks)
    arguments, constants = partial_arguments(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
                                             visible, scale, key_bits, value_bits, key_channel_scale,
                                             (partial_acc, partial_max, partial_sum), chunk, chunks, config.block)
    quantized_kv_attention_partial[(rows, chunks)](*arguments, **constants, num_warps=config.warps,
                                                   num_stages=config.stages)
    return combine(query, partial_acc, partial_max, partial_sum)


@quantized_kv_attention.register_fake
def _(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, visible, scale, key_bits,
      value_bits, key_channel_scale=None, chunks=None, block=None, warps=None, stages=None):
    check_shapes(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, key_bits, value_bits,
                 key_channel_scale)
    return query.new_empty(query.shape)


def attend_quantized(query: torch.Tensor, cache: QuantizedKV, visible: torch.Tensor, scale: float,
                     config: KernelConfig | None = None) -> torch.Tensor:
    """``quantized_kv_attention`` over ``cache``, launched by ``config`` (None: DEFAULT_CONFIG's)."""
    launch = dataclasses.astuple(config) if config is not None else (None,) * 4
    block, warps, stages, chunks = launch
    keys, values = cache.keys, cache.values
    return quantized_kv_attention(query, keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero,
                                  visible, scale, keys.bits, values.bits, cache.channel_scale, chunks, block, warps,
                                  stages)
