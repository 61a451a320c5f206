"""Speculative decoding, lossless: a draft proposes k tokens, the target checks them in one
forward pass of k+1 tokens (Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023,
arXiv:2302.01318).

- Greedy (temperature 0): the target's argmax at every position of the verify pass; drafts are
  accepted while they equal it, then the target's own token follows. The output is exactly the
  target's greedy decoding.
- Sampling (temperature T > 0): draft token x, drawn from the draft's q, is accepted with
  probability min(1, p(x)/q(x)), p the target's distribution; at the first rejection the token is
  drawn from norm(max(0, p - q)); if all k are accepted a bonus token is drawn from the target's
  last distribution. Every emitted token is distributed as the target's sampling would give.

Drafts (each with ``start``, ``propose``, ``commit``):
- ``ModelDraft(model)``: a separate smaller model with its own cache (Pythia-160m for
  Pythia-2.8B: the suite shares one tokenizer).
- ``ModelDraft(target, press)``: the target itself with its own copy of the cache, pressed to a
  small budget at prefill by any press (StreamingLLM sink + window, SnapKV): TriForce
  (Sun et al. 2024, arXiv:2404.11912) / MagicDec (Chen et al. 2024, arXiv:2408.11049) style.
- ``LayerSkipDraft(target, skip)``: the target skipping some decoder layers, reading and
  writing the target's own cache (decoding/layer_skip.py).

The target's cache may be pressed at prefill by any press (as in decoding/static_cache.py).
Rejected tokens are rolled back from every cache: a DynamicCache is cropped layer by layer
(a press such as PyramidKV leaves layers with different lengths), a StaticCache only needs its
write slot moved back, since the attention mask hides every slot after the query's.
``cache`` picks where both models decode: ``dynamic`` (DynamicCache), ``static`` (a StaticCache,
HF's forward) or ``neox`` (GPT-NeoX only: decoding/neox_decode.py's buffer and step, the path
whose step costs evaluation/speculative_costs.py measures); with ``compile=True`` each forward
shape of the last two is compiled with torch.compile(mode="reduce-overhead") (CUDA graphs on a GPU).

A batch advances together: it accepts the smallest number of drafts any row accepted, and each
row's next token is the one its own rule gives at that position, so each row stays exact.
"""

from dataclasses import dataclass, field

import torch

from decoding import neox_decode
from decoding.reference import END, FIRST_TOKEN, START, PhaseMarker, no_mark
from decoding.reference import prefill as prefill_dynamic
from decoding.static_cache import to_static_cache
from decoding.layer_skip import skipping_model
from decoding.registry import DECODERS, SPECULATIVE_DECODERS


def forward_logits(model, tokens, cache, positions, slots):
    """Logits of ``tokens`` (batch, n) at text ``positions`` (batch, n), their keys and values
    written to cache ``slots`` (n,) of a StaticCache (``None``: appended to a DynamicCache)."""
    return model(input_ids=tokens, past_key_values=cache, position_ids=positions, cache_position=slots).logits


def neox_forward_logits(model, tokens, buffer, positions, slots):
    """``forward_logits`` on the neox buffer (decoding/neox_decode.py), whose ``slots`` count
    the tokens after the kept ones."""
    return neox_decode.forward_logits(model, neox_decode.StepState(buffer, tokens, positions, slots))


CACHES = tuple(DECODERS[name].speculative_cache for name in SPECULATIVE_DECODERS)  # dynamic, static, neox


def make_step(compile: bool, cache: str = "static"):
    """The forward for ``cache`` (HF's ``forward_logits``, or ``neox_forward_logits``),
    compiled into CUDA-graph replays when ``compile`` is set. Replays reuse their output
    buffers, so the logits are cloned before the next replay."""
    forward = neox_forward_logits if cache == "neox" else forward_logits
    if not compile:
        return forward
    compiled = torch.compile(forward, mode="reduce-overhead", fullgraph=cache == "neox")
    return lambda *args: compiled(*args).clone()


