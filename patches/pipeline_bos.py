"""kvpress's pipeline with a tokenizer that has no BOS token.

Without a chat template, ``KVPressTextGenerationPipeline.preprocess`` prepends
``tokenizer.bos_token`` to the context; a tokenizer whose ``bos_token`` is None (a
``PreTrainedTokenizerFast`` built from a bare tokenizer.json, some hub tokenizers) fails there
with ``TypeError: unsupported operand type(s) for +: 'NoneType' and 'str'``. The check below
raises one line saying what to set instead. Pythia's BOS is ``<|endoftext|>`` (id 0), as
``evaluation.models.offline_tokenizer`` sets it.
"""

from kvpress.pipeline import KVPressTextGenerationPipeline


class MissingBosTokenError(ValueError):
    """The pipeline's tokenizer has neither a BOS token nor a chat template."""


def check_bos_token(tokenizer) -> None:
    if tokenizer.chat_template is None and getattr(tokenizer, "bos_token", None) is None:
        raise MissingBosTokenError(
            f"{type(tokenizer).__name__} has no BOS token and no chat template; kvpress's pipeline starts the context "
            "with tokenizer.bos_token: set it (Pythia / GPT-NeoX: tokenizer.bos_token = '<|endoftext|>') or give the "
            "tokenizer a chat template"
        )


def apply() -> None:
    """Check the tokenizer before kvpress's preprocess runs (idempotent)."""
    original = KVPressTextGenerationPipeline.preprocess
    if getattr(original, "checks_bos_token", False):
        return

    def preprocess(self, *args, **kwargs):
        check_bos_token(self.tokenizer)
        return original(self, *args, **kwargs)

    preprocess.checks_bos_token = True
    KVPressTextGenerationPipeline.preprocess = preprocess
