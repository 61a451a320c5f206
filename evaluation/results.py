"""Result files: one JSON per run, written atomically, with the environment that produced it."""

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import torch
import transformers


def environment(device: str) -> dict:
    """Machine and software versions, recorded in every result file."""
    info = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvpress": version("kvpress"),
        "cpu": platform.processor() or platform.machine(),
        "device": device,
        "git_commit": _git_commit(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        if os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):  # the allocator's setting changes what fits
            info["cuda_alloc_conf"] = os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    return info


def _git_commit() -> str:
    if os.environ.get("KVPRESS_NEOX_COMMIT"):  # the GPU machine's copy of the tree has no (or a stale) .git
        return os.environ["KVPRESS_NEOX_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def token_digest(tokens: list[list[int]]) -> dict:
    """What a result row keeps of generated token ids (one list per sequence): their SHA-256 (of
    ``json.dumps``) and shape. Ids of random weights mean nothing, but equal digests show that two
    runs decoded the same tokens."""
    return {"tokens_sha256": hashlib.sha256(json.dumps(tokens).encode()).hexdigest(),
            "tokens_shape": [len(tokens), len(tokens[0]) if tokens else 0]}


def _write_atomic(path: Path, write) -> None:
    """``write(temporary_path)``, then rename onto ``path``: never a half-written result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(path, lambda temporary: Path(temporary).write_text(text))


def save_figure_atomic(figure, path: Path, dpi: int = 130) -> None:
    """Save a matplotlib figure; the format follows the suffix."""
    _write_atomic(path, lambda temporary: figure.savefig(temporary, dpi=dpi))


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table for the README (pandas' own to_markdown needs the tabulate package)."""
    def cell(value) -> str:
        if isinstance(value, float):
            return "—" if pd.isna(value) else f"{value:.4g}"
        return "—" if value is None else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def table(rows: list[dict], columns: list[str]) -> str:
    """The terminal table of a run; an interval (a pair of floats) prints as [low, high]."""
    def interval(value):
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, float) for v in value):
            return f"[{value[0]:.4g}, {value[1]:.4g}]"
        return value

    frame = pd.DataFrame(rows)[[c for c in columns if any(c in row for row in rows)]]
    return frame.map(interval).to_string(index=False, float_format=lambda x: f"{x:.4g}")
