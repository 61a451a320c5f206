"""Sweeps spread over the GPUs of a host: evaluation/perplexity.py and evaluation/speed_grid.py
under ``accelerate launch --num_processes N`` (one process per GPU). A program run as one process
goes on as it always did.

Launched with several processes, a program cuts its sweep into units (perplexity: one method at
one ratio or budget, over every window or the whole book; speed: one method's batch sizes, which
the out-of-memory rule keeps together) and accelerate's ``split_between_processes`` gives each
process its share. Each process writes every cell to its own file as soon as it is done; the main
process then reads them back in the order the one-process run measures them and writes the same
result file. A rerun of the same command skips the cells whose file that command already wrote
without an error (speed: out of memory is a result), so a sweep cut short resumes; a cell that
fails records its error in its row and the others go on.
"""

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState

# The processes meet again after their last cell: the wait lasts as long as the slowest share takes
# beyond the others, far past torch's default timeout (10 minutes with NCCL).
MEETING_TIMEOUT = timedelta(days=7)


def launched(args) -> PartialState | None:
    """accelerate's state when this process is one of several (``accelerate launch`` or torchrun),
    else None. Processes on CPUs talk through gloo, on GPUs through NCCL; --device cuda (no index)
    becomes each process's own GPU in ``args``."""
    device = torch.device(args.device)
    state = PartialState(cpu=device.type == "cpu", timeout=MEETING_TIMEOUT)
    if state.num_processes == 1:
        return None
    if device.type == "cuda" and device.index is None:
        args.device = str(state.device)
    return state


def done(path: Path, command: str, finished=lambda row: "error" not in row) -> bool:
    """Whether ``path`` holds a cell that ``command`` wrote and whose rows all ``finished``."""
    if not path.is_file():
        return False
    payload = json.loads(path.read_text())
    return payload.get("command") == command and all(finished(row) for row in payload["rows"])


def share(state: PartialState, units: list, is_done) -> list:
    """This process's part of the ``units`` that are not ``is_done`` yet."""
    todo = [unit for unit in units if not is_done(unit)]
    # Every process lists what is done before any of them writes a cell: all split the same list.
    state.wait_for_everyone()
    with state.split_between_processes(todo) as mine:
        print(f"process {state.process_index} of {state.num_processes}: {len(mine)} of the {len(todo)} units left "
              f"({len(units) - len(todo)} done before)", file=sys.stderr, flush=True)
        return list(mine)


def guarded(measure, identity: dict) -> dict:
    """``measure()``'s row, or ``identity`` with the error it raised: one failing cell must not
    stop the others."""
    try:
        return measure()
    except Exception as error:  # noqa: BLE001 -- the error is the cell's result; the sweep goes on
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return identity | {"error": f"{type(error).__name__}: {str(error)[:500]}"}


def gathered(state: PartialState, paths: list[Path]) -> list[dict] | None:
    """Once every process is done: on the main process, the payload of each cell file in
    ``paths`` (in that order); on the others None (they write nothing more)."""
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    return [json.loads(path.read_text()) for path in paths]
