"""KVSharer: layer-wise dissimilar KV cache sharing (Yang et al. 2024, "KVSharer: Efficient
Inference via Layer-Wise Dissimilar KV Cache Sharing"), training-free."""

from dataclasses import dataclass

import torch
from kvpress import BasePress
from torch.nn import functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from presses.cross_layer_cache import SharedLayer, SourceFeed


@dataclass
class KVSharerPress(BasePress):
    """KVSharer (Yang et al. 2024): some layers use an earlier layer's KV cache instead of their
    own and store nothing. The sharing map comes from a calibration pass (``calibrate``) on a
    short text: every layer's KV cache is averaged over the calibration samples; layer pairs are
    ranked by the Euclidean distance between their averaged caches, most *dissimilar* first (the
    paper's counter-intuitive finding: sharing dissimilar caches hurts less than sharing similar
    ones); greedily, the later layer j of each pair takes the earlier layer i's cache, and the
    share is kept only if the final hidden states with all shares so far stay close to the
    dense model's (mean cosine similarity over the samples above ``threshold``), until
    round(``compression_ratio`` x layers) layers are shared. A layer whose source is itself
    shared reads that layer's source instead (no chains). ``most_similar_first`` ranks the
    pairs the intuitive way instead (the paper's ablation; a control).

    While the press is active, layer j attends with its own queries to layer i's keys and values
    at prefill and at every decode step. Composition: put it first in a kvpress ComposedPress
    (``ComposedPress([KVSharerPress(...), SnapKVPress(...)])``); its hook on layer i records what
    layer i's attention used before a later press shortens layer i's cache, so that layer j's
    prefill attention sees the same tokens; from then on j reads i's shortened cache."""

    compression_ratio: float = 0.0
    threshold: float = 0.5
    most_similar_first: bool = False
    sample_tokens: int = 64  # calibration samples: the text cut into pieces of this many tokens
    sharing: dict[int, int] | None = None  # layer j -> the earlier layer i whose cache it reads; None: not calibrated

    def __post_init__(self):
        if not 0.0 <= self.compression_ratio < 1.0:
            raise ValueError(f"compression ratio must be in [0, 1), got {self.compression_ratio}")
        self._feeds: dict[int, SourceFeed] = {}

    def post_init_from_model(self, model):
        if self.sharing is None and self.target_count(len(model.model.layers)) > 0:
            raise ValueError("KVSharerPress needs calibrate(model, ids) on a calibration text first (or a sharing map)")

    def forward_hook(self, module, input, kwargs, output):
        index = module.layer_idx
        readers = sorted(j for j, i in (self.sharing or {}).items() if i == index)
        if not readers:
            return output
        cache = kwargs["past_key_values"]
        feed = self._feeds.setdefault(index, SourceFeed())
        feed.set(cache.layers[index].keys, cache.layers[index].values)
        while len(cache.layers) <= readers[-1]:  # DynamicCache creates layers on their first update
            cache.layers.append(DynamicLayer())
        for j in readers:
            if not isinstance(cache.layers[j], SharedLayer):
                cache.layers[j] = SharedLayer(cache.layers[index], feed, last_reader=j == readers[-1])
        return output

    def target_count(self, layers: int) -> int:
        return int(self.compression_ratio * layers + 0.5)

    @torch.no_grad()
    def calibrate(self, model, ids: torch.Tensor) -> dict:
        """Choose ``sharing`` on the calibration text ``ids`` (1-D token ids), cut into samples of
        ``sample_tokens`` tokens run as one batch; returns the facts to record with the results."""
        self.sharing = {}
        ids = ids[: ids.numel() // self.sample_tokens * self.sample_tokens].view(-1, self.sample_tokens)
        target = self.target_count(len(model.model.layers))
        if target == 0:
            return {"shared_layers": {}, "calibration_checks": 0}
        dense_hidden, averaged = self._run(model, ids, keep_cache=True)
        pairs = self._ranked_pairs(averaged)
        checks = 0
        for i, j in pairs:
            if j in self.sharing or j in self.sharing.values():
                continue  # j already reads another layer, or other layers read j
            candidate = dict(self.sharing)
            candidate[j] = self.sharing.get(i, i)
            previous, self.sharing = self.sharing, candidate
            hidden, _ = self._run(model, ids, keep_cache=False)
            checks += 1
            similarity = F.cosine_similarity(hidden.flatten(1).float(), dense_hidden.flatten(1).float()).mean()
            if not similarity > self.threshold:  # written so that a NaN similarity rejects the share
                self.sharing = previous
            if len(self.sharing) == target:
                break
        return {"shared_layers": {str(j): i for j, i in sorted(self.sharing.items())}, "calibration_checks": checks}

    def _run(self, model, ids, keep_cache: bool):
        """Final hidden states of ``ids`` with the current sharing and, if asked, every layer's
        keys and values averaged over the samples."""
        cache = DynamicCache()
        with self(model):
            hidden = model.model(input_ids=ids.to(model.device), past_key_values=cache).last_hidden_state
        averaged = [(layer.keys.float().mean(0), layer.values.float().mean(0)) for layer in cache.layers] \
            if keep_cache else None
        return hidden, averaged

    def _ranked_pairs(self, averaged) -> list[tuple[int, int]]:
        """Layer pairs (i, j), i < j, by the distance between their averaged caches (mean over
        heads and positions of the L2 distance, keys and values averaged), largest first."""
        distances = {}
        for j in range(len(averaged)):
            for i in range(j):
                key_distance = (averaged[i][0] - averaged[j][0]).norm(dim=-1).mean()
                value_distance = (averaged[i][1] - averaged[j][1]).norm(dim=-1).mean()
                distances[(i, j)] = float(key_distance + value_distance) / 2
        return sorted(distances, key=distances.get, reverse=not self.most_similar_first)
