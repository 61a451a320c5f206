"""A run's methods on the model, the same for the quality protocols (evaluation/quality.py) and
the speed grid (evaluation/grid.py): the dense baseline by name, a press's settings from the
options (evaluation/cli.py's ``add_press_settings``), and a press made ready to measure, with the
attention back end it needs set on the model and calibrated if it calibrates."""

import argparse

from evaluation.calibration import calibrated
from evaluation.models import LoadedModel
from presses import NEEDS_EAGER_ATTENTION, Settings

DENSE = "dense"


def press_settings(args: argparse.Namespace, **more) -> Settings:
    """The Settings that --n_sink and --window give, with ``more`` (a program's own settings)."""
    return Settings(n_sink=args.n_sink, window=args.window, **more)


def use_attention_for(model, name: str, requested: str) -> str:
    """Presses that score with attention weights get eager attention; the rest run on the
    requested back end. Returns the back end now set on ``model``."""
    attn = "eager" if name in NEEDS_EAGER_ATTENTION else requested
    if model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)
    return attn


def ready(loaded: LoadedModel, name: str, press, args: argparse.Namespace) -> tuple[object, str]:
    """Method ``name`` (``press``: None for dense) ready on the model the way ``args``
    (--attn_implementation, --random-init, --seed) ask: the press, calibrated (head merging,
    KVSharer: evaluation/calibration.py), and the attention back end it runs on."""
    attn = use_attention_for(loaded.model, name, args.attn_implementation)
    return calibrated(press, loaded, args.random_init, args.seed), attn
