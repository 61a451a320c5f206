"""Result files: one JSON per run, written atomically, with the environment that produced it."""

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
    return info


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        # The GPU machine gets the working tree without .git: the caller passes the commit.
        return os.environ.get("KVPRESS_NEOX_COMMIT", "unknown")


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write to a temporary file beside ``path`` and rename it: never a half-written result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(payload, stream, indent=2)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def table(rows: list[dict], columns: list[str]) -> str:
    frame = pd.DataFrame(rows)
    return frame[[c for c in columns if c in frame.columns]].to_string(index=False, float_format=lambda x: f"{x:.4g}")
