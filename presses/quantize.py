"""Simulated low-bit KV storage: round keys and values to b-bit integers with fp16 scales, then
back, and count the bytes a real store of that form would hold.

The cache keeps the dequantized tensors (the model's dtype), so attention runs unchanged and
the error is exactly the rounding a packed store would make; speed is a separate matter (a
packed store needs a kernel that reads it). Bytes are counted as stored: ``bits`` per element,
an fp16 scale and an fp16 zero point per group, and whatever side data the press keeps.

Per-token groups may first be turned by a fixed random rotation (``rotate``, QuaRot's idea for KV:
Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs"): an orthogonal R spreads a
vector's outlier dimensions over all of them, so one group's range fits its values better. The store
holds the rotated integers; attention stays exact by rotating the query (q.k = Rq.Rk) and the output
(sum p v = R^T sum p Rv), and R is rebuilt from its seed, so it costs no bytes.

Two layouts:
- per token: one group per (token, head) along the head dimension. Keys are first centred and
  scaled per channel with statistics of the context (``channel_stats``), so the outlier
  channels keys are known for (KIVI, KVQuant) do not set every token's range; the statistics
  cost 4 bytes per channel and head, stored once per layer.
- per channel (KIVI's keys): one group per (channel, head) over ``group_tokens`` consecutive
  tokens; tokens past the last whole group stay in fp16 (KIVI's residual). The channels of a head
  may take different widths (``query_weighted_widths``, ours): a key error in channel c moves every
  logit by q_c dk_c, so the bits go where the queries look, a channel no query reads taking none.
"""

import torch

from presses.errors import PressConfigError

FP16_BYTES = 2
GROUP_SIDE_BYTES = 4  # an fp16 scale and an fp16 zero point
# the integer widths a simulated store takes (a packed store of 3, 5, 6 or 7 bits spans bytes, which
# the byte count allows: bits per element, not per byte)
WIDTHS = (2, 3, 4, 5, 6, 7, 8)


