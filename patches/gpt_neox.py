"""Make KVPress presses run on GPT-NeoX (Pythia) exactly as they run on Llama.

kvpress 0.5.5 assumes the Llama layout: the decoder at ``model.model`` with the token
embedding at ``embed_tokens``, attention at ``layer.self_attn`` called with ``hidden_states=``
and ``past_key_values=``, separate ``q_proj``/``k_proj``/``o_proj``, ``module.head_dim``,
``config.num_key_value_heads``, and a RoPE that rotates the full head with Llama's
``rotate_half`` (dim i paired with i + head_dim/2). GPT-NeoX differs on every point:
``model.gpt_neox`` with ``embed_in``, ``layer.attention`` called with ``layer_past=``, one
fused ``query_key_value`` projection whose output is laid out per head as [q | k | v], and a
partial rotary that turns only the first ``rotary_ndims`` dims of each head (``rotary_pct`` =
0.25 in Pythia), pairing dim i with i + rotary_ndims/2.

The rotary mismatch is the subtle one: presses such as SnapKV rebuild post-RoPE queries with
Llama's formula, which cannot express NeoX's pairing. We therefore run GPT-NeoX attention in a
reordered head basis (``to_kvpress_order``): each head's q/k dims are permuted so that NeoX's
rotary pairs land at (i, i + head_dim/2), and the pass-through dims get rotary frequency 0
(cos 1, sin 0). In that basis NeoX's partial rotary *is* a full-width Llama rotary, elementwise
the same arithmetic. Attention scores q.k are unchanged by a common permutation of q and k, so
the model computes the same function; the difference is that the KV cache holds keys in the
reordered basis, and every press sees consistent queries, keys and cos/sin.

``apply()`` installs all of this on the transformers classes (idempotent); ``revert()`` undoes
it (used by tests to compare against the untouched implementation). Models must be built
after ``apply()``: the rotary frequencies are padded when the rotary module is created.
"""

import functools

import torch
from torch import nn
from transformers.models.gpt_neox import modeling_gpt_neox as neox
from transformers.models.gpt_neox.configuration_gpt_neox import GPTNeoXConfig

from patches.attention_mask import fit_mask_to_keys

_ORIGINALS = {}  # (owner, attribute name) -> the attribute before apply(); empty when not applied


def to_kvpress_order(x: torch.Tensor, rotary_ndims: int) -> torch.Tensor:
    """Reorder the last (head) dim of NeoX queries/keys into the basis kvpress expects.

    Layout: [rotary first half | pass-through | rotary second half | pass-through], so NeoX's
    rotary pair (i, i + rotary_ndims/2) sits at (i, i + head_dim/2).
    """
    head_dim = x.shape[-1]
    if head_dim % 2 or rotary_ndims % 2:
        raise ValueError(f"GPT-NeoX patch needs even head_dim and rotary_ndims, got {head_dim}, {rotary_ndims}")
    rot_half = rotary_ndims // 2
    pass_end = rotary_ndims + head_dim // 2 - rot_half
    return torch.cat(
        [x[..., :rot_half], x[..., rotary_ndims:pass_end], x[..., rot_half:rotary_ndims], x[..., pass_end:]], dim=-1
    )


@functools.lru_cache(maxsize=None)
def _order_index(head_dim: int, rotary_ndims: int, device: torch.device) -> torch.Tensor:
    # Built once per device so the decode step does one gather, with no host-to-device copy.
    return to_kvpress_order(torch.arange(head_dim), rotary_ndims).to(device)


def split_qkv(module: nn.Module, hidden_states: torch.Tensor):
    """Pre-RoPE queries, keys and values of a GPT-NeoX attention module, each (batch, heads,
    seq, head_dim); queries and keys in the reordered basis, values in NeoX's own order."""
    return qkv_heads(module, module.query_key_value(hidden_states))


def qkv_heads(module: nn.Module, qkv: torch.Tensor):
    """``split_qkv`` from the output of the module's ``query_key_value`` projection (batch, seq,
    3 * hidden), however it was computed (decoding/fused_projections.py: one GEMM with the MLP's)."""
    batch, seq, _ = qkv.shape
    qkv = qkv.view(batch, seq, -1, 3, module.head_size).transpose(1, 2)
    order = _order_index(module.head_size, module.rotary_ndims, qkv.device)
    query_key = qkv[..., :2, :].index_select(-1, order)
    return query_key[..., 0, :], query_key[..., 1, :], qkv[..., 2, :]


