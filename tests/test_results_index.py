"""results/README.md is generated from the experiment folders (evaluation/results_index.py)."""

import json

from evaluation.results_index import describe, index_markdown, main


def _result(path, command, commit, gpu=None, device="cuda", date="2026-12-01T10:00:00+00:00"):
    environment = {"date_utc": date, "device": device, "git_commit": commit, "cpu": "x86_64"}
    if gpu:
        environment["gpu"] = gpu
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": command, "environment": environment, "rows": []}))


def test_index_reads_readme_fields_and_json_headers(tmp_path):
    described = tmp_path / "pythia-2.8b_random_grid_h200"
    _result(described / "same_run" / "cell.json", "python evaluation/speed_grid.py --press", "a153d20" + "0" * 33,
            gpu="NVIDIA H200")
    (described / "README.md").write_text(
        "# The speed grid\n\n- Command: `bash evaluation/device/speed_grid.sh h200`\n"
        "- Headline: TPOT 2.185 ms | 1.554x the floor\n")
    bare = tmp_path / "smollm2-135m_new_h200"  # a folder with result files only
    _result(bare / "a.json", "python evaluation/perplexity.py --press snapkv", "1111111", gpu="NVIDIA H200",
            date="2026-12-01T10:00:00+00:00")
    _result(bare / "b.json", "python evaluation/perplexity.py --press knorm", "2222222", device="cpu",
            date="2026-12-02T10:00:00+00:00")
    (bare / "plot.png").write_bytes(b"\x89PNG")
    (bare / "broken.json").write_text("{not json")
    _result(tmp_path / "tmp" / "demo.json", "python x.py", "3333333")  # results/tmp/: ignored by git, skipped

    row = describe(described)
    assert row["title"] == "The speed grid" and row["command"] == "`bash evaluation/device/speed_grid.sh h200`"
    assert row["machine"] == "NVIDIA H200" and row["commit"] == "a153d20" and row["date"] == "2026-12-01"
    row = describe(bare)
    assert row["command"] == "`python evaluation/perplexity.py --press snapkv` (+1 more in the files)"
    assert row["machine"] == "NVIDIA H200, CPU (x86_64)" and row["commit"] == "1111111, 2222222"
    assert row["date"] == "2026-12-01 to 2026-12-02" and row["headline"] == "—"

    text = index_markdown(tmp_path)
    rows = [line for line in text.splitlines() if line.startswith("| [")]
    assert [r.split("]")[0] for r in rows] == ["| [pythia-2.8b_random_grid_h200", "| [smollm2-135m_new_h200"]
    assert "TPOT 2.185 ms \\| 1.554x the floor" in rows[0]  # a pipe in a cell cannot end the cell

    assert main(["--results", str(tmp_path), "--check"]) == 1  # no index yet
    assert main(["--results", str(tmp_path)]) == 0
    assert (tmp_path / "README.md").read_text() == text
    assert main(["--results", str(tmp_path), "--check"]) == 0
