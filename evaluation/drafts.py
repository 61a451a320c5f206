"""The drafts of speculative decoding by spec (``--speculative``, evaluation/speculative.py): the
spec's key=value language (a draft model, the target with a pressed cache, or the target skipping
layers chosen on a calibration text) and the draft object each names (decoding/speculative.py)."""

import re
import sys
from dataclasses import dataclass, field

import torch

from decoding.layer_skip import choose_skip_layers
from decoding.speculative import LayerSkipDraft, ModelDraft
from evaluation.data import DataError, load_text
from evaluation.models import load_model
from presses import PressConfigError, Settings, make_press, press_names
from presses.registry import method_for

LAYER_SKIP = "layer_skip"
ADAPTIVE_START = 4


class SpecError(ValueError):
    """A --speculative spec or setting that cannot be used."""


@dataclass
class Spec:
    text: str
    kind: str  # "model", "press" or "layer_skip"
    draft: str | None = None  # draft model name, or the press name for kind "press"
    budget: int = 256
    k: int = 4
    adaptive: bool = False
    k_max: int = 8
    skip: int | None = None
    layers: list[int] = field(default_factory=list)


def _int(key: str, value: str, low: int = 1) -> int:
    if not re.fullmatch(r"\d+", value) or int(value) < low:
        raise SpecError(f"{key} must be an integer >= {low}, got {value!r}")
    return int(value)


def parse_spec(text: str) -> Spec:
    """'draft=EleutherAI/pythia-160m,k=4' -> Spec; raises SpecError with one line."""
    pairs = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise SpecError(f"--speculative {text!r}: expected key=value pairs separated by commas, got {part!r}")
        pairs[key.strip()] = value.strip()
    known = {"draft", "self", "k", "k_max", "budget", "skip", "layers"}
    if set(pairs) - known:
        raise SpecError(f"--speculative {text!r}: unknown key(s) {', '.join(sorted(set(pairs) - known))}; "
                        f"known: {', '.join(sorted(known))}")
    if ("draft" in pairs) == ("self" in pairs):
        raise SpecError(f"--speculative {text!r}: give exactly one of draft=MODEL or self=PRESS|{LAYER_SKIP}")
    if "draft" in pairs:
        spec = Spec(text, "model", pairs["draft"])
    elif pairs["self"] == LAYER_SKIP:
        spec = Spec(text, LAYER_SKIP)
        if ("skip" in pairs) == ("layers" in pairs):
            raise SpecError(f"--speculative {text!r}: {LAYER_SKIP} needs skip=N (chosen on the calibration text) "
                            "or layers=A+B+C, not both")
        if "skip" in pairs:
            spec.skip = _int("skip", pairs["skip"])
        else:
            spec.layers = sorted({_int("layers", layer, 0) for layer in pairs["layers"].split("+")})
    else:
        name = pairs["self"]
        try:
            if not method_for(name).prefill:
                raise SpecError(f"self={name}: this press has no prefill form; use one of {', '.join(press_names())}")
        except PressConfigError as error:
            raise SpecError(f"self={name}: {error}; or self={LAYER_SKIP}") from None
        spec = Spec(text, "press", name)
        if "budget" in pairs:
            spec.budget = _int("budget", pairs["budget"])
    spec.k_max = _int("k_max", pairs.get("k_max", "8"))
    if pairs.get("k") == "adaptive":
        spec.adaptive, spec.k = True, min(ADAPTIVE_START, spec.k_max)
    else:
        spec.k = _int("k", pairs.get("k", "4"))
        if spec.k > spec.k_max:
            spec.k_max = spec.k
    return spec


def calibration_ids(args, loaded) -> tuple[torch.Tensor, str]:
    text, source = load_text(args.calibration, loaded.data_folder,
                             args.calibration_sample if args.calibration == "pg19" else 0)
    ids = loaded.tokenizer()(text, return_tensors="pt").input_ids[0]
    window = ids[args.calibration_offset:args.calibration_offset + args.calibration_tokens]
    if window.numel() < args.calibration_tokens:
        raise DataError(f"{source}: too short for calibration tokens from {args.calibration_offset}")
    return window[None], f"{source} tokens {args.calibration_offset}..{args.calibration_offset + window.numel()}"


def build_draft(spec: Spec, args, loaded, dtype: str, chosen: dict):
    """The draft object and a description of it for the result file. ``chosen`` keeps the
    greedy layer search between specs (run once, for the largest count in ``chosen["largest"]``)."""
    model = loaded.model
    if spec.kind == "model":
        # --random-init (speed stand-in) applies to the draft too: timings only, acceptance meaningless
        draft_model = load_model(spec.draft, args.random_init, dtype, args.device, args.attn_implementation,
                                 args.data_dir).model
        if draft_model.config.vocab_size != model.config.vocab_size:
            raise SpecError(f"draft {spec.draft} has vocabulary {draft_model.config.vocab_size}, the target "
                            f"{model.config.vocab_size}: they must share one tokenizer")
        return ModelDraft(draft_model), {"draft_model": spec.draft}
    if spec.kind == "press":
        ratio = max(0.0, 1.0 - (spec.budget + 0.5) / args.prompt_tokens)  # kvpress keeps int(n * (1 - ratio))
        press = make_press(spec.draft, ratio, Settings(compression_ratio=ratio))
        return ModelDraft(model, press), {"draft_press": spec.draft, "draft_budget_tokens": spec.budget,
                                          "draft_compression_ratio": ratio}
    layers = len(model.model.layers)
    if spec.layers:
        if spec.layers[-1] >= layers or len(spec.layers) >= layers:
            raise SpecError(f"layers={spec.layers}: the model has layers 0..{layers - 1}, at least one must run")
        return LayerSkipDraft(model, spec.layers), {"skipped_layers": spec.layers, "layers": layers}
    if spec.skip >= layers:
        raise SpecError(f"skip={spec.skip}: the model has {layers} layers, at least one must run")
    if len(chosen.get("history", [])) < spec.skip:  # the greedy search once, for the largest count asked
        ids, chosen["source"] = calibration_ids(args, loaded)
        _, chosen["history"] = choose_skip_layers(model, ids.to(model.device), max(spec.skip, chosen["largest"]))
    history = chosen["history"][:spec.skip]  # greedy: the first N steps are the choice for N layers
    skip = sorted(step["added_layer"] for step in history)
    print(f"layer_skip: skipping {skip} (chosen on {chosen['source']})", file=sys.stderr)
    return LayerSkipDraft(model, skip), {"skipped_layers": skip, "layers": layers, "calibration": chosen["source"],
                                         "calibration_greedy_steps": history}
