"""Attention masks for caches whose layers hold different numbers of tokens.

Transformers builds one attention mask per forward pass from layer 0's cache length. Presses
such as PyramidKV leave each layer with its own length, and eager / SDPA attention then fails on
a shape mismatch (kvpress only supports this with flash attention, which takes no mask). The
mask's last q columns are the new tokens' causal block; the columns before them are cached keys,
which an unpadded sequence sees in full. So a layer's mask is rebuilt at its own key length:
all-visible past, then the same causal block.
"""

import functools

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama

_WRAPPED = "_kvpress_neox_fits_mask"


def fit_mask_to_keys(attention_mask: torch.Tensor | None, key_length: int) -> torch.Tensor | None:
    if attention_mask is None or attention_mask.shape[-1] == key_length:
        return attention_mask
    queries = attention_mask.shape[-2]
    past = attention_mask[..., :-queries]
    visible = torch.ones((), dtype=torch.bool) if attention_mask.dtype == torch.bool else torch.zeros(())
    visible = visible.to(attention_mask.device, attention_mask.dtype)
    if key_length < queries or not bool((past == visible).all()):
        raise ValueError(
            "layers hold different cache lengths and the batch is padded: eager/SDPA attention cannot "
            "rebuild the mask; use an unpadded batch or --attn_implementation flash_attention_2"
        )
    new_past = visible.expand(*attention_mask.shape[:-1], key_length - queries)
    return torch.cat([new_past, attention_mask[..., -queries:]], dim=-1)


def _fitting_mask(attention_function):
    @functools.wraps(attention_function)
    def wrapper(module, query, key, value, attention_mask, *args, **kwargs):
        return attention_function(module, query, key, value, fit_mask_to_keys(attention_mask, key.shape[-2]),
                                  *args, **kwargs)

    setattr(wrapper, _WRAPPED, True)
    return wrapper


def apply() -> None:
    """Wrap every registered attention function (SDPA, flash, flex, ...) once, and Llama's eager
    one (the quality stand-in's architecture), which Llama calls by module name, not through
    the registry. GPT-NeoX's eager path goes through gpt_neox.py's attention."""
    for name, function in list(ALL_ATTENTION_FUNCTIONS.items()):
        if not getattr(function, _WRAPPED, False):
            ALL_ATTENTION_FUNCTIONS[name] = _fitting_mask(function)
    if not getattr(modeling_llama.eager_attention_forward, _WRAPPED, False):
        modeling_llama.eager_attention_forward = _fitting_mask(modeling_llama.eager_attention_forward)
