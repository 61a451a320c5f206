"""How alike adjacent layers' KV caches are: MiniCache's premise, measured.

For every pair of adjacent layers (l, l+1): the mean over batch, heads and tokens of the cosine
similarity between layer l's and layer l+1's key (and value) vectors of the same token and head,
after a dense prefill of the first ``--tokens`` tokens of a text. Keys are compared after RoPE:
both layers rotate a token by the same angle, so the rotation does not change the cosine.

  python evaluation/layer_similarity.py --model smollm2-135m --tokens 1536 --output results/X.json
"""

from pathlib import Path

import torch
from torch.nn import functional as F
from transformers import DynamicCache

from evaluation import cli
from evaluation.models import SMOLLM2_ALIAS, data_dir, tokenized_text
from evaluation.results import write_json_atomic


@torch.no_grad()
def adjacent_similarity(model, ids: torch.Tensor) -> dict:
    cache = DynamicCache()
    model.model(input_ids=ids.to(model.device), past_key_values=cache)
    layers = cache.layers
    pairs = range(len(layers) - 1)
    return {part: [F.cosine_similarity(getattr(layers[l], part).float(), getattr(layers[l + 1], part).float(),
                                       dim=-1).mean().item() for l in pairs] for part in ("keys", "values")}


def main(argv=None) -> None:
    parser = cli.Parser(__file__, __doc__)
    cli.add_model_options(parser, default_model=SMOLLM2_ALIAS, default_device="cpu")
    cli.add_data_options(parser)
    parser.add_argument("--tokens", type=int, default=1536)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    with cli.one_line_errors():  # the text, the config and the tokenizer before the weights
        text = tokenized_text(args.model, args.random_init, args.dataset, data_dir(args.data_dir), args.sample_idx)
        loaded = cli.load(args, data_dir=args.data_dir)
    ids = text.ids[None, : args.tokens]
    similarity = adjacent_similarity(loaded.model, ids)
    write_json_atomic(args.output, cli.result_header(args, loaded, data=text.source, tokens=ids.shape[1])
                      | {"adjacent_cosine": similarity})
    for part, values in similarity.items():
        print(part, " ".join(f"{value:.2f}" for value in values))


if __name__ == "__main__":
    main()