@dataclass
class Mark:
    """Where a cached model stood before a speculative forward: text position, StaticCache slot,
    and (DynamicCache) each layer's length."""
    position: int
    slot: int
    lengths: list[int] | None


class CachedModel:
    """A model with its KV cache and where the next token goes (text position, cache slot)."""

    def __init__(self, model, cache, position: int, slot: int, step, kind: str):
        self.model, self.cache, self.position, self.slot, self.step = model, cache, position, slot, step
        self.kind = kind  # one of CACHES
        self.indexed = kind != "dynamic"  # a StaticCache or the neox buffer: written by slot

    def forward(self, tokens: torch.Tensor, model=None) -> torch.Tensor:
        """Run ``tokens`` (batch, n) after what the cache holds, with ``model`` (default: this
        one; a layer-skipping view shares the cache); return logits (batch, n, vocab)."""
        batch, n = tokens.shape
        positions = torch.arange(self.position, self.position + n, device=tokens.device).expand(batch, n)
        slots = torch.arange(self.slot, self.slot + n, device=tokens.device) if self.indexed else None
        logits = self.step(model or self.model, tokens, self.cache, positions, slots)
        self.position += n
        self.slot += n
        return logits

    def mark(self) -> Mark:
        lengths = None if self.indexed else [layer.keys.shape[2] for layer in self.cache.layers]
        return Mark(self.position, self.slot, lengths)

    def rewind(self, mark: Mark, keep: int) -> None:
        """Keep the first ``keep`` tokens written since ``mark``, drop the rest."""
        self.position, self.slot = mark.position + keep, mark.slot + keep
        if not self.indexed:
            for layer, length in zip(self.cache.layers, mark.lengths):
                layer.crop(length + keep)  # no-op on a layer that holds no more (a skipped layer)


@torch.no_grad()
def prefill(model, prompt: torch.Tensor, press, cache: str, room: int, step) -> tuple[torch.Tensor, CachedModel]:
    """The prompt through ``model`` with ``press`` active; return the last position's logits
    (batch, vocab) and the model with its (pressed) cache of kind ``cache``: the DynamicCache
    as it is, or moved into a StaticCache or the neox buffer with ``room`` free slots (the neox
    buffer's slots count the tokens after the kept ones, from 0)."""
    if cache == "neox":
        logits, groups = neox_decode.prefill(model, list(prompt.split(1)), press)
        return logits, CachedModel(model, neox_decode.load_buffer(groups, room), prompt.shape[1], 0, step, cache)
    logits, pressed = prefill_dynamic(model, prompt, press)
    if cache == "static":
        static, slot = to_static_cache(model, pressed, room)
        return logits, CachedModel(model, static, prompt.shape[1], slot, step, cache)
    return logits, CachedModel(model, pressed, prompt.shape[1], pressed.get_seq_length(0), step, cache)


def choose(logits: torch.Tensor, temperature: float, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token (batch, 1) from last-position ``logits`` (batch, vocab): the argmax at temperature
    0, else a sample; with its probabilities (batch, vocab), or None when greedy."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True), None
    probs = (logits.float() / temperature).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator), probs


