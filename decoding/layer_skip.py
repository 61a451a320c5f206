"""The model with some decoder layers skipped: the draft of layer-skipping self-speculation
(Draft & Verify, Zhang et al. 2024, arXiv:2309.08168; SWIFT, Xia et al. 2025, arXiv:2410.06916).

``skipping_model`` is a view of the model that runs only the kept layers and shares every
weight. ``choose_skip_layers`` picks the layers without training, on a calibration text:
greedily, one layer at a time, it skips the layer whose removal keeps the most next-token
argmaxes equal to the full model's (what greedy acceptance needs), ties broken by the lower
KL divergence from the full model's distribution. Draft & Verify searches its layer set by
Bayesian optimisation and SWIFT by random search with acceptance-driven updates; the greedy
search is a simpler training-free stand-in for both, and says what it chose.
"""

import copy

import torch
from torch import nn


def skipping_model(model: nn.Module, skip: list[int]) -> nn.Module:
    """A shallow copy of ``model`` whose decoder runs every layer except those in ``skip``.
    Layers keep their ``layer_idx``, so a kept layer reads and writes its own slot of a cache
    shared with the full model; skipped layers' cache entries are neither read nor written."""
    prefix = model.base_model_prefix  # "gpt_neox" for Pythia, "model" for Llama
    base = getattr(model, prefix)
    view_base = copy.copy(base)
    view_base._modules = dict(base._modules)  # a new module table: the original keeps all layers
    view_base.layers = nn.ModuleList([layer for index, layer in enumerate(base.layers) if index not in skip])
    view = copy.copy(model)
    view._modules = dict(model._modules)
    setattr(view, prefix, view_base)
    return view


@torch.no_grad()
def _agreement_and_kl(model, ids: torch.Tensor, reference_top1: torch.Tensor, reference_logp: torch.Tensor):
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    agreement = (logp.argmax(-1) == reference_top1).float().mean().item()
    kl = (reference_logp.exp() * (reference_logp - logp)).sum(-1).mean().item()
    return agreement, kl


@torch.no_grad()
def choose_skip_layers(model, calibration_ids: torch.Tensor, count: int) -> tuple[list[int], list[dict]]:
    """Greedily choose ``count`` layers to skip on ``calibration_ids`` (1, length), one
    teacher-forced pass per candidate. Returns the sorted layers and, for each greedy step, the
    layer added with the top-1 agreement and KL of the model skipping the layers so far."""
    layers = len(getattr(model, model.base_model_prefix).layers)
    if not 0 < count < layers:
        raise ValueError(f"can skip 1 to {layers - 1} of {layers} layers, not {count}")
    reference_logp = model(input_ids=calibration_ids).logits[0].float().log_softmax(-1)
    reference_top1 = reference_logp.argmax(-1)
    skip, history = [], []
    for _ in range(count):
        best = None
        for layer in range(layers):
            if layer in skip:
                continue
            agreement, kl = _agreement_and_kl(skipping_model(model, skip + [layer]), calibration_ids,
                                              reference_top1, reference_logp)
            if best is None or (agreement, -kl) > (best[1], -best[2]):
                best = (layer, agreement, kl)
        skip.append(best[0])
        history.append({"added_layer": best[0], "top1_agreement": best[1], "kl": best[2]})
    return sorted(skip), history