def _attention_forward(
    self,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    past_key_values=None,
    cache_position: torch.LongTensor | None = None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
):
    """GPT-NeoX attention in the reordered basis, with Llama's call convention."""
    cos, sin = position_embeddings
    if cos.shape[-1] != self.head_size:
        raise RuntimeError(
            "This GPT-NeoX model was built before the kvpress-neox patches were applied: "
            "`import presses` (or `import patches`) before loading the model."
        )
    query, key, value = split_qkv(self, hidden_states)
    query, key = neox.apply_rotary_pos_emb(query, key, cos, sin)
    if past_key_values is not None:
        cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
        key, value = past_key_values.update(key, value, self.layer_idx, cache_kwargs)

    attention_interface = neox.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, neox.eager_attention_forward
    )
    attn_output, attn_weights = attention_interface(
        self,
        query,
        key,
        value,
        fit_mask_to_keys(attention_mask, key.shape[-2]),  # eager is not among the functions attention_mask wraps
        scaling=self.scaling,
        dropout=0.0 if not self.training else self.attention_dropout,
        **kwargs,
    )
    attn_output = self.dense(attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous())
    return attn_output, attn_weights


def _attention_call(self, hidden_states, layer_past=None, **kwargs):
    # GPTNeoXLayer calls attention(hidden_states, layer_past=cache, ...); kvpress hooks read
    # kwargs["hidden_states"] and kwargs["past_key_values"]. Hooks see the kwargs passed to
    # __call__, so the convention is translated here, before the hooks run.
    return nn.Module.__call__(self, hidden_states=hidden_states, past_key_values=layer_past, **kwargs)


def _fused_projection(index: int) -> property:
    """Stand-in for Llama's q_proj (0), k_proj (1) or v_proj (2): hidden states ->
    (batch, seq, heads * head_dim), sliced from the fused projection (q, k reordered)."""

    def projection(self):
        return lambda hidden_states: split_qkv(self, hidden_states)[index].transpose(1, 2).flatten(2)

    return property(projection)


def _padded_rope_parameters(config=None, device=None, seq_len=None):
    """NeoX's inverse frequencies padded with zeros to head_dim/2: frequency 0 leaves the
    pass-through dims unrotated (cos 1, sin 0) in the full-width rotary."""
    inv_freq, attention_factor = _ORIGINALS[(neox.GPTNeoXRotaryEmbedding, "compute_default_rope_parameters")](
        config, device, seq_len
    )
    head_dim = config.hidden_size // config.num_attention_heads
    padding = torch.zeros(head_dim // 2 - inv_freq.shape[0], dtype=inv_freq.dtype, device=inv_freq.device)
    return torch.cat([inv_freq, padding]), attention_factor


def _replacements() -> dict:
    return {
        (neox.GPTNeoXForCausalLM, "model"): property(lambda self: self.gpt_neox),
        # FinchPress hooks model.model.embed_tokens; KVgradPress embeds through it.
        (neox.GPTNeoXModel, "embed_tokens"): property(lambda self: self.embed_in),
        (neox.GPTNeoXLayer, "self_attn"): property(lambda self: self.attention),
        (neox.GPTNeoXAttention, "forward"): _attention_forward,
        (neox.GPTNeoXAttention, "__call__"): _attention_call,
        (neox.GPTNeoXAttention, "head_dim"): property(lambda self: self.head_size),
        (neox.GPTNeoXAttention, "num_key_value_groups"): property(lambda self: 1),
        (neox.GPTNeoXAttention, "q_proj"): _fused_projection(0),
        (neox.GPTNeoXAttention, "k_proj"): _fused_projection(1),
        (neox.GPTNeoXAttention, "v_proj"): _fused_projection(2),
        (neox.GPTNeoXAttention, "o_proj"): property(lambda self: self.dense),
        (neox.GPTNeoXRotaryEmbedding, "compute_default_rope_parameters"): staticmethod(_padded_rope_parameters),
        (GPTNeoXConfig, "head_dim"): property(lambda self: self.hidden_size // self.num_attention_heads),
        (GPTNeoXConfig, "attribute_map"): {**GPTNeoXConfig.attribute_map, "num_key_value_heads": "num_attention_heads"},
    }


_MISSING = object()


def apply() -> None:
    """Install the GPT-NeoX patches on the transformers classes; a second call does nothing."""
    if _ORIGINALS:
        return
    for (owner, name), replacement in _replacements().items():
        _ORIGINALS[(owner, name)] = owner.__dict__.get(name, _MISSING)
        setattr(owner, name, replacement)


def revert() -> None:
    """Restore the transformers classes as they were before ``apply()``."""
    for (owner, name), original in _ORIGINALS.items():
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _ORIGINALS.clear()


def is_applied() -> bool:
    return bool(_ORIGINALS)
