"""How alike adjacent layers' KV caches are: MiniCache's premise, measured.

For every pair of adjacent layers (l, l+1): the mean over batch, heads and tokens of the cosine
similarity between layer l's and layer l+1's key (and value) vectors of the same token and head,
after a dense prefill of the first ``--tokens`` tokens of a text. Keys are compared after RoPE:
both layers rotate a token by the same angle, so the rotation does not change the cosine.

  python evaluation/layer_similarity.py --model smollm2-135m --tokens 1536 --output results/X.json
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F
from transformers import DynamicCache

from evaluation.data import load_text
from evaluation.models import load_model
from evaluation.results import environment, write_json_atomic


@torch.no_grad()
def adjacent_similarity(model, ids: torch.Tensor) -> dict:
    cache = DynamicCache()
    model.model(input_ids=ids.to(model.device), past_key_values=cache)
    layers = cache.layers
    pairs = range(len(layers) - 1)
    return {part: [F.cosine_similarity(getattr(layers[l], part).float(), getattr(layers[l + 1], part).float(),
                                       dim=-1).mean().item() for l in pairs] for part in ("keys", "values")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="wikitext")
    parser.add_argument("--tokens", type=int, default=1536)
    parser.add_argument("--data-dir", dest="data_dir")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    loaded = load_model(args.model, False, "float32", "cpu", "sdpa", args.data_dir)
    text, source = load_text(args.dataset, loaded.data_folder)
    ids = loaded.tokenizer()(text, return_tensors="pt").input_ids[:, : args.tokens]
    similarity = adjacent_similarity(loaded.model, ids)
    write_json_atomic(args.output, {"command": "python evaluation/layer_similarity.py " + " ".join(sys.argv[1:]),
                                    "model": args.model, "model_tier": loaded.tier, "data": source,
                                    "tokens": ids.shape[1], "environment": environment("cpu"),
                                    "adjacent_cosine": similarity})
    for part, values in similarity.items():
        print(part, " ".join(f"{value:.2f}" for value in values))


if __name__ == "__main__":
    main()
