"""KV compression at equal bytes: every baseline and RD-KV on the same context windows, each row
with the bytes its cache takes stored as the method stores it (scales and side data counted),
as a fraction of the fp16 cache.

  python evaluation/equal_bytes.py --model smollm2-135m --targets 0.25 0.125 0.0625 \
      --part eviction --output eviction.json
  python evaluation/equal_bytes.py ... --part rdkv --rdkv prior=8 "prior=1 bits=2,4" ...
  python evaluation/equal_bytes.py ... --part selected --select_from tune_rdkv.json

Baselines: ``--part uniform`` quantizes every token at 2, 3, 4 and 8 bits in each layout, at the
bytes that makes: KIVI's (``kivi``: per-channel keys in groups of 32 tokens, per-token values),
per-token keys after per-channel scales (``token``), and each with its per-token groups quantized
after QuaRot's random rotation (``kivi_rot``, ``token_rot``; the same bytes); at each byte target,
``--part eviction``: eviction presses keeping that fraction of the tokens in fp16; ``--part
composites``: SnapKV or H2O keeping as many tokens as fit the target (rounded up) then quantizing
them to 2, 3, 4, 5, 6 or 8 bits in each layout. ``--part rdkv`` runs RD-KV at each target with each ``--rdkv`` setting;
``--part selected`` runs, at each target, the setting with the lowest PPL in a tuning file (run
on other windows), so the windows reported were never used to choose it. Every part runs its
own dense row on its windows first; rows pair with it (and across files of the same windows).
"""

import json
import math
import sys
from pathlib import Path

import torch
from kvpress import ComposedPress

from decoding.kv_cache import head_shape
from evaluation.cli import Parser, add_data_options, add_model_options, load, one_line_errors, result_header
from evaluation.intervals import paired_difference, ppl_interval
from evaluation.models import SMOLLM2_ALIAS, data_dir, tokenized_text
from evaluation.protocols import context_nll
from evaluation.results import write_json_atomic
from presses import Settings, make_press
from presses.quantize import FP16_BYTES, gaussian_levels, quantized_head_bytes
from presses.quantized_kv_press import QuantizedKVPress
from presses.rdkv_press import RDKVPress

EVICTION = ("snapkv", "h2o", "expected_attention", "tova", "streaming_llm", "knorm")
UNIFORM_BITS = (2, 3, 4, 8)
COMPOSED_BITS = (2, 3, 4, 5, 6, 8)  # 5 and 6: the widths RD-KV may be offered between 4 and 8 bits
KIVI_GROUP = 32  # QuantizedKVPress's default group_tokens
COMPOSED_WITH = ("snapkv", "h2o")  # eviction presses whose kept tokens are then quantized
# quantized layouts: KIVI's (per-channel keys) or per-token keys, values per token; "_rot": every
# per-token group after QuaRot's random rotation (presses/quantize.py), at the same bytes; "_gauss":
# rotated, to Lloyd-Max's levels for normal entries (run only at the widths where those are used); "_sym":
# rotated, to levels symmetric about zero (a scale and no zero point per group: 2 bytes fewer)
LAYOUTS = ("kivi", "token", "kivi_rot", "token_rot", "kivi_rot_gauss", "token_rot_gauss", "kivi_rot_sym", "token_rot_sym")


def layout_levels(layout: str) -> str:
    """The per-token groups' ``levels`` (presses/quantize.py) of a quantized layout."""
    return "gaussian" if layout.endswith("_gauss") else "symmetric" if layout.endswith("_sym") else "uniform"


def quantizer(layout: str, bits: int, group: int = KIVI_GROUP) -> QuantizedKVPress:
    return QuantizedKVPress(bits=bits, key_layout="channel" if layout.startswith("kivi") else "token",
                            group_tokens=group, rotate="_rot" in layout, levels=layout_levels(layout))


def layouts(groups: tuple[int, ...], bits: int, head_dim: int) -> list[tuple[str, int]]:
    """(layout, key group) of every quantized layout at ``bits``: KIVI's once per key group in
    ``groups``, per-token keys once (they have no key groups); the Gaussian levels only where
    they are used (elsewhere they are the rotated layout's rows again)."""
    return [(layout, group) for layout in LAYOUTS
            if not layout.endswith("_gauss") or gaussian_levels(head_dim, bits) is not None
            for group in (groups if layout.startswith("kivi") else (KIVI_GROUP,))]


def quantized_name(layout: str, bits: int, group: int) -> str:
    """'kivi_rot4'; past the default key group 'kivi_rot4_g64' (fewer scales per token, coarser groups)."""
    return f"{layout}{bits}" + ("" if group == KIVI_GROUP else f"_g{group}")


def kept_for(target: float, layout: str, bits: int, head_dim: int, tokens: int, group: int = KIVI_GROUP) -> int:
    """The fewest tokens, of a ``tokens``-token context, whose quantized keys and values take at
    least ``target`` of the context's fp16 bytes: a composite baseline never gets fewer bytes
    than the target. KIVI's layout keeps the tokens past its last whole ``group``-token group in fp16."""
    key_layout = "channel" if layout.startswith("kivi") else "token"
    budget = target * tokens * 2 * FP16_BYTES * head_dim
    return next((kept for kept in range(1, tokens + 1)
                 if quantized_head_bytes(kept, bits, head_dim, key_layout, group, layout_levels(layout)) >= budget), tokens)


