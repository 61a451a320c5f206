"""TPOT and memory over a long generation: StreamingLLM on the ring buffer against dense.

  python evaluation/long_generation.py --model EleutherAI/pythia-2.8b --random-init --budget 1024 2047 \\
      --prompt_tokens 1024 --new_tokens 16384 --check_tokens 600 --output results/tmp/long_generation.json

One prompt of random ids, batch 1, generation length forced. Each ``--budget`` generates
``--new_tokens`` tokens with StreamingLLM's rule (``--n_sink`` sinks + the most recent tokens, in-cache
positions) on decoding/ring_cache.py's ring buffer; dense generates up to the model's
``max_position_embeddings`` (2048 for Pythia) on decoding/neox_decode.py's buffer. On CUDA both
run as the two-stream CUDA graph (decoding/neox_cuda_graphs.py), each run compiled anew; on the CPU
the plain steps run.

Every ``--bin_tokens`` steps the run records the mean time per token of the bin (CUDA events on a
GPU, the host clock on the CPU), the memory allocated at the bin's end and the bin's peak
(``torch.cuda.max_memory_allocated``, reset per bin; none on the CPU), and the floor: the step's
bytes at the bin's mean attended tokens over the copy bandwidth measured at the start
(evaluation/ceilings.py, evaluation/roofline.py). The first step, which compiles and captures the
graph, is left out of the bins and reported as ``first_step_s``.

``--check_tokens N``: the ring's tokens, greedy, for N new tokens at ``--check_budget`` against
the slow decode-time path (decoding/reference.py's ``budget_generate``: BudgetPress, keys re-rotated
at every eviction) and against the ring's uncompiled step, as evaluation/check_decoders.py does
(identical or not, the first differing step, the reference's top-two logit gap there). On the CPU
in float32 they are tested to be identical (tests/test_ring_cache.py); in float16 the slow path's
re-rotations accumulate rounding and near-ties part the sequences.

The result JSON is rewritten after every run, so a run cut short keeps what finished.
``evaluation/long_generation_plot.py`` draws it.
"""

import sys
import time
from pathlib import Path

import torch

from decoding import neox_cuda_graphs, neox_decode, ring_cache
from decoding.reference import END, FIRST_TOKEN, budget_generate
from evaluation import cli, roofline
from evaluation.ceilings import machine_ceilings
from evaluation.check_decoders import agreement, at_first_differences
from evaluation.results import write_json_atomic
from evaluation.speed import prompt_ids, synchronize
from presses import Settings, make_streaming_press

GIB = 2**30