class ModelDraft:
    """A draft with its own cache: another model, or the target with a press on its copy of the
    cache. The draft has seen the prompt and every committed token but the newest; the newest
    (and, when all k drafts were accepted, the last draft, never run through it) is fed first."""

    def __init__(self, model, press=None):
        self.model, self.press = model, press

    def start(self, prompt, target: CachedModel, room: int, step) -> None:
        _, self.runner = prefill(self.model, prompt, self.press, target.kind, room, step)
        self.backlog = prompt[:, :0]

    def propose(self, last: torch.Tensor, k: int, temperature: float, generator):
        self.mark = self.runner.mark()
        feed = torch.cat([self.backlog, last], dim=1)
        self.fed = feed.shape[1]
        tokens, probs = [], []
        for _ in range(k):
            token, prob = choose(self.runner.forward(feed)[:, -1], temperature, generator)
            tokens.append(token)
            probs.append(prob)
            feed = token
        return torch.cat(tokens, dim=1), None if temperature == 0 else torch.stack(probs, dim=1)

    def commit(self, proposal: torch.Tensor, accepted: int) -> None:
        k = proposal.shape[1]
        # The draft ran the backlog, the newest token and drafts 0..k-2: keep those accepted.
        self.runner.rewind(self.mark, self.fed + min(accepted, k - 1))
        self.backlog = proposal[:, k - 1:] if accepted == k else proposal[:, :0]


class LayerSkipDraft:
    """The target skipping ``skip`` layers, on the target's own cache: it reads the full
    model's keys/values of every committed token, and its own writes (kept layers only) are
    rolled back before the target verifies, which writes those slots again."""

    def __init__(self, model, skip: list[int]):
        self.skip = sorted(skip)
        self.view = skipping_model(model, self.skip)

    def start(self, prompt, target: CachedModel, room: int, step) -> None:
        self.target = target

    def propose(self, last: torch.Tensor, k: int, temperature: float, generator):
        mark = self.target.mark()
        feed, tokens, probs = last, [], []
        for _ in range(k):
            token, prob = choose(self.target.forward(feed, model=self.view)[:, -1], temperature, generator)
            tokens.append(token)
            probs.append(prob)
            feed = token
        self.target.rewind(mark, 0)
        return torch.cat(tokens, dim=1), None if temperature == 0 else torch.stack(probs, dim=1)

    def commit(self, proposal: torch.Tensor, accepted: int) -> None:
        pass  # the target's verify pass wrote the accepted tokens' keys/values