def flag(key: str, value: str, text: str) -> bool:
    """A 0/1 setting of ``text`` as a bool."""
    if value not in ("0", "1"):
        raise ValueError(f"{key} is 0 or 1, got {value!r} in {text!r}")
    return value == "1"


def rdkv_setting(text: str) -> dict:
    """'prior=8 bits=2,4,8 window_size=32' -> keyword arguments of RDKVPress."""
    setting = {}
    for item in text.split():
        key, _, value = item.partition("=")
        if key == "bits":
            setting[key] = tuple(int(b) for b in value.split(","))
        elif key in ("prior", "evict_weight", "after_h2o", "accumulated", "protect_recent"):
            setting[key] = float(value)
        elif key in ("separate_widths", "evict_per_head", "rotate", "merge_evicted"):
            setting[key] = flag(key, value, text)
        elif key in ("window_size", "recent_tokens", "group_tokens"):
            setting[key] = int(value)
        elif key in ("key_layout", "prior_shape", "accumulated_over", "allocate_over", "layer_scale", "channel_widths",
                     "levels", "head_weights"):
            setting[key] = value
        else:
            raise ValueError(f"unknown RD-KV setting {key!r} in {text!r}")
    return setting


def uniform(head_dim: int, groups: tuple[int, ...] = (KIVI_GROUP,)) -> list[tuple[str, None, object]]:
    """(name, None, press): every token quantized, at the bytes that makes."""
    return [(quantized_name(layout, bits, group), None, quantizer(layout, bits, group))
            for bits in UNIFORM_BITS for layout, group in layouts(groups, bits, head_dim)]


def eviction(targets: list[float]) -> list[tuple[str, float, object]]:
    """(name, target, press): eviction presses keeping the target's fraction of the tokens in fp16."""
    return [(name, target, make_press(name, 1 - target, Settings(compression_ratio=1 - target)))
            for target in targets for name in EVICTION]


def keeping(press_name: str, fraction: float, tokens: int):
    """The eviction press keeping ``fraction`` of a ``tokens``-token context (rounded as kvpress
    rounds: it keeps int(tokens * (1 - ratio)) tokens)."""
    keep = fraction + 0.5 / tokens
    return make_press(press_name, 1 - keep, Settings(compression_ratio=1 - keep))


def composites(targets: list[float], head_dim: int, tokens: int, presses=COMPOSED_WITH,
               groups: tuple[int, ...] = (KIVI_GROUP,)) -> list[tuple[str, float, object]]:
    """(name, target, press): SnapKV or H2O keeping as many tokens of the ``tokens``-token
    context as the target pays for at each bit width and layout (``kept_for``; KIVI's at each
    key group in ``groups``), then quantizing them."""
    configs = []
    for target in targets:
        for press_name in presses:
            for bits in COMPOSED_BITS:
                for layout, group in layouts(groups, bits, head_dim):
                    kept = kept_for(target, layout, bits, head_dim, tokens, group)
                    if kept < tokens:
                        configs.append((f"{press_name}+{quantized_name(layout, bits, group)}", target, ComposedPress(
                            [keeping(press_name, kept / tokens, tokens),
                             quantizer(layout, bits, group)])))
    return configs


def rdkv_press(target: float, setting: dict, tokens: int):
    """RD-KV at ``target`` of the fp16 bytes; with ``after_h2o=f``, after H2O has kept the
    fraction f of the ``tokens`` (H2O's evidence picks the tokens, RD-KV their widths in the
    rest of the budget, and may still evict; RD-KV's own accumulated evidence, which needs the
    whole prefill's keys, is off there unless named: H2O's has chosen the tokens)."""
    setting = dict(setting)
    kept = setting.pop("after_h2o", None)
    if kept is None:
        return RDKVPress(1 - target, **setting)
    setting.setdefault("accumulated", 0.0)
    if not target < kept <= 1:
        raise ValueError(f"after_h2o must be in ({target}, 1], got {kept}")
    return ComposedPress([keeping("h2o", kept, tokens), RDKVPress(1 - target / kept, **setting)])


def rdkv_configs(targets: list[float], settings: list[str], tokens: int) -> list[tuple[str, float, object]]:
    return [(f"rdkv[{text}]", target, rdkv_press(target, rdkv_setting(text), tokens))
            for target in targets for text in settings]


def selected(targets: list[float], tuning: list[Path], tokens: int) -> list[tuple[str, float, object]]:
    """At each target, the RD-KV setting of lowest PPL in the tuning files (the same windows)."""
    rows = [row for path in tuning for row in json.loads(path.read_text())["rows"] if row["method"].startswith("rdkv[")]
    configs = []
    for target in targets:
        candidates = [row for row in rows if math.isclose(row["target"], target)]
        if not candidates:
            raise ValueError(f"the tuning files hold no RD-KV row at target {target}")
        best = min(candidates, key=lambda row: row["ppl"])
        text = best["method"][len("rdkv["):-1]
        configs.append((best["method"], target, rdkv_press(target, rdkv_setting(text), tokens)))
    return configs


