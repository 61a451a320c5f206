"""Calibration before a run, for presses that choose their settings from the model's behaviour on
a short text (head merging's groups, KVSharer's sharing map).

Such a press defines ``calibrate(model, ids)``, ``ids`` a 1-D tensor of token ids, and may return
a dict of facts to record with the results (which layers share, ...). The CLI passes every press
through ``calibrated`` before using it (alone or inside a kvpress ComposedPress) and adds
``calibration_facts(press)`` to its result row.

The text: the first CALIBRATION_TOKENS tokens of a PG-19-style book, *Frankenstein* (local book
1 in name order), so calibration never sees WikiText-2 (the context protocol's text) nor *Pride
and Prejudice* (the streaming protocol's book 0). A random-init model (speed only) calibrates on
random token ids: what it chooses means nothing, but memory and speed do not depend on it.
"""

import torch
from kvpress import BasePress

from evaluation.data import load_text

CALIBRATION_BOOK = 1  # pg19 sample index: Frankenstein among the local books
CALIBRATION_TOKENS = 2048  # fits Pythia's 2048 positions as one sequence


def needing_calibration(press: BasePress | None) -> list:
    """``press`` and the presses it composes (kvpress ComposedPress) that define ``calibrate``."""
    if press is None:
        return []
    found = [press] if hasattr(press, "calibrate") else []
    return found + [nested for part in getattr(press, "presses", None) or [] for nested in needing_calibration(part)]


def calibration_ids(loaded, random_init: bool, seed: int) -> tuple[torch.Tensor, str]:
    """The calibration token ids (1-D) and where they come from."""
    if random_init:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(2, loaded.model.config.vocab_size, (CALIBRATION_TOKENS,), generator=generator)
        return ids, "random token ids"
    text, source = load_text("pg19", loaded.data_folder, CALIBRATION_BOOK)
    return loaded.tokenizer()(text, return_tensors="pt").input_ids[0, :CALIBRATION_TOKENS], source


def calibrated(press: BasePress | None, loaded, random_init: bool, seed: int) -> BasePress | None:
    """``press`` with every part that needs it calibrated; what they report is kept for
    ``calibration_facts``."""
    parts = needing_calibration(press)
    if parts:
        ids, source = calibration_ids(loaded, random_init, seed)
        facts = {"calibration_text": f"{source}, first {ids.numel()} tokens"}
        for part in parts:
            facts |= part.calibrate(loaded.model, ids) or {}
        press.calibration_facts = facts
    return press


def calibration_facts(press: BasePress | None) -> dict:
    """What the calibration of ``press`` reported (empty for presses that need none)."""
    return getattr(press, "calibration_facts", {})
