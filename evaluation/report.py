"""Turn quality result files of evaluation/perplexity.py into a plot and a markdown table.

  python evaluation/report.py results/a.json [more.json ...] --output results/name

The files (one model, data and protocol; e.g. one sweep split over several runs) are merged,
keeping the first file's dense row. Writes name.png (PPL against the cache kept, one line per
method, dense as a dashed line, 95% bootstrap intervals as error bars), for streaming also
name_by_position_budgetB.png (PPL along the text), and prints a markdown table (method x setting
-> PPL and its paired difference to dense, in %, with the 95% interval) for the README. Files
written before intervals were recorded plot and print without them.
Context protocol: x = fraction of the context's KV pairs kept (1 - compression ratio).
Streaming protocol: x = cache budget in tokens per layer.

  python evaluation/report.py RESULT.json --summary

prints the README's summary table of the files' rows instead (method, compression ratio or
budget, PPL to 3 decimals, mean NLL, scored tokens, cache tokens per layer) and writes nothing.
"""

import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from evaluation.cli import Parser  # noqa: E402
from evaluation.intervals import paired_difference  # noqa: E402
from evaluation.results import save_figure_atomic  # noqa: E402


def load_rows(paths: list[Path]) -> tuple[dict, pd.DataFrame]:
    payloads = [json.loads(path.read_text()) for path in paths]
    payload = payloads[0]
    for path, other in zip(paths, payloads):
        if other["protocol"] not in ("context", "streaming"):
            raise SystemExit(f"error: {path} is a {other['protocol']} result; report.py plots quality results")
        if (other["protocol"], other["model"], _text(other)) != (payload["protocol"], payload["model"], _text(payload)):
            raise SystemExit(f"error: {path} is another model, data or protocol than {paths[0]}")
    rows = pd.DataFrame([row for index, other in enumerate(payloads) for row in other["rows"]
                         if index == 0 or row["method"] != "dense"])
    if payload["protocol"] == "context":
        rows["setting"] = 1.0 - rows["compression_ratio"]
    else:
        rows["setting"] = rows["budget"]
    return payload, rows


def _text(payload: dict) -> str:
    """The text a result file scored, without the folder its local copy was read from."""
    return re.sub(r" \(local .*\)", "", payload["rows"][0]["data"])


def plot(payload: dict, rows: pd.DataFrame, output: Path) -> None:
    dense = rows[rows.method == "dense"]
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    axis.set_prop_cycle(color=plt.cm.tab20.colors)  # up to 20 methods, each its own colour
    for method, group in rows[rows.method != "dense"].groupby("method"):
        group = group.sort_values("setting")
        if "delta_ppl_ci95" in group and group.delta_ppl_ci95.notna().all():
            # The paired interval (same windows / stretches as dense) around dense + difference: the
            # unpaired interval of each PPL is mostly the texts' spread, shared by all methods.
            low, high = (pd.Series(bound, index=group.index) for bound in zip(*group.delta_ppl_ci95))
            error = [group.delta_ppl - low, high - group.delta_ppl]
            axis.errorbar(group.setting, group.ppl, yerr=error, marker="o", markersize=3, capsize=2, label=method)
        else:
            axis.plot(group.setting, group.ppl, marker="o", markersize=3, label=method)
    axis.axhline(dense.ppl.iloc[0], color="black", linestyle="--", label="dense")
    if rows.ppl.max() > 10 * dense.ppl.iloc[0]:  # methods that break the model: a linear axis hides the rest
        axis.set_yscale("log")
    if payload["protocol"] == "context":
        axis.set_xlabel("fraction of the context KV kept")
    else:
        axis.set_xscale("log", base=2)
        axis.set_xlabel("cache budget (tokens per layer)")
    axis.set_ylabel("perplexity (bars: 95% paired interval of the difference to dense)" if "delta_ppl_ci95" in rows
                    else "perplexity", fontsize=8)
    data = re.sub(r" \(local .*\)", "", rows.data.iloc[0])
    axis.set_title(f"{payload['model']} — {data}\n{payload['protocol']} protocol", fontsize=9)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    _save(figure, output)


def plot_by_position(payload: dict, rows: pd.DataFrame, budget: int, methods: list[str], output: Path) -> None:
    """StreamingLLM's figure: PPL along the text for dense and ``methods`` at one budget."""
    column = next(c for c in rows.columns if c.startswith("ppl_per_"))
    segment = int(column.split("_")[2])
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for _, row in rows[(rows.method == "dense") | ((rows.budget == budget) & rows.method.isin(methods))].iterrows():
        ends = [segment * (i + 1) for i in range(len(row[column]))]
        style = dict(color="black", linestyle="--") if row.method == "dense" else {}
        axis.plot(ends, row[column], marker="o", markersize=2, label=row.method, **style)
    axis.set_yscale("log")
    axis.set_xlabel(f"tokens streamed (PPL of each {segment}-token stretch)")
    axis.set_ylabel("perplexity")
    axis.set_title(f"{payload['model']}, streaming, budget {budget} tokens per layer", fontsize=9)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    _save(figure, output)


def _save(figure, output: Path) -> None:
    save_figure_atomic(figure, output)
    plt.close(figure)


