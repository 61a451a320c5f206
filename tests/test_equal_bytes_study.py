"""evaluation/equal_bytes_study.sh, the one command of the equal-bytes study for a loadable model
(Pythia-2.8B from the hub for users), run here end to end on a tiny GPT-NeoX folder."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT, shared_data_dir


def test_the_study_writes_both_protocols_rows_and_the_report(tiny_pythia_folder, tmp_path):
    out = tmp_path / "study"
    env = os.environ | {"MODEL": str(tiny_pythia_folder), "DTYPE": "float32", "DEVICE": "cpu", "PYTHON": sys.executable,
                        "CONTEXT_TOKENS": "96", "EVAL_TOKENS": "32", "NUM_WINDOWS": "2", "BUDGET_TOKENS": "48",
                        "MAX_TOKENS": "225", "DATA_DIR": str(shared_data_dir()), "HF_HUB_OFFLINE": "1",
                        "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(["bash", str(REPO_ROOT / "evaluation" / "equal_bytes_study.sh"), str(out)],
                            capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (out / "table.md").read_text()
    for setting in ("rdkv[rotate=1 key_layout=channel]", "rdkv[after_h2o=0.6 evict_weight=16 rotate=1 key_layout=token]",
                    "rdkv[after_h2o=0.3 evict_weight=16]", "h2o+kivi_rot4", "kivi4"):
        assert setting in table
    assert (out / "equal_bytes.png").stat().st_size > 0
    for book in (0, 1):
        rows = json.loads((out / f"streaming_book{book}_rdkv.json").read_text())["rows"]
        assert [row["method"] for row in rows] == ["dense", "rdkv[]"]
        assert rows[1]["peak_kv_bytes_fraction"] <= 1 and rows[1]["versus_method"] != "dense"
