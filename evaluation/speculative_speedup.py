"""Predicted speedup of speculative decoding from measured step costs and an acceptance rate.

Leviathan et al. 2023 (arXiv:2211.17192, section 3): if each draft is accepted independently
with probability alpha, a pass with k drafts yields on average (1 - alpha^(k+1)) / (1 - alpha)
tokens (Eq. 1), and costs k draft steps plus one verify pass. Their Theorem 3.8 assumes the
verify pass costs one decode step; here it is the measured forward of k+1 tokens:

    speedup(alpha, k) = tokens(alpha, k) * decode_step / (k * draft_step + verify_pass(k))

Costs come from ``evaluation/speculative.py --verify_costs`` (one JSON); acceptance rates from
result files of ``evaluation/speculative.py`` (their ``alpha``) or given by hand (--alpha).

  python evaluation/speculative_speedup.py COSTS.json --acceptance RESULT.json ... --output NAME
writes NAME.json (every predicted point) and NAME.png (one panel per batch size).
"""

import argparse
import json
from pathlib import Path

from evaluation.results import write_json_atomic

FORMULA = "speedup = (1 - alpha^(k+1)) / (1 - alpha) * decode_ms / (k * draft_ms + verify_ms)"
DRAFT_COSTS = {  # which measured step a kind of draft pays per draft token
    "model": "draft model decode step",
    "press": "self-draft step, compressed cache",
    "layer_skip": "self-draft step, layers skipped",
}


def expected_tokens(alpha: float, k: int) -> float:
    """Mean tokens per verify pass with k drafts, each accepted with probability alpha."""
    return float(k + 1) if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def predicted_speedup(alpha: float, k: int, draft_ms: float, verify_ms: float, decode_ms: float) -> float:
    """Plain decoding's time per token over speculative decoding's."""
    return expected_tokens(alpha, k) * decode_ms / (k * draft_ms + verify_ms)


def step_costs(costs: dict) -> dict[int, dict]:
    """Per batch size: decode step, verify pass by k, and each draft kind's step (ms)."""
    by_batch = {}
    for row in costs["rows"]:
        entry = by_batch.setdefault(row["batch_size"], {"verify": {}, "draft": {}})
        if row["what"] == "target decode step":
            entry["decode"] = row["ms"]
        elif row["what"] == "target verify pass":
            entry["verify"][row["k"]] = row["ms"]
        else:
            entry["draft"].setdefault(row["what"], row["ms"])  # the first skip fraction measured
    return by_batch


def predictions(costs: dict, acceptance: list[dict]) -> list[dict]:
    """Every (batch, acceptance entry, k) point whose costs were measured. An acceptance entry:
    {"label", "alpha", "kind"} with kind one of DRAFT_COSTS."""
    points = []
    for batch, entry in sorted(step_costs(costs).items()):
        for source in acceptance:
            draft_ms = entry["draft"].get(DRAFT_COSTS[source["kind"]])
            if draft_ms is None or "decode" not in entry:
                continue
            for k, verify_ms in sorted(entry["verify"].items()):
                points.append({"batch_size": batch, **source, "k": k, "draft_ms": draft_ms, "verify_ms": verify_ms,
                               "decode_ms": entry["decode"], "expected_tokens": expected_tokens(source["alpha"], k),
                               "predicted_speedup": predicted_speedup(source["alpha"], k, draft_ms, verify_ms,
                                                                      entry["decode"])})
    return points


def acceptance_from_results(paths: list[Path]) -> list[dict]:
    """The measured alpha of every row of speculative result files, labelled by spec and model."""
    entries = []
    for path in paths:
        result = json.loads(Path(path).read_text())
        for row in result["rows"]:
            entries.append({"label": f"{result['model']} {row['spec']} (measured, {Path(path).name})",
                            "alpha": row["alpha"], "kind": row["kind"]})
    return entries


def plot(points: list[dict], title: str, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({p["batch_size"] for p in points})
    figure, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 4.8), squeeze=False)
    for axis, batch in zip(axes[0], batches):
        for label in dict.fromkeys(p["label"] for p in points if p["batch_size"] == batch):
            line = [p for p in points if p["batch_size"] == batch and p["label"] == label]
            style = "--" if line[0]["kind"] == "model" else "-"
            axis.plot([p["k"] for p in line], [p["predicted_speedup"] for p in line], style, marker="o",
                      markersize=3, label=f"{label}, alpha={line[0]['alpha']:.2f}")
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set(xlabel="drafts per verify pass k", ylabel="predicted speedup over plain decoding",
                 title=f"batch {batch}")
        axis.legend(fontsize=6)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(output, dpi=150)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="evaluation/speculative_speedup.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("costs", type=Path, help="JSON of evaluation/speculative.py --verify_costs")
    parser.add_argument("--acceptance", type=Path, nargs="*", default=[], help="speculative result JSON files")
    parser.add_argument("--alpha", type=float, nargs="*", default=[0.6, 0.7, 0.8, 0.9],
                        help="hypothetical acceptance rates for the draft model (none is measured for Pythia here)")
    parser.add_argument("--output", type=Path, required=True, help="NAME: writes NAME.json and NAME.png")
    args = parser.parse_args(argv)
    costs = json.loads(args.costs.read_text())
    acceptance = [{"label": f"{costs['draft_model']} draft (hypothetical)", "alpha": alpha, "kind": "model"}
                  for alpha in args.alpha] + acceptance_from_results(args.acceptance)
    points = predictions(costs, acceptance)
    device = costs["environment"].get("gpu", costs["environment"]["device"])
    title = (f"Predicted from step costs measured on {device} ({costs['model']}, {costs['model_tier']}; "
             f"prompt {costs['prompt_tokens']} tokens) and acceptance rates")
    write_json_atomic(args.output.with_suffix(".json"), {"costs_file": str(args.costs), "title": title,
                                                          "formula": FORMULA, "points": points})
    plot(points, title, args.output.with_suffix(".png"))
    print(f"wrote {args.output.with_suffix('.json')} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
