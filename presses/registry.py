"""Every press by a short name, built from one compression ratio.

The CLI (``evaluation/perplexity.py --press NAME``) and the tests go through ``make_press``,
so a name added here is runnable everywhere. kvpress presses are used as shipped; the
GPT-NeoX support they need lives in ``patches/``.
"""

from typing import Callable

import kvpress
from kvpress import BasePress

PressFactory = Callable[[float], BasePress]

PRESSES: dict[str, PressFactory] = {
    # kvpress 0.5.5, scoring rules applied once after prefill
    "snapkv": lambda ratio: kvpress.SnapKVPress(compression_ratio=ratio),
    "pyramidkv": lambda ratio: kvpress.PyramidKVPress(compression_ratio=ratio),
    "streaming_llm": lambda ratio: kvpress.StreamingLLMPress(compression_ratio=ratio),
    "knorm": lambda ratio: kvpress.KnormPress(compression_ratio=ratio),
    "tova": lambda ratio: kvpress.TOVAPress(compression_ratio=ratio),
    "observed_attention": lambda ratio: kvpress.ObservedAttentionPress(compression_ratio=ratio),
    "expected_attention": lambda ratio: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
    "random": lambda ratio: kvpress.RandomPress(compression_ratio=ratio, seed=0),
    "keydiff": lambda ratio: kvpress.KeyDiffPress(compression_ratio=ratio),
    "lagkv": lambda ratio: kvpress.LagKVPress(compression_ratio=ratio),
}

# Presses whose scores need the attention weights: the model must run with eager attention.
NEEDS_EAGER_ATTENTION = {"observed_attention"}


class PressConfigError(ValueError):
    """A press name or setting the user gave cannot be used."""


def press_names() -> list[str]:
    return sorted(PRESSES)


def check_compression_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise PressConfigError(f"compression ratio must be in [0, 1), got {ratio}")


def make_press(name: str, compression_ratio: float) -> BasePress:
    """Build the press registered as ``name`` at ``compression_ratio`` (fraction of KV pairs removed)."""
    if name not in PRESSES:
        raise PressConfigError(f"unknown press {name!r}; known presses: {', '.join(press_names())}")
    check_compression_ratio(compression_ratio)
    return PRESSES[name](compression_ratio)
