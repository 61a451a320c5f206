"""GPT-NeoX (Pythia) support for kvpress. Importing this package applies the patches once.

``require_supported(model)`` is the one place that decides whether a model can be pressed:
the Llama-family models kvpress supports, plus GPT-NeoX through ``patches.gpt_neox``.
"""

import kvpress
from kvpress.presses import base_press
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXForCausalLM

from patches import attention_mask, flex_attention, gpt_neox, pipeline_bos

SUPPORTED_MODELS = (GPTNeoXForCausalLM, *base_press.SUPPORTED_MODELS)


class UnsupportedModelError(ValueError):
    pass


def require_supported(model) -> None:
    """Raise a one-line error naming the supported architectures if ``model`` (a model, or a model
    class, to check before the weights load) is not one."""
    model_class = model if isinstance(model, type) else type(model)
    if not issubclass(model_class, SUPPORTED_MODELS):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_MODELS)
        raise UnsupportedModelError(f"{model_class.__name__} is not supported; supported architectures: {names}")


def apply() -> None:
    """Apply the GPT-NeoX patches and register GPT-NeoX with kvpress (idempotent)."""
    gpt_neox.apply()
    flex_attention.apply()
    attention_mask.apply()
    pipeline_bos.apply()  # a tokenizer without BOS: one line saying what to set
    # kvpress warns "not tested" for models outside this tuple; Pythia is now supported.
    base_press.SUPPORTED_MODELS = SUPPORTED_MODELS
    kvpress.SUPPORTED_MODELS = SUPPORTED_MODELS


apply()
