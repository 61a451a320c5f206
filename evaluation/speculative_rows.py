"""Speculative decoding measured against plain decoding of the same prompts in the same run
(evaluation/speculative.py): one row per draft spec, with its acceptance, tokens per verify pass
and wall-clock speed-ups, on the cache kind of --decoder."""

import statistics
import sys

import torch

from decoding import neox_cuda_graphs, neox_decode
from decoding import static_cache
from decoding.reference import END, FIRST_TOKEN, START, kvpress_generate, no_mark
from decoding.registry import decoder
from decoding.speculative import Stats, speculative_generate
from evaluation.data import DataError, load_text
from evaluation.drafts import build_draft
from evaluation.speed import Clock, timed
from presses import make_press


def prompts_from(args, loaded) -> list[tuple[str, torch.Tensor]]:
    """``num_prompts`` windows of ``prompt_tokens`` per dataset, spread evenly over each text."""
    tokenizer = loaded.tokenizer()
    prompts = []
    for dataset in args.dataset:
        text, source = load_text(dataset, loaded.data_folder, args.sample_idx if dataset == "pg19" else 0)
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        stride = (ids.numel() - args.prompt_tokens) // args.num_prompts
        if stride < 1:
            raise DataError(f"{source}: {ids.numel()} tokens, too few for {args.num_prompts} prompts of "
                            f"{args.prompt_tokens}")
        for index in range(args.num_prompts):
            start = index * stride
            prompts.append((f"{source} tokens {start}..{start + args.prompt_tokens}",
                            ids[start:start + args.prompt_tokens][None]))
    return prompts


def cache_kind(args) -> str:
    """decoding/speculative.py's name for the cache of ``--decoder``: dynamic, static or neox."""
    return decoder(args.decoder).speculative_cache


def plain(args, model, prompt, press, step):
    """Plain greedy decoding with the same cache kind: tokens and timings."""
    if cache_kind(args) == "static":
        run = timed(static_cache.generate, model.device, model, prompt, press, args.new_tokens, step=step)
    elif cache_kind(args) == "neox":
        run = timed(neox_decode.generate, model.device, model, list(prompt.split(1)), press, args.new_tokens,
                    step=step)
    else:
        run = timed(kvpress_generate, model.device, model, prompt, press, args.new_tokens)
    return run["tokens"], run["ttft_s"], run["decode_s"]


def speculative_rows(args, loaded, specs, dtype, save) -> list[dict]:
    """One row per draft spec; ``save(rows)`` after each, so a run cut short keeps its finished specs."""
    model = loaded.model
    prompts = [(source, ids.to(model.device)) for source, ids in prompts_from(args, loaded)]
    target_press = make_press(args.press, args.compression_ratio) if args.press else None
    compile = cache_kind(args) != "dynamic" and model.device.type == "cuda"
    step = neox_cuda_graphs.compiled_step(compile) if cache_kind(args) == "neox" else static_cache.compiled_step(compile)

    for _ in range(args.warmup):
        plain(args, model, prompts[0][1], target_press, step)
    baseline = [plain(args, model, ids, target_press, step) for _, ids in prompts]
    rows, chosen = [], {"largest": max([spec.skip for spec in specs if spec.skip], default=0)}
    for spec in specs:
        draft, description = build_draft(spec, args, loaded, dtype, chosen)

        def run(ids, stats, seed, mark=no_mark):
            generator = torch.Generator(device=model.device).manual_seed(seed)
            return speculative_generate(model, ids, draft, args.new_tokens, k=spec.k, press=target_press,
                                        temperature=args.temperature, adaptive=spec.adaptive, k_max=spec.k_max,
                                        cache=cache_kind(args), compile=compile, generator=generator, stats=stats,
                                        mark=mark)

        for _ in range(args.warmup):
            run(prompts[0][1], Stats(), args.seed)
        per_prompt, total, total_ttft, total_decode = [], Stats(), 0.0, 0.0
        for index, ((source, ids), (plain_tokens, plain_ttft, plain_decode)) in enumerate(zip(prompts, baseline)):
            stats, clock = Stats(), Clock(model.device)
            tokens = run(ids, stats, args.seed + index, clock)
            ttft, decode = clock.seconds(START, FIRST_TOKEN), clock.seconds(FIRST_TOKEN, END)
            total.proposed += stats.proposed
            total.accepted += stats.accepted
            total_ttft += ttft
            total_decode += decode
            per_prompt.append({"prompt": source, **stats.summary(), "ttft_s": ttft,
                               "decode_s": decode, "plain_ttft_s": plain_ttft, "plain_decode_s": plain_decode,
                               "identical_to_plain": bool(torch.equal(tokens, plain_tokens))})
        plain_ttft = sum(b[1] for b in baseline)
        plain_decode = sum(b[2] for b in baseline)
        row = {"spec": spec.text, "kind": spec.kind, **description, "k": "adaptive" if spec.adaptive else spec.k,
               "k_max": spec.k_max, **total.summary(),
               "decode_speedup": plain_decode / total_decode,
               "end_to_end_speedup": (plain_ttft + plain_decode) / (total_ttft + total_decode),
               "plain_decode_ms_per_token": 1e3 * plain_decode / (len(prompts) * (args.new_tokens - 1)),
               "speculative_decode_ms_per_token": 1e3 * total_decode / (len(prompts) * (args.new_tokens - 1)),
               "identical_to_plain": all(p["identical_to_plain"] for p in per_prompt) if args.temperature == 0 else None,
               "median_prompt_acceptance_rate": statistics.median(p["acceptance_rate"] for p in per_prompt),
               "prompts": per_prompt}
        rows.append(row)
        save(rows)
        print(f"{spec.text}: acceptance {row['acceptance_rate']:.3f}, {row['tokens_per_verify_pass']:.2f} tokens "
              f"per verify pass, decode speedup {row['decode_speedup']:.2f}x", file=sys.stderr)
    return rows
