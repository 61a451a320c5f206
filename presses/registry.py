"""Every method by a short name, for both ways of using it.

- ``make_press(name, ratio)``: the prefill press (kvpress style): compress once after prefill,
  removing ``ratio`` of the KV pairs.
- ``make_streaming_press(name, budget)``: the same scoring rule held at ``budget`` tokens while
  text streams in or tokens are decoded (``BudgetPress``), or a method's own streaming press.

The CLI (``evaluation/perplexity.py --press NAME``) and the tests go through these two
functions, so a method added here is runnable everywhere. kvpress presses are used as shipped;
the GPT-NeoX support they need lives in ``patches/``.
"""

from dataclasses import dataclass, replace
from typing import Callable

import kvpress
from kvpress import BasePress, ScorerPress

from presses.budget_press import BudgetPress
from presses.errors import PressConfigError
from presses.h2o_press import H2OPress
from presses.head_merge_press import HeadMergePress
from presses.infllm_press import InfLLMPress
from presses.kvsharer_press import KVSharerPress
from presses.lm_infinite_press import LMInfinitePress
from presses.lowrank_press import LowRankPress
from presses.minicache_press import MiniCachePress
from presses.rdkv_press import RDKVPress
from presses.scissorhands_press import ScissorhandsPress
from presses.treekv_press import TreeKVPress


@dataclass(frozen=True)
class Settings:
    compression_ratio: float = 0.0  # prefill presses: fraction of KV pairs removed
    n_sink: int = 4  # methods that keep the first tokens ("attention sinks")
    window: int = 64  # methods with a recent-token or observation window
    budget: int = 512  # streaming: tokens each layer's cache holds
    compress_every: int = 1  # streaming: evict once this many tokens beyond the budget arrived
    chunk_tokens: int = 1  # streaming: tokens per forward call (queries a scorer sees)


@dataclass(frozen=True)
class Method:
    build: Callable[[Settings], BasePress]  # a ScorerPress, or a press that streams on its own
    prefill: bool = True  # has a compress-once-after-prefill form (else the context streams in)
    positions_in_cache: bool = False  # streaming: positions counted inside the cache (StreamingLLM)
    stream: Callable[[Settings], BasePress] | None = None  # a method's own streaming press, if its rule needs one


def _prefill_only(name: str) -> Callable[[Settings], BasePress]:
    """The streaming form of a method that acts once, after prefill (cross-layer and attention-level methods)."""
    def refuse(settings: Settings) -> BasePress:
        raise PressConfigError(f"{name} compresses the cache once, after prefill: it has no streaming form")
    refuse.prefill_only = True  # press_names(streaming=True) leaves the method out
    return refuse


def _each_of_two(ratio: float) -> float:
    """The ratio each of two composed presses removes so that together they remove ``ratio``."""
    return 1 - (1 - ratio) ** 0.5


