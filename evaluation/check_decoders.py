"""Do the fast decode paths give the kvpress loop's tokens on this machine, CUDA graphs included?

  python evaluation/check_decoders.py --model EleutherAI/pythia-2.8b --random-init --press snapkv streaming_llm pyramidkv

For each press (and dense), the same prompt is decoded greedily by the kvpress loop
(decoding/reference.py), the StaticCache path (decoding/static_cache.py) and the plain
GPT-NeoX path (decoding/neox_decode.py) as one compiled graph and as the two-stream graph, all
compiled on CUDA. With ``--temperature`` the neox paths sample instead, against the uncompiled
neox step drawing the same Gumbel noise. Each path's tokens are
compared with the reference: identical or not, the first step where they differ, and the share of
steps that agree. On the CPU the paths are tested to be identical (tests/test_neox_decode.py); on
a GPU in half precision different kernels round differently, so a near-tie between two logits can
flip a choice and the sequences part from there: this script says where, and how far apart the
reference's two best choice scores were at that step (``reference_margin_there``: logits when
greedy, tempered logits plus Gumbel noise when sampling; a gap near fp16 rounding means a near-tie)
and, sampling with top-k, how near a tie the k-th and (k+1)-th logits were (``reference_top_k_gap_there``).
"""

import argparse
import sys
from pathlib import Path

import torch

from decoding import neox_cuda_graphs, neox_decode, static_cache
from decoding.reference import kvpress_generate, record_margin
from evaluation import cli
from evaluation.results import table, write_json_atomic
from evaluation.speed import prompt_ids
from presses import make_press

PATHS = ("static", "neox", "neox_two_stream")


def agreement(tokens: torch.Tensor, reference: torch.Tensor) -> dict:
    """Per-row first differing step (None: identical) and the share of equal steps overall."""
    equal = tokens == reference
    first = [None if row.all() else int((~row).nonzero()[0]) for row in equal]
    return {"identical": bool(equal.all()), "first_difference": first, "agreement": float(equal.float().mean())}


def margin_recording_step(margins: list, top_k_gaps: list, forward_logits=neox_decode.forward_logits):
    """The uncompiled neox step, also appending at each step the gap between its two best choice
    scores (batch,) to ``margins`` (how near a tie each draw was) and, with top-k, the gap between
    the k-th and (k+1)-th tempered logits to ``top_k_gaps`` (how near a tie the cut was: a token
    let in or left out by rounding can win the draw however clear the top two were).
    ``forward_logits``: the step's forward (decoding/fused_projections.py's on a folded view)."""
    def step(model, state):
        logits = forward_logits(model, state)
        scores = neox_decode.choice_scores(logits, state.temperature, state.top_k, state.noise)
        record_margin(scores, margins)
        if state.top_k is not None:
            around_cut = (logits.float() / state.temperature).topk(state.top_k + 1, dim=-1).values[:, -1, -2:]
            top_k_gaps.append(around_cut[:, 0] - around_cut[:, 1])
        return scores.argmax(-1)
    return step


def at_first_differences(gaps: torch.Tensor, first_difference: list) -> list:
    """``gaps`` (batch, steps) at each row's first differing step (None where the row is identical)."""
    return [None if step is None else float(gaps[row, step]) for row, step in enumerate(first_difference)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.Parser(__file__, __doc__)
    model = cli.add_model_options(parser)
    model.add_argument("--seed", type=int, default=0, help="of the sampling noise")
    parser.add_argument("--press", nargs="*", default=["snapkv", "streaming_llm", "pyramidkv"])
    parser.add_argument("--compression_ratio", type=float, default=0.5)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--prompt_tokens", type=int, default=2000)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="above 0: sampled decoding, checked against the uncompiled neox step drawing the "
                             "same noise (the kvpress loop and the StaticCache path decode greedily only)")
    parser.add_argument("--top_k", type=int)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS,
                        help="the fast paths to check (neox_two_stream: the neox step in a two-stream graph)")
    parser.add_argument("--output", type=Path, default=Path("results/check_decoders.json"))
    return parser.parse_args(argv)


def check(args) -> None:
    loaded = cli.load(args)
    model = loaded.model
    compile = model.device.type == "cuda"
    prompt = prompt_ids(model.config.vocab_size, args.batch_size, args.prompt_tokens, 0).to(model.device)
    paths = {"static": lambda press: static_cache.generate(model, prompt, press, args.new_tokens,
                                                           step=static_cache.compiled_step(compile)).tokens}
    sampled = args.temperature > 0

    def neox_path(step):
        # A fresh generator per run: every path draws the same noise.
        return lambda press: neox_decode.generate(
            model, list(prompt.split(1)), press, args.new_tokens, step=step, temperature=args.temperature,
            top_k=args.top_k, generator=torch.Generator(model.device).manual_seed(args.seed)).tokens

    if model.config.model_type == "gpt_neox":
        for path, mode in (("neox", "reduce-overhead"), ("neox_two_stream", "two-stream")):
            paths[path] = neox_path(neox_cuda_graphs.compiled_step(compile, mode))
    elif sampled:
        cli.fail("--temperature checks the neox paths: use a GPT-NeoX model")
    if sampled:
        paths.pop("static")
    paths = {path: run for path, run in paths.items() if path in args.paths}
    rows = []
    for name in [None] + args.press:
        press = make_press(name, args.compression_ratio) if name else None
        margins, top_k_gaps = [], []
        if sampled:
            reference = neox_path(margin_recording_step(margins, top_k_gaps))(press)
        else:
            reference = kvpress_generate(model, prompt, press, args.new_tokens, margins=margins).tokens
        # (batch, steps) each. Sampled, the first token comes from the prefill, which every neox
        # path shares: no gaps recorded there.
        gaps = {key: torch.stack([torch.full_like(steps[0], float("nan"))] * sampled + steps, dim=1)
                for key, steps in (("reference_margin_there", margins), ("reference_top_k_gap_there", top_k_gaps))
                if steps}
        for path, run in paths.items():
            try:
                row = agreement(run(press), reference)
                # How near a tie the reference's choice was where a path first left it.
                row |= {key: at_first_differences(steps, row["first_difference"]) for key, steps in gaps.items()}
            except static_cache.RaggedCacheError as error:  # the StaticCache path takes one cache length
                row = {"error": str(error)}
            rows.append({"method": name or "dense", "path": path} | row)
            print(rows[-1], file=sys.stderr, flush=True)
    write_json_atomic(args.output, cli.result_header(
        args, loaded, compiled=compile, compression_ratio=args.compression_ratio, batch_size=args.batch_size,
        temperature=args.temperature, top_k=args.top_k, seed=args.seed,
        reference="the uncompiled neox step, same noise" if sampled else "the kvpress loop, greedy",
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens) | {"rows": rows})
    print(table(rows, ["method", "path", "identical", "agreement", "first_difference", "reference_margin_there",
                       "reference_top_k_gap_there", "error"]))


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli.one_line_errors():  # an unknown model or press: one line, exit code 2
        check(args)


if __name__ == "__main__":
    main()