def markdown_table(payload: dict, rows: pd.DataFrame) -> str:
    """Method x setting; each cell the PPL and, where the file has it, the paired difference to
    dense in % with its 95% interval: a difference whose interval holds zero is not a difference."""
    label = "kept fraction" if payload["protocol"] == "context" else "budget (tokens)"
    pressed = rows[rows.method != "dense"]
    ppl = pressed.pivot_table(index="method", columns="setting", values="ppl")
    ppl = ppl.sort_values(ppl.columns.min())  # best at the tightest setting first
    cells = {(r.method, r.setting): _cell(r) for r in pressed.itertuples()}
    header = "| method | " + " | ".join(f"{label} {c:g}" for c in ppl.columns) + " |"
    lines = [header, "|" + " --- |" * (len(ppl.columns) + 1)]
    dense = rows[rows.method == "dense"].iloc[0]
    lines.append(f"| dense | {_cell(dense)} (all) |" + " |" * (len(ppl.columns) - 1))
    for method in ppl.index:
        lines.append(f"| {method} | " + " | ".join(cells.get((method, c), "—") for c in ppl.columns) + " |")
    return "\n".join(lines)


def versus_table(payload: dict, rows: pd.DataFrame, baseline: str) -> str:
    """Method x setting: the paired difference of each method's PPL to ``baseline``'s at the same
    setting (same windows / stretches), in %, with its 95% interval; "A beats B" needs it clear of zero."""
    label = "kept fraction" if payload["protocol"] == "context" else "budget (tokens)"
    pressed = rows[rows.method != "dense"]
    if "unit_nll" not in pressed or baseline not in set(pressed.method):
        raise SystemExit(f"error: --versus {baseline}: no such method with per-unit NLL in these files")
    reference = {r.setting: r for r in pressed[pressed.method == baseline].itertuples()}
    settings = sorted(reference)
    lines = [f"| method vs {baseline} | " + " | ".join(f"{label} {c:g}" for c in settings) + " |",
             "|" + " --- |" * (len(settings) + 1)]
    for method, group in pressed[pressed.method != baseline].groupby("method"):
        by_setting = {r.setting: r for r in group.itertuples()}
        cells = []
        for setting in settings:
            row = by_setting.get(setting)
            if row is None:
                cells.append("—")
                continue
            shift = paired_difference(row.unit_nll, reference[setting].unit_nll, row.unit_tokens)
            low, high = shift["delta_pct_ci95"]
            cells.append(f"{shift['delta_pct']:+.2f}% [{low:+.2f}, {high:+.2f}]")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(payload: dict, rows: pd.DataFrame) -> str:
    """One line per row, as the README's demo table: PPL to 3 decimals, mean NLL to 4."""
    setting = ("compression ratio", "compression_ratio") if payload["protocol"] == "context" else ("budget", "budget")
    lines = [f"| method | {setting[0]} | PPL | mean NLL | scored tokens | cache tokens per layer |",
             "|" + " --- |" * 6]
    for row in rows.itertuples():
        value = getattr(row, setting[1])
        value = "—" if pd.isna(value) else f"{value:g}"
        lines.append(f"| {row.method} | {value} | {row.ppl:.3f} | {row.mean_nll:.4f} | {row.scored_tokens} | "
                     f"{row.mean_cache_tokens:g} |")
    return "\n".join(lines)


def _cell(row) -> str:
    text = f"{row.ppl:.3f}"
    if isinstance(getattr(row, "delta_pct_ci95", None), list) and row.method != "dense":
        low, high = row.delta_pct_ci95
        text += f" ({row.delta_pct:+.2f}% [{low:+.2f}, {high:+.2f}])"
    return text


def main(argv=None) -> None:
    parser = Parser(__file__, __doc__)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, help="path without suffix (default: the first file's)")
    parser.add_argument("--position_budget", type=int, default=1024,
                        help="streaming: the budget whose PPL-along-the-text plot is drawn")
    parser.add_argument("--position_methods", nargs="+",
                        default=["streaming_llm", "sliding_window", "lm_infinite", "infllm", "tova", "h2o"],
                        help="streaming: the methods drawn along the text (beside dense)")
    parser.add_argument("--versus", nargs="*", default=[],
                        help="also print each method's paired difference to these methods (one table each)")
    parser.add_argument("--summary", action="store_true",
                        help="print only the README's summary table (one line per row); write no plot")
    args = parser.parse_args(argv)
    payload, rows = load_rows(args.results)
    if args.summary:
        print(summary_table(payload, rows))
        return
    stem = args.output or args.results[0].with_suffix("")
    plot(payload, rows, stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.png')}")
    if payload["protocol"] == "streaming" and (rows.budget == args.position_budget).any():
        by_position = stem.with_name(f"{stem.name}_by_position_budget{args.position_budget}.png")
        plot_by_position(payload, rows, args.position_budget, args.position_methods, by_position)
        print(f"wrote {by_position}")
    elif payload["protocol"] == "streaming":
        budgets = ", ".join(f"{b:g}" for b in sorted(rows.budget.dropna().unique()))
        print(f"no PPL-along-the-text plot: no run has budget {args.position_budget} (--position_budget); "
              f"the files have budgets {budgets}: pass one of them", file=sys.stderr)
    print()
    print(markdown_table(payload, rows))
    for baseline in args.versus:
        print()
        print(versus_table(payload, rows, baseline))


if __name__ == "__main__":
    main()
