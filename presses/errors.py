"""The error a press raises for a name or setting the user gave that cannot be used (its own
module, so that presses and the registry that imports them can both raise it)."""


class PressConfigError(ValueError):
    """A press name or setting the user gave cannot be used."""