PRESSES: dict[str, Method] = {
    # kvpress 0.5.5, used as shipped
    "snapkv": Method(lambda s: kvpress.SnapKVPress(s.compression_ratio, window_size=s.window)),
    "pyramidkv": Method(lambda s: kvpress.PyramidKVPress(s.compression_ratio, window_size=s.window)),
    "streaming_llm": Method(lambda s: kvpress.StreamingLLMPress(s.compression_ratio, n_sink=s.n_sink),
                            positions_in_cache=True),
    "sliding_window": Method(lambda s: kvpress.StreamingLLMPress(s.compression_ratio, n_sink=0),
                             positions_in_cache=True),  # StreamingLLM's control: no sinks
    "knorm": Method(lambda s: kvpress.KnormPress(s.compression_ratio)),
    "tova": Method(lambda s: kvpress.TOVAPress(s.compression_ratio)),
    "observed_attention": Method(lambda s: kvpress.ObservedAttentionPress(s.compression_ratio)),
    "expected_attention": Method(lambda s: kvpress.ExpectedAttentionPress(s.compression_ratio, n_sink=s.n_sink)),
    "random": Method(lambda s: kvpress.RandomPress(s.compression_ratio, seed=0)),
    "keydiff": Method(lambda s: kvpress.KeyDiffPress(s.compression_ratio)),
    "lagkv": Method(lambda s: kvpress.LagKVPress(s.compression_ratio, n_sink=s.n_sink)),
    # this package: scoring rules with memory across steps (observe / keep, see BudgetPress)
    "h2o": Method(lambda s: H2OPress(s.compression_ratio)),
    "scissorhands": Method(lambda s: ScissorhandsPress(s.compression_ratio, history_window=s.window)),
    "treekv": Method(lambda s: TreeKVPress(s.compression_ratio, n_sink=s.n_sink, window=s.window),
                     positions_in_cache=True),
    # this package: cross-layer methods (docs/cross_layer_kv.md). minicache: ratio -> merged pairs
    # round(ratio x layers) from the top (0.25: from the middle layer; at most 0.5); kvsharer: ratio ->
    # shared layers round(ratio x layers), chosen by calibrate(model, ids) first (evaluation/calibration.py).
    "minicache": Method(lambda s: MiniCachePress(s.compression_ratio), stream=_prefill_only("minicache")),
    "kvsharer": Method(lambda s: KVSharerPress(s.compression_ratio), stream=_prefill_only("kvsharer")),
    "kvsharer_similar": Method(lambda s: KVSharerPress(s.compression_ratio, most_similar_first=True),
                               stream=_prefill_only("kvsharer_similar")),  # control: most similar pairs first
    # combinations: each part removes 1 - sqrt(1 - ratio), so together they remove the ratio
    "kvsharer_snapkv": Method(lambda s: kvpress.ComposedPress([
        KVSharerPress(_each_of_two(s.compression_ratio)),
        kvpress.SnapKVPress(_each_of_two(s.compression_ratio), window_size=s.window)]),
        stream=_prefill_only("kvsharer_snapkv")),
    "streaming_llm_minicache": Method(lambda s: kvpress.ComposedPress([
        kvpress.StreamingLLMPress(_each_of_two(s.compression_ratio), n_sink=s.n_sink),
        MiniCachePress(_each_of_two(s.compression_ratio))]), stream=_prefill_only("streaming_llm_minicache")),
    # this package: methods that stream with their own press
    "lm_infinite": Method(
        lambda s: LMInfinitePress(s.compression_ratio, n_global=s.n_sink),
        stream=lambda s: LMInfinitePress(n_global=s.n_sink, target_size=s.budget, compression_interval=s.compress_every),
    ),
    "infllm": Method(lambda s: InfLLMPress.from_budget(s.budget, n_init=s.n_sink, local=s.window), prefill=False),
    # this package: attention-level methods (ratio: fraction of the KV bytes per token removed)
    # (docs/attention_level_kv.md); lowrank and head_merge need calibrate(model, ids) first (evaluation/calibration.py)
    "lowrank": Method(lambda s: LowRankPress(s.compression_ratio), stream=_prefill_only("lowrank")),
    "lowrank_svd": Method(lambda s: LowRankPress(s.compression_ratio, basis="weights"),
                          stream=_prefill_only("lowrank_svd")),  # plain weight SVD, no calibration
    "head_merge": Method(lambda s: HeadMergePress(s.compression_ratio), stream=_prefill_only("head_merge")),
    "snapkv_lowrank": Method(lambda s: kvpress.ComposedPress([
        kvpress.SnapKVPress(_each_of_two(s.compression_ratio), window_size=s.window),
        LowRankPress(_each_of_two(s.compression_ratio))]), stream=_prefill_only("snapkv_lowrank")),
    # this package: ours (ratio: fraction of the fp16 KV bytes removed; tokens kept at 16, 8, 4, 3 or 2 bits or dropped)
    "rdkv": Method(lambda s: RDKVPress(s.compression_ratio), stream=_prefill_only("rdkv")),
}

# Presses whose scores need the attention weights: the model must run with eager attention.
NEEDS_EAGER_ATTENTION = {"observed_attention"}


def press_names(streaming: bool = False) -> list[str]:
    """Every registered name; with ``streaming``, only those that have a streaming form."""
    return sorted(name for name, method in PRESSES.items()
                  if not (streaming and getattr(method.stream, "prefill_only", False)))


def check_compression_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise PressConfigError(f"compression ratio must be in [0, 1), got {ratio}")


def method_for(name: str) -> Method:
    if name not in PRESSES:
        raise PressConfigError(f"unknown press {name!r}; known presses: {', '.join(press_names())}")
    return PRESSES[name]


def make_press(name: str, compression_ratio: float, settings: Settings = Settings()) -> BasePress:
    """The prefill press registered as ``name`` at ``compression_ratio`` (fraction removed)."""
    method = method_for(name)
    check_compression_ratio(compression_ratio)
    if not method.prefill:
        raise PressConfigError(f"{name} only acts while tokens stream in: use --protocol streaming")
    try:
        return method.build(replace(settings, compression_ratio=compression_ratio))
    except ValueError as error:  # a method's own check of its settings (e.g. MiniCache's ratio range)
        raise PressConfigError(f"{name}: {error}") from None


def make_streaming_press(name: str, settings: Settings = Settings()) -> BasePress:
    """``name``'s rule holding each layer's cache at ``settings.budget`` tokens, evicting
    whenever ``settings.compress_every`` tokens beyond the budget have arrived."""
    method = method_for(name)
    if min(settings.budget, settings.compress_every, settings.chunk_tokens) < 1:
        raise PressConfigError(f"--budget {settings.budget}, --compress_every {settings.compress_every}, --chunk_tokens "
                               f"{settings.chunk_tokens}: each must be at least 1")
    if method.stream is not None:
        return method.stream(settings)
    try:
        press = method.build(replace(settings, compression_ratio=0.0))
    except ValueError as error:  # a method's own check of its settings (e.g. InfLLM's block layout)
        raise PressConfigError(f"{name}: {error}") from None
    if getattr(press, "window_size", 0) >= settings.chunk_tokens:
        raise PressConfigError(
            f"{name} scores with the last {press.window_size} queries of each call: stream in chunks of more "
            f"tokens (--chunk_tokens) or use a smaller --window"
        )
    if not isinstance(press, ScorerPress):
        return press
    return BudgetPress(press, compression_interval=settings.compress_every, target_size=settings.budget,
                       positions_in_cache=method.positions_in_cache)