def accept_greedy(target_logits: torch.Tensor, proposal: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Drafts accepted by the whole batch and the token after them (batch, 1): the target's
    argmax there, which is the draft itself in rows that accepted more."""
    target_tokens = target_logits.argmax(-1)  # (batch, k+1)
    matches = (proposal == target_tokens[:, :-1]).long()
    accepted = int(matches.cumprod(-1).sum(-1).min())
    return accepted, target_tokens[:, accepted:accepted + 1]


def accept_sampled(p: torch.Tensor, q: torch.Tensor, proposal: torch.Tensor, generator) -> tuple[int, torch.Tensor]:
    """Leviathan et al.'s rule with target probabilities ``p`` (batch, k+1, vocab), draft
    probabilities ``q`` (batch, k, vocab). Returns the drafts accepted by the whole batch and
    each row's token after them (batch, 1)."""
    batch, k = proposal.shape
    p_draft = p[:, :k].gather(-1, proposal[..., None])[..., 0]
    q_draft = q.gather(-1, proposal[..., None])[..., 0]
    uniform = torch.rand(batch, k, generator=generator, device=generator.device).to(p.device)
    ok = (uniform * q_draft < p_draft).long()  # u < p/q, i.e. accept with probability min(1, p/q)
    row_accepted = ok.cumprod(-1).sum(-1)
    accepted = int(row_accepted.min())
    if accepted == k:  # every row accepted every draft: a bonus token from the last distribution
        return k, torch.multinomial(p[:, k], 1, generator=generator)
    residual = (p[:, accepted] - q[:, accepted]).clamp(min=0)
    # p == q leaves no residual, but then no row can have rejected: draw from p to stay defined.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, accepted])
    # A row that rejected here draws from norm(max(0, p - q)); a row that accepted keeps its draft.
    resampled = torch.multinomial(residual / residual.sum(-1, keepdim=True), 1, generator=generator)
    kept = proposal[:, accepted:accepted + 1]
    return accepted, torch.where((row_accepted > accepted)[:, None], kept, resampled)


@dataclass
class Stats:
    """Per verify pass: drafts proposed (k) and drafts accepted."""
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    target: CachedModel | None = field(default=None, repr=False)  # the target and its cache, after the run

    def summary(self) -> dict:
        drafted, accepted, passes = sum(self.proposed), sum(self.accepted), len(self.proposed)
        rejections = sum(a < k for a, k in zip(self.accepted, self.proposed))
        return {
            "verify_passes": passes,
            "drafted_tokens": drafted,
            "accepted_tokens": accepted,
            # fraction of proposed drafts accepted (drafts after a rejection count as not accepted)
            "acceptance_rate": accepted / drafted if drafted else None,
            # Leviathan et al.'s alpha, per-token acceptance probability: accepted / (accepted + rejections)
            "alpha": accepted / (accepted + rejections) if accepted + rejections else None,
            "mean_accepted_drafts": accepted / passes if passes else None,
            "tokens_per_verify_pass": (accepted + passes) / passes if passes else None,
        }


def next_k(k: int, accepted: int, k_max: int) -> int:
    """Adaptive k, the schedule of transformers' assisted generation ("heuristic"): two more
    after a pass that accepted every draft, one fewer otherwise, within [1, k_max]."""
    return min(k_max, k + 2) if accepted == k else max(1, k - 1)


@torch.no_grad()
def speculative_generate(target, prompt: torch.Tensor, draft, new_tokens: int, k: int = 4, press=None,
                         temperature: float = 0.0, adaptive: bool = False, k_max: int = 8, cache: str = "dynamic",
                         compile: bool = False, generator: torch.Generator | None = None,
                         stats: Stats | None = None, mark: PhaseMarker = no_mark) -> torch.Tensor:
    """Exactly ``new_tokens`` tokens (batch, new_tokens) after ``prompt`` (batch, length), as
    the target with ``press`` at prefill would decode them, proposed by ``draft``.
    ``adaptive``: k follows ``next_k`` from ``k`` up to ``k_max``. Returns the tokens; ``stats``,
    if given, receives the acceptance counts. ``mark``: see decoding/reference.py (the first
    token is marked after the prefill of target and draft)."""
    if k < 1 or (adaptive and k_max < k):
        raise ValueError(f"need 1 <= k <= k_max, got k={k}, k_max={k_max}")
    if temperature > 0 and generator is None:
        generator = torch.Generator(device=prompt.device).manual_seed(0)
    stats = stats if stats is not None else Stats()
    if cache not in CACHES:
        raise ValueError(f"unknown cache {cache!r}; choose from {', '.join(CACHES)}")
    step = make_step(compile, cache)
    room = new_tokens + max(k, k_max) + 2  # every cache slot a verify pass may write
    mark(START)
    logits, runner = prefill(target, prompt, press, cache, room, step)
    last, _ = choose(logits, temperature, generator)
    draft.start(prompt, runner, room, step)
    mark(FIRST_TOKEN)

    generated, count = [last], 1
    while count < new_tokens:
        proposal, q = draft.propose(last, k, temperature, generator)
        before = runner.mark()
        target_logits = runner.forward(torch.cat([last, proposal], dim=1))  # (batch, k+1, vocab)
        if temperature == 0:
            accepted, last = accept_greedy(target_logits, proposal)
        else:
            p = (target_logits.float() / temperature).softmax(-1)
            accepted, last = accept_sampled(p, q, proposal, generator)
        runner.rewind(before, 1 + accepted)  # the previous token and the accepted drafts stay cached
        draft.commit(proposal, accepted)
        generated += [proposal[:, :accepted], last]
        count += accepted + 1
        stats.proposed.append(k)
        stats.accepted.append(accepted)
        if adaptive:
            k = next_k(k, accepted, k_max)
    mark(END)
    stats.target = runner
    return torch.cat(generated, dim=1)[:, :new_tokens]