class BinTimer:
    """A step, and generate's ``mark``, that times its calls: the first one alone (compile, warm-up
    and graph capture on CUDA), then every ``bin_tokens`` calls a time point and the memory,
    from which ``bins()`` are made; the host clock at the first token and at the end."""

    def __init__(self, step, bin_tokens: int, device: torch.device):
        self.step, self.bin_tokens, self.device = step, bin_tokens, device
        self.calls, self.points, self.memory, self.peaks, self.at = 0, [], [], [], {}
        self.first_step_s = None

    def load_buffer(self, groups, new_tokens: int, kv_bits: tuple[int, int] | None = None):
        if isinstance(self.step, neox_decode.OwnsBuffer):
            return self.step.load_buffer(groups, new_tokens, kv_bits)
        return neox_decode.load_buffer(groups, new_tokens, kv_bits=kv_bits)

    def _point(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()  # in stream order: the GPU's time, however far ahead of it the host runs
            self.points.append(event)
            # The allocator's counters are the host's (graph replays allocate nothing). Each point's
            # peak is the one since the point before (the first point's: since the run began).
            self.memory.append(torch.cuda.memory_allocated(self.device))
            self.peaks.append(torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.points.append(time.perf_counter())

    def __call__(self, model, state):
        self.calls += 1
        if self.calls == 1:
            start = time.perf_counter()
            token = self.step(model, state)
            synchronize(self.device)
            self.first_step_s = time.perf_counter() - start
            return token
        if (self.calls - 2) % self.bin_tokens == 0:
            self._point()
        return self.step(model, state)

    def mark(self, phase: str) -> None:
        if phase == END:
            self._point()  # the last bin's end
        synchronize(self.device)
        self.at[phase] = time.perf_counter()

    def bins(self) -> list[dict]:
        """Per bin: its first step (0: the step after the prefill's token), steps, mean ms per step,
        and on a GPU the memory allocated at its end and the bin's peak (GiB)."""
        rows = []
        for index, (begin, end) in enumerate(zip(self.points, self.points[1:])):
            first = 1 + index * self.bin_tokens
            steps = min(self.bin_tokens, self.calls - first)
            seconds = begin.elapsed_time(end) / 1e3 if self.device.type == "cuda" else end - begin
            row = {"first_step": first, "steps": steps, "tpot_ms": 1e3 * seconds / steps}
            if self.memory:
                row |= {"memory_gib": self.memory[index + 1] / GIB, "peak_gib": self.peaks[index + 1] / GIB}
            rows.append(row)
        return rows


def parse_args(argv=None):
    parser = cli.Parser(__file__, __doc__)
    cli.add_model_options(parser)
    parser.add_argument("--prompt_tokens", type=int, default=1024)
    parser.add_argument("--new_tokens", type=int, default=16384, help="tokens each ring run generates")
    parser.add_argument("--budget", type=int, nargs="+", default=[1024],
                        help="tokens each layer's ring holds (sinks included); one run each")
    parser.add_argument("--n_sink", type=int, default=4)
    parser.add_argument("--dense_tokens", type=int,
                        help="tokens dense generates (default: up to max_position_embeddings; 0: no dense run)")
    parser.add_argument("--bin_tokens", type=int, default=512)
    parser.add_argument("--check_tokens", type=int, default=0,
                        help="new tokens of the token check against the slow path (0: none)")
    parser.add_argument("--check_budget", type=int, default=256)
    parser.add_argument("--output", type=Path, default=Path("results/tmp/long_generation.json"))
    return parser.parse_args(argv)


def ring_press(n_sink: int, budget: int):
    return make_streaming_press("streaming_llm", Settings(n_sink=n_sink, budget=budget))


def floor_ms(config, attended: float, ceilings) -> float:
    return roofline.step_floor_ms(config, 1, 1, [attended] * config.num_hidden_layers, ceilings)


def timed_run(model, prompt: torch.Tensor, budget: int | None, new_tokens: int, args, ceilings) -> dict:
    """One generation, ``budget`` None: dense; else StreamingLLM on the ring at ``budget``."""
    compile = model.device.type == "cuda"
    torch._dynamo.reset()  # each run compiled for its own shapes
    if budget is None:
        timer = BinTimer(neox_cuda_graphs.compiled_step(compile, "two-stream", keep_buffer=False),
                         args.bin_tokens, model.device)
    else:
        timer = BinTimer(ring_cache.compiled_step(compile), args.bin_tokens, model.device)
    if compile:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(model.device)
    if budget is None:
        generation = neox_decode.generate(model, [prompt], None, new_tokens, step=timer, mark=timer.mark)
    else:
        generation = ring_cache.generate(model, [prompt], ring_press(args.n_sink, budget), new_tokens,
                                         step=timer, mark=timer.mark)
    kept = generation.kept_tokens_layer0
    bins = timer.bins()
    for row in bins:
        # keys attended by the bin's middle step: the kept tokens, the new ones so far (capped at the ring's)
        attended = kept + row["first_step"] + row["steps"] / 2 + 1
        row["floor_ms"] = floor_ms(model.config, attended if budget is None else min(attended, budget + 1), ceilings)
    steady = [row["tpot_ms"] for row in bins]
    return {"method": "dense" if budget is None else "streaming_llm_ring", "budget": budget,
            "n_sink": None if budget is None else args.n_sink, "new_tokens": new_tokens,
            "positions_reached": prompt.shape[1] + new_tokens, "kept_after_prefill": kept,
            "kv_bytes_final": generation.kv_bytes_final,
            # the peak from the prefill on: the bins' peaks, the first one's reaching back to the run's start
            "peak_memory_gib": max(timer.peaks) / GIB if timer.peaks else None,
            "first_step_s": timer.first_step_s,
            "decode_s": timer.at[END] - timer.at[FIRST_TOKEN],  # wall clock, the first step included
            "tpot_ms_mean": sum(r["tpot_ms"] * r["steps"] for r in bins) / sum(r["steps"] for r in bins),
            "tpot_last_over_first_bin": steady[-1] / steady[0], "bins": bins,
            "last_tokens": generation.tokens[0, -8:].tolist()}


def token_check(model, prompt: torch.Tensor, args) -> list[dict]:
    """The ring's tokens (the timed runs' step, and uncompiled) against the slow path's."""
    press = ring_press(args.n_sink, args.check_budget)
    margins = []
    reference = budget_generate(model, prompt, press, args.check_tokens, margins=margins).tokens
    gaps = torch.stack(margins, dim=1)
    rows = []
    for path, step in (("ring_compiled", ring_cache.compiled_step(model.device.type == "cuda")),
                       ("ring_uncompiled", ring_cache.decode_step)):
        torch._dynamo.reset()
        tokens = ring_cache.generate(model, [prompt], press, args.check_tokens, step=step).tokens
        row = agreement(tokens, reference)
        rows.append({"path": path, "reference": "budget_generate (BudgetPress, slow path)", **row,
                     "reference_margin_there": at_first_differences(gaps, row["first_difference"])})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli.one_line_errors():
        for budget in args.budget:
            ring_cache.ring_settings(ring_press(args.n_sink, budget))  # bad settings: before the weights load
        loaded = cli.load(args)
        model = loaded.model
        ceilings = machine_ceilings(model.device)
        prompt = prompt_ids(model.config.vocab_size, 1, args.prompt_tokens, 0).to(model.device)
        dense_tokens = (model.config.max_position_embeddings - args.prompt_tokens
                        if args.dense_tokens is None else args.dense_tokens)
        result = cli.result_header(args, loaded, protocol="long_generation", batch_size=1,
                                   prompt_tokens=args.prompt_tokens, bin_tokens=args.bin_tokens,
                                   max_position_embeddings=model.config.max_position_embeddings,
                                   decode_step="two-stream CUDA graph" if model.device.type == "cuda" else "plain",
                                   ) | {"ceilings": ceilings.to_json(), "runs": [], "check": None}
        plan = [(args.budget[0], args.new_tokens)] + [(None, dense_tokens)] * (dense_tokens > 0)
        plan += [(budget, args.new_tokens) for budget in args.budget[1:]]
        for budget, tokens in plan:
            result["runs"].append(timed_run(model, prompt, budget, tokens, args, ceilings))
            run = result["runs"][-1]
            print(f"{run['method']} budget {budget}: {tokens} tokens, {run['tpot_ms_mean']:.3f} ms/token, "
                  f"last/first bin {run['tpot_last_over_first_bin']:.3f}, peak {run['peak_memory_gib']} GiB",
                  file=sys.stderr, flush=True)
            write_json_atomic(args.output, result)
        if args.check_tokens:
            result["check"] = {"budget": args.check_budget, "new_tokens": args.check_tokens,
                               "rows": token_check(model, prompt, args)}
            write_json_atomic(args.output, result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
