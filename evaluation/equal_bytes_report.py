"""Table and plot of equal-bytes result files (evaluation/equal_bytes.py): PPL against the KV
bytes each method stores, and at each byte target the best baseline, with paired intervals.

  python evaluation/equal_bytes_report.py results/x/*.json --output results/x/equal_bytes

Files are grouped by their windows (``first_window``, ``num_windows``): rows pair only with
rows of the same windows (each file's dense row on those windows is the same). Prints one
markdown table per group (method, target, bytes, PPL [95%], difference to dense [95%]) and,
per target, the best baseline (lowest PPL among non-RD-KV rows holding at most the target's
bytes plus half a percentage point); with RD-KV rows at that target, RD-KV's paired difference
to that baseline. Writes OUTPUT.png: PPL against the bytes fraction, per group.
"""

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

from evaluation.cli import Parser  # noqa: E402
from evaluation.intervals import paired_difference  # noqa: E402
from evaluation.results import save_figure_atomic  # noqa: E402

SLACK = 0.005  # a baseline may hold this much more of the fp16 bytes than the target and still count at it


def grouped_rows(paths: list[Path]) -> dict[tuple[int, int], list[dict]]:
    """Rows by (first_window, num_windows); the dense row once per group."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for path in paths:
        payload = json.loads(path.read_text())
        rows = groups.setdefault((payload["first_window"], payload["num_windows"]), [])
        rows.extend(row for row in payload["rows"] if row["method"] != "dense" or not rows)
    return groups


def is_ours(row: dict) -> bool:
    return row["method"].startswith("rdkv")


def best_baselines(rows: list[dict]) -> dict[float, dict]:
    """Per target, the baseline of lowest PPL holding at most the target's bytes (plus SLACK)."""
    targets = sorted({row["target"] for row in rows if row["target"] is not None and row["target"] < 1}, reverse=True)
    best = {}
    for target in targets:
        fitting = [row for row in rows if not is_ours(row) and row["method"] != "dense"
                   and row["kv_bytes_fraction"] <= target + SLACK]
        if fitting:
            best[target] = min(fitting, key=lambda row: row["ppl"])
    return best


def _interval(values) -> str:
    return f"[{values[0]:+.2f}, {values[1]:+.2f}]"


def markdown(rows: list[dict]) -> str:
    lines = ["| method | target | bytes (of fp16) | PPL [95%] | vs dense, % [95%] |", "| --- | --- | --- | --- | --- |"]
    for row in sorted(rows, key=lambda row: (-row["kv_bytes_fraction"], row["ppl"])):
        target = "—" if row["target"] is None else f"{row['target']:g}"
        lines.append(f"| {row['method']} | {target} | {row['kv_bytes_fraction']:.4f} | {row['ppl']:.3f} "
                     f"[{row['ppl_ci95'][0]:.2f}, {row['ppl_ci95'][1]:.2f}] | {row['delta_pct']:+.2f} "
                     f"{_interval(row['delta_pct_ci95'])} |")
    lines += ["", "| target | best baseline | its bytes | vs dense, % [95%] | RD-KV (best at target) | RD-KV vs that baseline, % [95%] |",
              "| --- | --- | --- | --- | --- | --- |"]
    for target, baseline in best_baselines(rows).items():
        ours = [row for row in rows if is_ours(row) and row["target"] is not None and math.isclose(row["target"], target)]
        cells = "— | —"
        if ours:
            best = min(ours, key=lambda row: row["ppl"])
            versus = paired_difference(best["unit_nll"], baseline["unit_nll"], best["unit_tokens"])
            cells = f"{best['method']} ({best['ppl']:.3f}) | {versus['delta_pct']:+.2f} {_interval(versus['delta_pct_ci95'])}"
        lines.append(f"| {target:g} | {baseline['method']} ({baseline['ppl']:.3f}) | {baseline['kv_bytes_fraction']:.4f} | "
                     f"{baseline['delta_pct']:+.2f} {_interval(baseline['delta_pct_ci95'])} | {cells} |")
    return "\n".join(lines)


def plot(groups: dict, output: Path) -> None:
    figure, axes = plt.subplots(1, len(groups), figsize=(6.4 * len(groups), 4.4), squeeze=False)
    for axis, ((first, count), rows) in zip(axes[0], sorted(groups.items())):
        families = {}
        for row in rows:
            if row["method"] != "dense":
                families.setdefault(row["method"].split("[")[0], []).append(row)
        colours = plt.cm.tab20.colors
        for index, (name, members) in enumerate(sorted(families.items())):
            members.sort(key=lambda row: row["kv_bytes_fraction"])
            ours = name == "rdkv"  # one point per setting: its settings are not a curve
            axis.plot([row["kv_bytes_fraction"] for row in members], [row["ppl"] for row in members],
                      marker="*" if ours else "o", markersize=9 if ours else 4, color=colours[index % 20],
                      linestyle="-" if len(members) > 1 and not ours else "none", label=name)
        best = sorted(best_baselines(rows).values(), key=lambda row: row["kv_bytes_fraction"])
        if best:
            axis.plot([row["kv_bytes_fraction"] for row in best], [row["ppl"] for row in best], color="black",
                      linewidth=2.5, alpha=0.4, label="best baseline per target")
        dense = next(row for row in rows if row["method"] == "dense")
        axis.axhline(dense["ppl"], color="black", linestyle="--", linewidth=1, label="dense")
        axis.set(xscale="log", yscale="log", xlabel="KV bytes stored (fraction of fp16)", ylabel="PPL",
                 title=f"windows {first}-{first + count - 1}")
        axis.legend(fontsize=6, ncol=2)
    save_figure_atomic(figure, output.with_suffix(".png"))
    plt.close(figure)


def main(argv=None) -> None:
    parser = Parser(__file__, __doc__)
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--output", type=Path, required=True, help="path without suffix of the plot")
    args = parser.parse_args(argv)
    groups = grouped_rows(args.results)
    for (first, count), rows in sorted(groups.items()):
        print(f"\n### Windows {first}-{first + count - 1}\n\n{markdown(rows)}")
    plot(groups, args.output)
    print(f"\nwrote {args.output.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