def quantize_groups(x: torch.Tensor, bits: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` rounded to ``bits``-bit integers along ``dim`` (asymmetric min-max, one group per
    slice; ``bits`` an int or a tensor of positive widths broadcast over the groups): (codes, scale, zero point), all in x's dtype, the codes whole numbers in [0, 2**bits - 1],
    scale and zero point (the group's minimum) rounded to fp16 as stored, kept as size-1 ``dim``.
    x is code * scale + zero point, give or take half a scale."""
    levels = 2**bits - 1
    low = x.amin(dim, keepdim=True).half().to(x.dtype)
    scale = ((x.amax(dim, keepdim=True) - low) / levels).clamp(min=1e-6).half().to(x.dtype)
    return torch.minimum(((x - low) / scale).round().clamp(min=0), torch.as_tensor(levels, dtype=x.dtype)), scale, low


def fake_quantize(x: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """``x`` through quantize_groups and back, dequantized in x's dtype."""
    codes, scale, low = quantize_groups(x, bits, dim)
    return codes * scale + low


def channel_stats(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, head, channel) mean of the keys over tokens and the absolute maximum around
    it, in fp16 as stored. Keys carry large per-channel offsets (outlier channels of one sign):
    with them removed, every channel of a token shares one range."""
    mean = keys.mean(dim=2, keepdim=True).half().to(keys.dtype)
    scale = (keys - mean).abs().amax(dim=2, keepdim=True).clamp(min=1e-4).half().to(keys.dtype)
    return mean, scale


CHANNEL_STATS_BYTES = 2 * FP16_BYTES  # per channel and head: the mean and the scale


ROTATION_SEED = 0
_rotations: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def rotation(dim: int, device, dtype) -> torch.Tensor:
    """A fixed random orthogonal (dim, dim) matrix (Q of the QR of a seeded Gaussian, in float64)."""
    key = (dim, torch.device(device), dtype)
    if key not in _rotations:
        gaussian = torch.randn(dim, dim, generator=torch.Generator().manual_seed(ROTATION_SEED), dtype=torch.float64)
        _rotations[key] = torch.linalg.qr(gaussian)[0].to(device=device, dtype=dtype)
    return _rotations[key]


LEVELS = ("uniform", "gaussian", "symmetric")
GAUSSIAN_SAMPLES = 4096  # seeded Gaussian groups the levels are fitted on


_gaussian_levels: dict[tuple[int, int], torch.Tensor | None] = {}


def gaussian_levels(dim: int, bits: int) -> torch.Tensor | None:
    """The 2**bits levels (float64, ascending) that minimise the mean squared error of a group of
    ``dim`` Gaussian entries stored as its mean, its RMS around the mean (fp16 each: the bytes of
    a scale and a zero point) and each entry's nearest level times the RMS plus the mean
    (Lloyd-Max's quantizer, fitted by Lloyd's iterations on seeded Gaussian groups); None where
    min-max uniform levels err less on the same groups (from 4 bits on a 64-dim group: the min and
    max pin a short group's tails better than a fixed codebook does). A rotated group's entries
    are near Gaussian (a random rotation mixes every dimension into each), the reason QuIP#'s and
    NF4's codebooks fit rotated or normal weights; here it is KV's per-token groups."""
    key = (dim, bits)
    if key not in _gaussian_levels:
        groups = torch.randn(GAUSSIAN_SAMPLES, dim, generator=torch.Generator().manual_seed(ROTATION_SEED),
                             dtype=torch.float64)
        mean, rms = _mean_and_rms(groups)
        entries = ((groups - mean) / rms).flatten()
        count = 2**bits
        levels = torch.quantile(entries, (torch.arange(count, dtype=torch.float64) + 0.5) / count)
        for _ in range(100):
            nearest = _nearest(entries, levels)
            levels = torch.zeros(count, dtype=torch.float64).index_add_(0, nearest, entries) / torch.bincount(
                nearest, minlength=count).clamp(min=1)
            levels = (levels - levels.flip(0)) / 2  # the normal law is symmetric: so are its levels
        # Lloyd's levels are the cells' means, so a stored entry shrinks toward the mean by the error's
        # share of the variance, the same way in every token: an attention output, which averages many
        # tokens' values, would shrink with them. Stretched by E[x^2] / E[x Q(x)], the error is
        # uncorrelated with the entry (as rounding's is), and averages out over the tokens
        stored = levels[_nearest(entries, levels)]
        levels = levels * (entries**2).mean() / (entries * stored).mean()
        error = ((levels[_nearest(entries, levels)] - entries) ** 2).mean() * (rms**2).mean()
        uniform_error = ((fake_quantize(groups, bits) - groups) ** 2).mean()
        _gaussian_levels[key] = levels if error < uniform_error else None
    return _gaussian_levels[key]


def _mean_and_rms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group along the last dim: the mean and the RMS around it, rounded to fp16 as stored."""
    mean = x.mean(-1, keepdim=True).half().to(x.dtype)
    rms = ((x - mean) ** 2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6).half().to(x.dtype)
    return mean, rms


def _nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The index of each entry's nearest level (``levels`` ascending): bisection at the midpoints."""
    return torch.bucketize(x, (levels[1:] + levels[:-1]) / 2)


def symmetric_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` with one group per slice along the last dim, dequantized from ``bits``-bit codes on
    levels symmetric about zero, (k + 1/2) * scale for k in [-2**(bits-1), 2**(bits-1) - 1], the
    outermost at the group's largest magnitude: one fp16 scale per group and no zero point. A
    rotated group's entries are near zero-mean (the rotation spreads the vector's mean over every
    entry, and a group's mean over d entries shrinks as 1 / sqrt(d) of its spread), so the zero
    point's 2 bytes buy little: at 2 bits on a 64-entry group they are a tenth of its bytes."""
    half = 2 ** (bits - 1)
    scale = (x.abs().amax(-1, keepdim=True) / (half - 0.5)).clamp(min=1e-6).half().to(x.dtype)
    return ((x / scale).floor().clamp(-half, half - 1) + 0.5) * scale


def level_quantize(x: torch.Tensor, bits: int, levels: str = "uniform") -> torch.Tensor:
    """``x`` with one group per slice along the last dim, dequantized: min-max uniform levels
    (``fake_quantize``), with ``levels="gaussian"`` ``gaussian_levels`` where they err less, with
    ``levels="symmetric"`` ``symmetric_quantize``."""
    if levels == "symmetric":
        return symmetric_quantize(x, bits)
    table = gaussian_levels(x.shape[-1], bits) if levels == "gaussian" else None
    if table is None:
        return fake_quantize(x, bits)
    mean, rms = _mean_and_rms(x)
    table = table.to(device=x.device, dtype=x.dtype)
    return table[_nearest((x - mean) / rms, table)] * rms + mean


def check_levels(levels: str, rotate: bool) -> None:
    """A press's ``levels`` setting: "uniform", or "gaussian" / "symmetric" on rotated groups (unrotated
    ones are neither near Gaussian nor centred on zero)."""
    if levels not in LEVELS:
        raise PressConfigError(f"levels must be one of {', '.join(LEVELS)}, got {levels!r}")
    if levels != "uniform" and not rotate:
        raise PressConfigError(f"levels={levels!r} fits rotated groups (near Gaussian, centred on zero): use rotate=True")


def quantize_per_token(x: torch.Tensor, bits: int, stats: tuple[torch.Tensor, torch.Tensor] | None = None,
                       rotate: bool = False, levels: str = "uniform") -> torch.Tensor:
    """(batch, heads, tokens, dim): one group per token and head; with ``stats``
    (channel_stats) each channel is centred and scaled first, and restored after; with ``rotate``
    the group is quantized in the basis of ``rotation`` (see the module docstring), with
    ``levels="gaussian"`` (rotated groups only) to ``gaussian_levels``."""
    mean, scale = stats if stats is not None else (0.0, 1.0)
    x = (x - mean) / scale
    if rotate:
        turn = rotation(x.shape[-1], x.device, x.dtype)
        quantized = level_quantize(x @ turn, bits, levels) @ turn.T
    else:
        quantized = fake_quantize(x, bits)
    return quantized * scale + mean


def quantize_per_channel(x: torch.Tensor, bits: int | torch.Tensor, group_tokens: int) -> torch.Tensor:
    """(batch, heads, tokens, dim): one group per channel and head over each ``group_tokens``
    consecutive tokens; the tokens past the last whole group are left as they are (fp16).
    ``bits``: one width, or (batch, heads, dim) widths per channel (``query_weighted_widths``); a
    channel of width 0 stores no codes, its group's zero point holding the group's mean."""
    whole = x.shape[2] // group_tokens * group_tokens
    if whole == 0:
        return x
    b, h, _, d = x.shape
    grouped = x[:, :, :whole].reshape(b, h, whole // group_tokens, group_tokens, d)
    if isinstance(bits, int):
        quantized = fake_quantize(grouped, bits, dim=3)
    else:
        widths = bits.view(b, h, 1, 1, d)
        quantized = torch.where(widths == 0, grouped.mean(3, keepdim=True).half().to(x.dtype),
                                fake_quantize(grouped, widths.clamp(min=1), dim=3))
    return torch.cat([quantized.reshape(b, h, whole, d), x[:, :, whole:]], dim=2)


CHANNEL_WIDTHS = (0, 2, 3, 4, 5, 6, 7, 8)  # 1 bit (a group's minimum or maximum) does worse than its mean
WIDTH_TABLE_BITS = 3  # per channel and head, per average width: which of CHANNEL_WIDTHS it takes


def check_channel_widths(channel_widths: str, key_layout: str) -> None:
    """A press's ``channel_widths`` setting: "uniform", or "query" (``query_weighted_widths``) with KIVI's key layout."""
    if channel_widths not in ("uniform", "query"):
        raise PressConfigError(f"channel_widths must be 'uniform' or 'query', got {channel_widths!r}")
    if channel_widths == "query" and key_layout != "channel":
        raise PressConfigError("channel_widths='query' sets the widths of KIVI's key channels: use key_layout='channel'")


def query_weighted_widths(keys: torch.Tensor, queries: torch.Tensor, bits: int, group_tokens: int) -> torch.Tensor:
    """(batch, kv_heads, dim) key channel widths from CHANNEL_WIDTHS, at most dim * ``bits`` bits per
    head, that minimise the expected squared logit error of KIVI's per-channel groups (ours).

    A key error dk_c in channel c moves a logit by q_c dk_c, so channel c weighs w_c = E[q_c^2],
    the mean over ``queries`` (batch, heads, q, dim; the prefill's, rotated as attention sees them)
    summed over the query heads sharing the KV head. A group of range R quantized to b bits errs
    by R^2 / (12 (2^b - 1)^2) in the mean square, at 0 bits (the group's mean) by the group's
    variance: the widths minimising sum_c w_c D_c(b_c) + lambda * b_c, for the smallest lambda
    that fits the bits (bisection per head), are reverse water-filling over the channels.
    ``keys`` (batch, kv_heads, tokens, dim): the whole groups in cache order give R and the
    variance; with no whole group every channel takes ``bits``."""
    b, kv_heads, tokens, d = keys.shape
    whole = tokens // group_tokens * group_tokens
    if whole == 0:
        return torch.full((b, kv_heads, d), bits, dtype=torch.long, device=keys.device)
    grouped = keys[:, :, :whole].float().reshape(b, kv_heads, whole // group_tokens, group_tokens, d)
    spread = ((grouped.amax(3) - grouped.amin(3)) ** 2).mean(2)  # (b, kv_heads, d)
    variance = grouped.var(3, correction=0).mean(2)
    weight = (queries.float() ** 2).mean(2).view(b, kv_heads, -1, d).sum(2)
    widths = torch.tensor(CHANNEL_WIDTHS, device=keys.device, dtype=torch.float32)
    error = torch.where(widths == 0, variance.unsqueeze(-1),
                        spread.unsqueeze(-1) / (12 * (2**widths - 1).clamp(min=1) ** 2))
    distortion = weight.unsqueeze(-1) * error  # (b, kv_heads, d, widths)
    scale = distortion.mean().clamp(min=1e-30).log()
    low, high = torch.full((b, kv_heads, 1, 1), -60.0, device=keys.device) + scale, torch.full((b, kv_heads, 1, 1), 60.0, device=keys.device) + scale
    for _ in range(50):  # the smallest log lambda whose widths fit, per head
        middle = (low + high) / 2
        fits = widths[(distortion + middle.exp() * widths).argmin(-1)].sum(-1, keepdim=True).unsqueeze(-1) <= d * bits
        high, low = torch.where(fits, middle, high), torch.where(fits, low, middle)
    return widths[(distortion + high.exp() * widths).argmin(-1)].long()


def token_bytes(bits: int, head_dim: int, levels: str = "uniform") -> float:
    """Bytes one token's key or value of one head takes: fp16 at 16 bits, else packed integers
    and the group's scale and zero point (``levels="symmetric"``: its scale only)."""
    if bits >= 16:
        return FP16_BYTES * head_dim
    return head_dim * bits / 8 + (FP16_BYTES if levels == "symmetric" else GROUP_SIDE_BYTES)


def per_channel_bytes(tokens: int, bits: int, head_dim: int, group_tokens: int) -> float:
    """Bytes of one head's keys over ``tokens`` tokens in KIVI's per-channel layout."""
    groups, rest = divmod(tokens, group_tokens)
    return groups * head_dim * (group_tokens * bits / 8 + GROUP_SIDE_BYTES) + rest * FP16_BYTES * head_dim


def quantized_head_bytes(tokens: int, bits: int, head_dim: int, key_layout: str, group_tokens: int,
                         levels: str = "uniform") -> float:
    """Bytes of one head's keys and values over ``tokens`` tokens, every one quantized to
    ``bits``: values per token; keys per channel in groups of ``group_tokens`` (``"channel"``,
    KIVI) or per token with their channel statistics (``"token"``); per-token groups at ``levels``."""
    if key_layout == "channel":
        key_bytes = per_channel_bytes(tokens, bits, head_dim, group_tokens)
    else:
        key_bytes = tokens * token_bytes(bits, head_dim, levels) + CHANNEL_STATS_BYTES * head_dim
    return key_bytes + tokens * token_bytes(bits, head_dim, levels)
