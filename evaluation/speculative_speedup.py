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

import json
from pathlib import Path

from evaluation.cli import Parser
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
    """Per batch size: decode step, verify pass by k, and each draft kind's measured steps as
    (fraction, ms): kept fraction of the prompt (compressed cache), skipped fraction of the
    layers (layer skip), None for the draft model."""
    by_batch = {}
    for row in costs["rows"]:
        entry = by_batch.setdefault(row["batch_size"], {"verify": {}, "draft": {}})
        if row["what"] == "target decode step":
            entry["decode"] = row["ms"]
        elif row["what"] == "target verify pass":
            entry["verify"][row["k"]] = row["ms"]
        else:
            fraction = row.get("kept_fraction", row.get("skipped_fraction"))
            entry["draft"].setdefault(row["what"], []).append((fraction, row["ms"]))
    return by_batch


def draft_step(entry: dict, source: dict) -> tuple[float, float | None] | None:
    """The measured draft step (fraction, ms) closest to the acceptance source's fraction."""
    steps = entry["draft"].get(DRAFT_COSTS[source["kind"]])
    if not steps:
        return None
    if source.get("fraction") is None:
        return steps[0]
    return min(steps, key=lambda step: abs(step[0] - source["fraction"]))


def predictions(costs: dict, acceptance: list[dict]) -> list[dict]:
    """Every (batch, acceptance source, k) point whose costs were measured. A source:
    {"label", "alpha", "kind" (a DRAFT_COSTS key), "fraction" (kept or skipped, or None)}."""
    points = []
    for batch, entry in sorted(step_costs(costs).items()):
        for source in acceptance:
            step = draft_step(entry, source)
            if step is None or "decode" not in entry:
                continue
            for k, verify_ms in sorted(entry["verify"].items()):
                points.append({"batch_size": batch, **source, "k": k, "draft_ms": step[1], "draft_cost_fraction": step[0],
                               "verify_ms": verify_ms, "decode_ms": entry["decode"],
                               "expected_tokens": expected_tokens(source["alpha"], k),
                               "predicted_speedup": predicted_speedup(source["alpha"], k, step[1], verify_ms,
                                                                      entry["decode"])})
    return points


def acceptance_from_results(paths: list[Path], only_k: int | None = 4) -> list[dict]:
    """The measured alpha of the rows (with k = ``only_k``; None: all) of speculative result
    files, labelled by draft and text, with the kept fraction of the prompt (compressed cache)
    or the skipped fraction of the layers (layer skip)."""
    entries = []
    for path in paths:
        result = json.loads(Path(path).read_text())
        for row in result["rows"]:
            if only_k is not None and row["k"] != only_k:
                continue
            fraction = None
            if row["kind"] == "press":
                fraction = row["draft_budget_tokens"] / result["prompt_tokens"]
            elif row["kind"] == "layer_skip":
                fraction = len(row["skipped_layers"]) / row["layers"]
            draft = row["spec"].replace(f",k={row['k']}", "")
            text = row["prompts"][0]["prompt"].split(" ")[0]  # "wikitext-2-raw-v1" or "PG-19-style"
            entries.append({"label": f"{result['model']} {draft}, {text}", "alpha": row["alpha"],
                            "kind": row["kind"], "fraction": fraction, "source_file": Path(path).name})
    return entries


def plot(points: list[dict], title: str, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({p["batch_size"] for p in points})
    figure, axes = plt.subplots(1, len(batches), figsize=(7 * len(batches), 5.5), squeeze=False)
    drafts = list(dict.fromkeys(p["label"].rsplit(", ", 1)[0] for p in points if p["kind"] != "model"))
    colors = {draft: plt.cm.tab10(index % 10) for index, draft in enumerate(drafts)}
    for axis, batch in zip(axes[0], batches):
        for key in dict.fromkeys((p["label"], p["alpha"]) for p in points if p["batch_size"] == batch):
            line = [p for p in points if p["batch_size"] == batch and (p["label"], p["alpha"]) == key]
            if line[0]["kind"] == "model":  # hypothetical acceptance: grey dashes
                style = {"color": "grey", "linestyle": "--"}
            else:  # measured acceptance: one colour per draft, solid on WikiText, dotted on PG-19
                style = {"color": colors[key[0].rsplit(", ", 1)[0]],
                         "linestyle": ":" if "PG-19" in key[0] else "-"}
            axis.plot([p["k"] for p in line], [p["predicted_speedup"] for p in line], marker="o", markersize=3,
                      label=f"{key[0]}, alpha={key[1]:.2f}", **style)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set(xlabel="drafts per verify pass k", ylabel="predicted speedup over plain decoding",
                 title=f"batch {batch}")
        axis.legend(fontsize=5.5)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(output, dpi=150)


def main(argv=None) -> None:
    parser = Parser(__file__, __doc__)
    parser.add_argument("costs", type=Path, help="JSON of evaluation/speculative.py --verify_costs")
    parser.add_argument("--acceptance", type=Path, nargs="*", default=[], help="speculative result JSON files")
    parser.add_argument("--alpha", type=float, nargs="*", default=[0.6, 0.7, 0.8, 0.9],
                        help="hypothetical acceptance rates for the draft model (none is measured for Pythia here)")
    parser.add_argument("--only_k", type=int, default=4,
                        help="take alpha from result rows run with this k (alpha is the draft's, not k's)")
    parser.add_argument("--output", type=Path, required=True, help="NAME: writes NAME.json and NAME.png")
    args = parser.parse_args(argv)
    costs = json.loads(args.costs.read_text())
    acceptance = [{"label": f"{costs['draft_model']} draft (hypothetical)", "alpha": alpha, "kind": "model",
                   "fraction": None}
                  for alpha in args.alpha] + acceptance_from_results(args.acceptance, args.only_k)
    points = predictions(costs, acceptance)
    device = costs["environment"].get("gpu", costs["environment"]["device"])
    title = (f"Predicted from step costs measured on {device} ({costs['model']}, {costs['model_tier']}; "
             f"prompt {costs['prompt_tokens']} tokens) and acceptance rates")
    # NAME may itself hold dots (pythia-2.8b_...): append the suffixes, do not replace one.
    json_path, png_path = Path(f"{args.output}.json"), Path(f"{args.output}.png")
    write_json_atomic(json_path, {"costs_file": str(args.costs), "title": title,
                                                          "formula": FORMULA, "points": points})
    plot(points, title, png_path)
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
