"""The quantized-KV decode kernel, compiled for Hopper on this CPU (evaluation/kernel_loads.py), loads its
8-bit and 4-bit codes in vectors (4-bit codes loaded byte by byte made it 3x slower than 8-bit on the H200),
loads no padded lanes (Pythia's 40-channel halves in tiles of 32 + 8, not one of 64) and turns codes into
floats without integer-to-float conversions (one per element, a slow instruction, was most of its arithmetic)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    env = os.environ | {"TRITON_INTERPRET": "0"}  # conftest's interpreter would stand in for the compiler
    result = subprocess.run([sys.executable, "evaluation/kernel_loads.py", "--bits", "8", "4", "--heads", "2",
                             "--slots", "256"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout[result.stdout.index("{"):])


@pytest.mark.parametrize("bits", ["8", "4"])
def test_codes_are_loaded_in_8_byte_vectors_and_only_the_codes(report, bits):
    counts = report["loads_per_thread"][bits]
    # 128 slots of keys and values over 64 threads; a slot's codes are 80 bytes at 8 bits, 40 at 4 (head dim 80).
    # Each half of the head dim in tiles of 32 + 8 channels: no padded lanes (a 64-wide tile loaded 512 / 256)
    code_bytes = 128 * 2 * (80 if bits == "8" else 40) // 64
    assert 8 * counts.get("ld.global.v2.b32", 0) == code_bytes
    assert counts.get("ld.global.b8", 0) <= 2  # the visibility mask's bytes only (128 slots over 64 threads)


@pytest.mark.parametrize("bits", ["8", "4"])
def test_codes_become_floats_without_integer_to_float_conversions(report, bits):
    counts = report["conversions_per_thread"][bits]
    integer_to_float = {form: count for form, count in counts.items() if re.fullmatch(r"cvt\.rn\.f32\.[us]\d+", form)}
    assert integer_to_float == {}


def test_interpreter_mode_is_refused_with_a_clear_error():
    env = os.environ | {"TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "evaluation/kernel_loads.py", "--bits", "4", "--heads", "2", "--slots", "64"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "run with TRITON_INTERPRET=0" in result.stderr.splitlines()[-1]