def row_for(name: str, target: float | None, result, dense) -> dict:
    return {"method": name, "target": target,
            "kv_bytes_fraction": result.stored_kv_bytes / result.dense_kv_bytes,
            "stored_kv_bytes": result.stored_kv_bytes, "dense_kv_bytes": result.dense_kv_bytes,
            "mean_cache_tokens": result.cache_tokens, "scored_tokens": result.tokens,
            "scored_token_range": list(result.scored_range), "mean_nll": result.mean_nll,
            "unit_nll": result.unit_nll, "unit_tokens": result.unit_tokens} | ppl_interval(
        result.unit_nll, result.unit_tokens) | paired_difference(result.unit_nll, dense.unit_nll, result.unit_tokens)


def main(argv=None) -> None:
    parser = Parser(__file__, __doc__)
    add_model_options(parser, default_model=SMOLLM2_ALIAS)
    add_data_options(parser)
    study = parser.add_argument_group("study")
    study.add_argument("--targets", type=float, nargs="+", default=[0.25, 0.125, 0.0625],
                       help="fractions of the fp16 KV bytes")
    study.add_argument("--part", choices=["uniform", "eviction", "composites", "rdkv", "selected"], required=True)
    study.add_argument("--composed_with", nargs="+", choices=COMPOSED_WITH, default=COMPOSED_WITH,
                       help="--part composites: the eviction presses whose kept tokens are quantized")
    study.add_argument("--kivi_groups", type=int, nargs="+", default=[KIVI_GROUP],
                       help="--part uniform / composites: KIVI's key groups (tokens) to run, each its own rows")
    study.add_argument("--rdkv", nargs="+", default=[""], help="RD-KV settings, e.g. 'prior=8 bits=2,4,8'")
    study.add_argument("--select_from", type=Path, nargs="+", help="--part selected: the tuning files of --part rdkv")
    study.add_argument("--context_tokens", type=int, default=1536)
    study.add_argument("--eval_tokens", type=int, default=512)
    study.add_argument("--first_window", type=int, default=0, help="windows skipped first (a tuning set apart)")
    study.add_argument("--num_windows", type=int, default=32)
    study.add_argument("--only", nargs="+", help="of the part's configurations, only these names (e.g. h2o+kivi_rot4)")
    study.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    for target in args.targets:
        if not 0 < target <= 1:
            parser.error(f"--targets are fractions of the fp16 bytes in (0, 1], got {target}")
    if any(group < 1 for group in args.kivi_groups):
        parser.error(f"--kivi_groups are token counts of at least 1, got {args.kivi_groups}")
    if args.part == "selected" and args.select_from is None:
        parser.error("--part selected needs --select_from TUNING.json")
    rdkv_configs(args.targets, args.rdkv, args.context_tokens)  # bad settings fail before the model loads
    text = tokenized_text(args.model, args.random_init, args.dataset, data_dir(args.data_dir), args.sample_idx)
    loaded = load(args, data_dir=args.data_dir)
    head_dim = head_shape(loaded.model.config)[1]
    groups = tuple(args.kivi_groups)
    configs = {"uniform": lambda: uniform(head_dim, groups), "eviction": lambda: eviction(args.targets),
               "composites": lambda: composites(args.targets, head_dim, args.context_tokens, args.composed_with, groups),
               "rdkv": lambda: rdkv_configs(args.targets, args.rdkv, args.context_tokens),
               "selected": lambda: selected(args.targets, args.select_from, args.context_tokens)}[args.part]()
    if args.only:
        unknown = sorted(set(args.only) - {name for name, _, _ in configs})
        if unknown:
            parser.error(f"--only: no configuration {', '.join(unknown)} in --part {args.part}; it has "
                         f"{', '.join(sorted({name for name, _, _ in configs}))}")
        configs = [config for config in configs if config[0] in args.only]

    def measure(press):
        return context_nll(loaded.model, text.ids, press, args.context_tokens, args.eval_tokens, args.num_windows,
                           first_window=args.first_window)

    header = result_header(args, loaded, protocol="context", context_tokens=args.context_tokens,
                           eval_tokens=args.eval_tokens, first_window=args.first_window, num_windows=args.num_windows)
    dense = measure(None)
    rows = [row_for("dense", 1.0, dense, dense) | {"data": text.source}]
    for name, target, press in configs:
        rows.append(row_for(name, target, measure(press), dense) | {"data": text.source})
        print(f"{name} @ {target}: ppl {rows[-1]['ppl']:.4f}, {rows[-1]['kv_bytes_fraction']:.4f} of the bytes",
              file=sys.stderr, flush=True)
        write_json_atomic(args.output, header | {"rows": rows})  # after every row: a run cut short keeps what it measured
    write_json_atomic(args.output, header | {"rows": rows})
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    with one_line_errors(ValueError):
        main()
