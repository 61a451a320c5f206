"""kvpress-neox presses. ``import presses`` applies the GPT-NeoX patches once (see patches/)."""

import patches  # noqa: F401  -- applies the GPT-NeoX patches on import
from presses.registry import NEEDS_EAGER_ATTENTION, PRESSES, PressConfigError, make_press, press_names

__all__ = ["PRESSES", "NEEDS_EAGER_ATTENTION", "PressConfigError", "make_press", "press_names"]
