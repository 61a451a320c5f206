"""Draw evaluation/long_generation.py's result: time per token and memory against the tokens generated.

  python evaluation/long_generation_plot.py results/DIR/long_generation.json --output results/DIR/long_generation.png

Left: each run's mean TPOT per bin, its floor (the step's bytes over the measured copy bandwidth)
dashed; right: the memory allocated at each bin's end (GPU runs only). A dotted line marks where
dense reaches the model's max_position_embeddings.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402

from evaluation.results import save_figure_atomic  # noqa: E402


def label(run: dict) -> str:
    if run["budget"] is None:
        return "dense"
    return f"StreamingLLM ring, {run['budget']} tokens ({run['n_sink']} sinks)"


def plot(result: dict, output: Path) -> None:
    figure, (tpot_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    runs = [run for run in result["runs"] if run["bins"]]
    measured_memory = any("memory_gib" in run["bins"][0] for run in runs)
    for run in runs:
        generated = [row["first_step"] + row["steps"] + 1 for row in run["bins"]]  # tokens at the bin's end
        line, = tpot_axis.plot(generated, [row["tpot_ms"] for row in run["bins"]], marker=".", label=label(run))
        tpot_axis.plot(generated, [row["floor_ms"] for row in run["bins"]], linestyle="--", color=line.get_color())
        if measured_memory:
            memory_axis.plot(generated, [row["memory_gib"] for row in run["bins"]], marker=".",
                             color=line.get_color(), label=label(run))
    limit = result["max_position_embeddings"] - result["prompt_tokens"]
    for axis in (tpot_axis, memory_axis):
        axis.axvline(limit, color="grey", linestyle=":", label=f"{result['max_position_embeddings']} positions")
        axis.set_xlabel("tokens generated")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    tpot_axis.set_ylabel("ms per token (bin mean; dashed: floor)")
    memory_axis.set_ylabel("GiB allocated")
    if not measured_memory:
        memory_axis.text(0.5, 0.5, "memory: GPU runs only", transform=memory_axis.transAxes, ha="center")
    tpot_axis.legend(fontsize=8)
    device = result["environment"].get("gpu") or result["environment"].get("device")
    figure.suptitle(f"{result['model']} ({result['model_tier'].split(' (')[0]}), {result['dtype']}, batch 1, "
                    f"prompt {result['prompt_tokens']}, {device}", fontsize=10)
    figure.tight_layout()
    save_figure_atomic(figure, output)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path)
    parser.add_argument("--output", type=Path, help="default: the result's path with .png")
    args = parser.parse_args(argv)
    output = args.output or args.result.with_suffix(".png")
    plot(json.loads(args.result.read_text()), output)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
