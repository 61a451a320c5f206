"""kvpress-neox presses. ``import presses`` applies the GPT-NeoX patches once (see patches/)."""

import patches  # noqa: F401  -- applies the GPT-NeoX patches on import
from presses.budget_press import BudgetPress
from presses.registry import (
    NEEDS_EAGER_ATTENTION,
    PRESSES,
    PressConfigError,
    Settings,
    make_press,
    make_streaming_press,
    press_names,
)

__all__ = [
    "BudgetPress",
    "NEEDS_EAGER_ATTENTION",
    "PRESSES",
    "PressConfigError",
    "Settings",
    "make_press",
    "make_streaming_press",
    "press_names",
]
