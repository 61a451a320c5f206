"""What a speed grid's rows become (evaluation/speed_grid.py): summary.json (every cell, with its
TPOT speed-up), summary.md (the table, with the ceilings the floors divided by), and the plots
tpot.png and throughput.png (against batch size) and tpot_smallest_batch.png."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from evaluation.grid import COLUMNS, add_speedups  # noqa: E402
from evaluation.methods import DENSE  # noqa: E402
from evaluation.results import markdown_table, save_figure_atomic, write_json_atomic, write_text_atomic  # noqa: E402


def plot(frame: pd.DataFrame, value: str, label: str, path: Path) -> None:
    """``value`` against batch size, one line per decoder / method / ratio."""
    measured = frame[frame[value].notna()] if value in frame else frame.iloc[0:0]
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    axis.set_prop_cycle(color=plt.cm.tab20.colors)
    for key, group in measured.groupby(["decoder", "decode_attention", "method", "compression_ratio"], dropna=False):
        decoder, backend, method, ratio = key
        name = f"{decoder}/{backend} {method}" + (f" {1 - ratio:.0%} kept" if method != DENSE else "")
        group = group.sort_values("batch_size")
        axis.plot(group.batch_size, group[value], marker="o", markersize=3, label=name)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("batch size")
    axis.set_ylabel(label)
    axis.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    save_figure_atomic(figure, path)
    plt.close(figure)


def plot_smallest_batch(frame: pd.DataFrame, path: Path) -> None:
    """TPOT of every cell at the smallest batch size, as bars, with the roofline floor marked."""
    measured = frame[frame["tpot_ms"].notna()] if "tpot_ms" in frame else frame.iloc[0:0]
    if measured.empty:  # every cell failed (e.g. out of memory): a figure that says so, the summary still written
        figure, axis = plt.subplots(figsize=(6.4, 1.6))
        axis.text(0.5, 0.5, "no cell measured (every row is an error)", ha="center", va="center")
        axis.set_axis_off()
        save_figure_atomic(figure, path)
        plt.close(figure)
        return
    cells = measured[measured.batch_size == measured.batch_size.min()]
    labels = [f"{r.decoder}/{r.decode_attention} {r.method}" + (f" {1 - r.compression_ratio:.0%} kept"
              if r.method != DENSE else "") for r in cells.itertuples()]
    figure, axis = plt.subplots(figsize=(6.4, 0.28 * len(cells) + 1.2))
    axis.barh(range(len(cells)), cells.tpot_ms, color="tab:blue")
    axis.scatter(cells.tpot_floor_ms, range(len(cells)), color="black", marker="|", s=120, label="roofline floor")
    axis.set_yticks(range(len(cells)), labels, fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel(f"time per output token (ms), batch {cells.batch_size.min()}")
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure_atomic(figure, path)
    plt.close(figure)


def summarize(header: dict, rows: list[dict], output_dir: Path, baseline: str) -> str:
    """summary.json, summary.md, tpot.png and throughput.png in ``output_dir``; returns the table."""
    add_speedups(rows, baseline)
    write_json_atomic(output_dir / "summary.json", header | {"rows": rows})
    frame = pd.DataFrame(rows)
    table = markdown_table(frame[[c for c in COLUMNS if c in frame.columns]])
    device = header["environment"].get("gpu", header["environment"]["device"])
    write_text_atomic(output_dir / "summary.md",
                      f"{header['model']} ({header['model_tier']}), {header['dtype']}, {device}; speed-up: TPOT of "
                      f"{baseline} dense / TPOT of the cell; floor: roofline of evaluation/roofline.py at every "
                      f"layer's own cache length{ceilings_line(header)}\n\n{table}\n")
    plot(frame, "tpot_ms", "time per output token (ms)", output_dir / "tpot.png")
    plot(frame, "decode_tokens_per_s", "decode throughput (tokens/s)", output_dir / "throughput.png")
    plot_smallest_batch(frame, output_dir / "tpot_smallest_batch.png")
    return table


def ceilings_line(header: dict) -> str:
    """What the floors divided by, from a header (one measurement per call), for summary.md."""
    measured = header.get("ceilings")
    if not measured:
        return ""
    calls = measured if isinstance(measured, list) else [measured]
    parts = [(f"{c['command'].split('--output_dir')[-1].strip()}: " if "--output_dir" in c.get("command", "") else "")
             + f"copy {c['bandwidth'] / 1e12:.3f} TB/s (the floor), GEMV "
             + (f"{c['gemv_bandwidth'] / 1e12:.3f} TB/s" if c.get("gemv_bandwidth") else "not measured")
             + f", matmul {c['peak_flops'] / 1e12:.0f} TFLOP/s ({c['source']})" for c in calls]
    return "; ceilings " + "; ".join(parts)
