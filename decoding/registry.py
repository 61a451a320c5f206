"""Every decoder by name: the one list the command lines (evaluation/speed_grid.py and
speculative.py) choose from, and what each name is.

The names are what users type (``--decoder``) and what result files record. Where each lives:

- ``decoding/reference.py``: the kvpress loop (``kvpress``, the reference the fast paths are
  tested against) and transformers' own ``generate`` (the ``hf_*`` baselines);
- ``decoding/static_cache.py``: the pressed cache in a transformers StaticCache, the HF step
  compiled (``static``);
- ``decoding/neox_decode.py``: GPT-NeoX's step written out, one CUDA graph (``neox``);
- ``decoding/speculative.py``: speculative decoding on the cache of ``kvpress``, ``static`` or
  ``neox`` (``Decoder.speculative_cache``).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Decoder:
    name: str
    what: str  # one line, for --help and docs
    where: str  # the function that decodes
    hf_attention: str | None = None  # transformers' generate baselines (dense only): the attention they run
    speculative_cache: str | None = None  # decoding/speculative.py's name for this decoder's cache, if it has one

    @property
    def dense_only(self) -> bool:
        return self.hf_attention is not None


DECODERS = {decoder.name: decoder for decoder in (
    Decoder("hf_eager", "transformers' generate, DynamicCache, eager attention (dense only)",
            "decoding.reference.hf_generate", hf_attention="eager"),
    Decoder("hf_sdpa", "transformers' generate, DynamicCache, SDPA attention (dense only)",
            "decoding.reference.hf_generate", hf_attention="sdpa"),
    Decoder("hf_static", "transformers' generate, StaticCache, compiled by transformers itself (dense only)",
            "decoding.reference.hf_generate", hf_attention="sdpa"),
    Decoder("kvpress", "kvpress's greedy loop: the HF forward per token on the pressed (optionally quantized) "
            "DynamicCache, the reference", "decoding.reference.kvpress_generate", speculative_cache="dynamic"),
    Decoder("static", "the pressed cache moved into a transformers StaticCache, the HF step compiled "
            "(CUDA graphs on a GPU)", "decoding.static_cache.generate", speculative_cache="static"),
    Decoder("neox", "GPT-NeoX's step written out, compiled whole, one CUDA graph per step; any press, ragged caches",
            "decoding.neox_decode.generate", speculative_cache="neox"),
)}
DECODER_NAMES = tuple(DECODERS)
HF_BASELINES = tuple(name for name, decoder in DECODERS.items() if decoder.dense_only)

# Other names a command line accepts for a decoder: evaluation/speculative.py has always called
# the kvpress loop's cache ``dynamic``.
ALIASES = {"dynamic": "kvpress"}
SPECULATIVE_DECODERS = tuple(name for name, decoder in DECODERS.items() if decoder.speculative_cache)


def decoder(name: str) -> Decoder:
    """The decoder called ``name`` (or an alias of it)."""
    name = ALIASES.get(name, name)
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; choose from {', '.join(DECODERS)}")
    return DECODERS[name]


def help_text(names=DECODER_NAMES) -> str:
    """``--decoder`` help: each name and what it is."""
    return "; ".join(f"{name}: {DECODERS[name].what}" for name in names)
