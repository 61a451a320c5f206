"""FlexAttention under kvpress.

kvpress wraps every registered attention function as ``wrapper(module, query, key, value,
attention_mask, dropout, **kwargs)`` and hands ``dropout`` on positionally. transformers'
``flex_attention_forward`` has ``scaling`` in that slot and also gets ``scaling=`` by keyword, so
with kvpress 0.5.5 imported every forward with ``attn_implementation="flex_attention"`` fails
("got multiple values for argument 'scaling'"). Flex attention is registered again as kvpress's
wrapper around a function that takes ``dropout`` positionally and passes it on by keyword.

Off the CPU, ``flex_attention_forward`` also returns the log-sum-exp (batch, heads, queries) in the
slot of the attention weights. kvpress presses read that slot as attention probabilities (SnapKV
takes its window's scores from it when given), so there it failed on its shape ("shape
'[1, 32, 1, 1936]' is invalid") or would score with the wrong numbers. The adapter returns no
weights, as SDPA does: presses then compute the scores they need themselves.
"""

from kvpress.attention_patch import attention_patch
from transformers.integrations.flex_attention import flex_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "flex_attention"


def flex_attention_taking_dropout(module, query, key, value, attention_mask, dropout=0.0, **kwargs):
    output, _log_sum_exp = flex_attention_forward(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
    return output, None


def apply() -> None:
    """Re-register flex attention (before patches.attention_mask wraps every function)."""
    ALL_ATTENTION_FUNCTIONS[NAME] = attention_patch(flex_attention_taking_dropout)
