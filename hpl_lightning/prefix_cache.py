"""Rollouts that prefill each unique context token once, with every episode in flight in one decoding loop (issue 21).

LocalPolicy (the ``recompute`` engine) re-encodes every conversation at every turn: a 10-turn ScienceWorld episode
prefills ~8x its unique tokens. Here each episode continues from the KV cache of its previous turn (a ``ContextPool``
kept across calls); prefixes that several conversations of a call share (the system turn and instruction of every
episode, a task's expert prefix under its Monte-Carlo samples) are encoded once and kept; and a turn prefills only
each episode's new tokens, batched: per-episode caches of different lengths are left-padded into one batch cache,
with per-row positions, so the keys/values and hence the greedy text are the ones the recompute path computes (up to
float rounding). The batch cache is allocated once per turn for all its tokens, so a decoding step writes one column
instead of copying the cache. Sampling draws from one generator per request, seeded by the request's key (rollout
and turn), so a sample does not depend on the other episodes in its batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
from transformers.generation.stopping_criteria import StopStringCriteria

from hpl_lightning.errors import UsageError
from hpl_lightning.policies import Conversation, LocalPolicy, request_keys, request_seed, truncate_at_stop

# How a local model computes a turn: ``prefix-cache`` (PrefixCachePolicy, the default) or ``recompute``
# (LocalPolicy: every context re-encoded at every turn, batches of ``batch_size``; the reference).
Engine = Literal["prefix-cache", "recompute"]
DEFAULT_ENGINE: Engine = "prefix-cache"

# Prompt tokens kept before the generated ones when checking stop strings: a stop string may begin in the prompt,
# as generate's StopStringCriteria sees it.
_STOP_CONTEXT = 16


@dataclass
class CachedContext:
    """The keys and values of ``ids`` at every layer (``[kv_heads, len(ids), head_dim]``), to continue from."""

    ids: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """The number of leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


@dataclass
class ContextPool:
    """The cached contexts a policy continues from, at most ``capacity`` tokens beyond the ones the last call used
    or made (least recently used go first). None is a prefix of another: the longer one gives at least as much.
    Shared by the greedy and the sampling policy of an exploration (the KV of a context does not depend on
    temperature), so a task's expert prefix encoded for one serves the other."""

    capacity: int
    contexts: list[CachedContext] = field(default_factory=list)  # least recently used first

    def match(self, ids: torch.Tensor, extra: Sequence[CachedContext] = ()) -> tuple[CachedContext | None, int]:
        """The context sharing the longest prefix with ``ids`` and how many tokens it gives (at most
        ``len(ids) - 1``: a row feeds at least one token, whose logits start its turn)."""
        best, reused = None, 0
        for cached in [*self.contexts, *extra]:
            n = min(common_prefix(cached.ids, ids), len(ids) - 1)
            if n > reused:
                best, reused = cached, n
        return best, reused

    def update(self, used: Sequence[CachedContext | None], made: Sequence[CachedContext]) -> None:
        """After a call: ``used`` contexts become the most recent, ``made`` ones join (replacing their prefixes),
        then the least recent of the others go until the pool is within ``capacity`` tokens."""
        distinct: dict[tuple[int, ...], CachedContext] = {}
        for c in made:  # episodes that wrote the same text from the same prompt: one context
            distinct.setdefault(tuple(c.ids.tolist()), c)
        made = list(distinct.values())
        recent = {id(c) for c in [*used, *made] if c is not None}
        kept = [c for c in self.contexts + made if not any(_extends(longer, c) for longer in made if longer is not c)]
        kept.sort(key=lambda c: id(c) in recent)  # stable: least recently used first
        total = sum(len(c.ids) for c in kept)
        while kept and id(kept[0]) not in recent and total > self.capacity:
            total -= len(kept.pop(0).ids)
        self.contexts = kept


def _extends(longer: CachedContext, prefix: CachedContext) -> bool:
    return len(prefix.ids) <= len(longer.ids) and common_prefix(prefix.ids, longer.ids) == len(prefix.ids)


def shared_prefixes(prompts: list[torch.Tensor]) -> list[list[tuple[int, list[int]]]]:
    """The prefixes worth encoding once for ``prompts``, by level: each ``(length, members)`` is a prefix that the
    prompts ``members`` (two or more) share. Level 0 holds the longest prefixes of disjoint groups; a prefix at a
    deeper level extends one of the level above (the prefix tree of the sorted prompts: all episodes share the
    instruction, the Monte-Carlo samples of one task its expert prefix, identical prompts all of it). A member
    continuing from a prefix that is its whole prompt feeds its last token again (its logits start the turn)."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i].tolist())
    adjacent = [common_prefix(prompts[a], prompts[b]) for a, b in zip(order, order[1:])]
    levels: list[list[tuple[int, list[int]]]] = []

    def split(lo: int, hi: int, above: int, level: int) -> None:  # members order[lo:hi], sharing `above` tokens
        if hi - lo < 2:
            return
        length = min(adjacent[lo:hi - 1])
        if length > above:
            levels.extend([] for _ in range(level + 1 - len(levels)))
            levels[level].append((length, [order[k] for k in range(lo, hi)]))
            above, level = length, level + 1
        starts = [lo] + [k + 1 for k in range(lo, hi - 1) if adjacent[k] <= length]
        if len(starts) > 1:  # groups that share more than `length`
            for a, b in zip(starts, starts[1:] + [hi]):
                split(a, b, above, level)

    split(0, len(prompts), 0, 0)
    return levels


class _TurnLayer(DynamicLayer):
    """A layer's batch cache in a buffer allocated for the whole turn: an update writes its columns in place and
    returns a view, where ``DynamicLayer`` concatenates (copies every cached key at every decoding step)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.buffers, self.length = (keys, values), length
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        keys, values = self.buffers
        keys[:, :, self.length:end] = key_states
        values[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.buffers = tuple(b[indices] for b in self.buffers)
        self.keys, self.values = self.buffers[0][:, :, :self.length], self.buffers[1][:, :, :self.length]


class PrefixCachePolicy(LocalPolicy):
    """:class:`LocalPolicy` with the same prompts (window and truncation) and stops, computed incrementally.

    ``cache_tokens``: how many cached context tokens to keep besides the ones in use (a KV cache of
    ``2 x layers x kv_heads x head_dim`` numbers per token: 46 KB for SmolLM2-135M in float32). ``prefilled`` counts
    the context tokens fed to the model (decoding steps aside), for ``prefill_per_unique`` in
    ``benchmarks/rollout_speed.py``.
    """

    def __init__(self, *args: Any, cache_tokens: int = 32768, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.prefilled = 0
        self.pool = ContextPool(cache_tokens)  # a shallow copy (pipeline.make_policies' sampler) shares it
        self._sent: Counter = Counter()
        self._stop = StopStringCriteria(self.tokenizer, list(self.stop)) if self.stop else None

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"engine": "prefix-cache"}

    def clear(self) -> None:
        """Forgets every cached context (a benchmark's fresh start; the next call encodes its prefixes again)."""
        self.pool.contexts = []

    def generate(self, conversations: list[Conversation], keys: Sequence[str] | None = None) -> list[str]:
        if not conversations:
            return []
        prompts = [torch.tensor(self.prompt_ids(c), device=self.device) for c in conversations]
        keys = list(keys) if keys is not None else request_keys(conversations, self._sent)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads or threads)
        try:
            texts = self._turn(prompts, keys)
        finally:
            torch.set_num_threads(threads)
        return texts

    def _share_prefixes(self, prompts: list[torch.Tensor]) -> list[CachedContext]:
        """Encodes once each prefix that two or more ``prompts`` share beyond what is cached for them, a batched
        forward per level of the prefix tree; returns the new contexts."""
        reused = [self.pool.match(p)[1] for p in prompts]
        new: list[CachedContext] = []
        for level in shared_prefixes(prompts):
            rows = []
            for length, members in level:
                if sum(length > reused[i] for i in members) < 2:
                    continue  # cached already for all but one member: nothing saved
                ids = prompts[members[0]][:length]
                rows.append((*self.pool.match(ids, new), ids))
            if rows:
                cache, mask, _ = self._prefill(rows, 0)
                new += [_extract(cache, mask, row, ids) for row, (_, _, ids) in enumerate(rows)]
        return new

    @torch.no_grad()
    def _prefill(self, rows: list[tuple[CachedContext | None, int, torch.Tensor]], room: int
                 ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Feeds each row's ``ids[reused:]`` after ``reused`` cached tokens, all rows in one forward, into a batch
        cache with ``room`` more columns (the decoding steps to come).

        Layout per row: ``[pad][cached][pad][new]``; the mask hides the pads and positions count real tokens only,
        so every row computes what it would alone. Returns the batch cache, its mask and the last logits."""
        past = max(r for _, r, _ in rows)
        width = max(len(ids) - r for _, r, ids in rows)
        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (len(rows), heads, past + width + room, dim)
        layers = []
        for layer in range(config.num_hidden_layers):
            keys, values = (torch.zeros(shape, dtype=self.model.dtype, device=self.device) for _ in range(2))
            for row, (cached, reused, _) in enumerate(rows):
                if cached is not None and reused:
                    keys[row, :, past - reused:past] = cached.keys[layer][:, :reused]
                    values[row, :, past - reused:past] = cached.values[layer][:, :reused]
            layers.append(_TurnLayer(keys, values, past))
        mask = torch.zeros(len(rows), past + width, dtype=torch.long, device=self.device)
        inputs = torch.full((len(rows), width), self.tokenizer.pad_token_id, device=self.device)
        positions = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for row, (_, reused, ids) in enumerate(rows):
            new = len(ids) - reused
            mask[row, past - reused:past] = 1
            mask[row, past + width - new:] = 1
            inputs[row, width - new:] = ids[reused:]
            positions[row] = reused  # the pads' positions do not matter (masked)
            positions[row, width - new:] = torch.arange(reused, len(ids), device=self.device)
            self.prefilled += new
        cache = DynamicCache()
        cache.layers = layers
        out = self.model(input_ids=inputs, attention_mask=mask, position_ids=positions, cache=cache,
                         use_cache=True, logits_to_keep=1)
        return out.cache, mask, out.logits[:, -1].float()

    @torch.no_grad()
    def _turn(self, prompts: list[torch.Tensor], keys: list[str]) -> list[str]:
        """One assistant turn for every prompt: batched prefill of the new tokens, then one decoding loop."""
        new = self._share_prefixes(prompts) if len(prompts) > 1 else []
        rows = [(*self.pool.match(p, new), p) for p in prompts]
        cache, mask, logits = self._prefill(rows, self.max_new_tokens)
        generators = [torch.Generator(device=self.device).manual_seed(request_seed(self.seed, k)) for k in keys]
        warpers = [TemperatureLogitsWarper(self.temperature), TopPLogitsWarper(self.top_p)] if self.temperature > 0 \
            else []
        live = list(range(len(prompts)))  # the batch row -> prompt index of the sequences still decoding
        generated: list[list[int]] = [[] for _ in prompts]
        contexts: list[CachedContext | None] = [None] * len(prompts)
        tails = torch.stack([F.pad(p[-_STOP_CONTEXT:], (_STOP_CONTEXT - min(len(p), _STOP_CONTEXT), 0),
                                   value=self.tokenizer.pad_token_id) for p in prompts])
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        eos = torch.tensor(self.eos_token_ids, device=self.device)
        for step in range(self.max_new_tokens):
            tokens = self._pick(logits, warpers, [generators[i] for i in live])
            tails = torch.cat([tails, tokens[:, None]], 1)
            done = torch.isin(tokens, eos)
            if self._stop is not None:
                done |= self._stop(tails, logits)
            for i, token in zip(live, tokens.tolist()):
                generated[i].append(token)
            if step == self.max_new_tokens - 1:
                done[:] = True
            finished = done.nonzero()[:, 0].tolist()
            for row in finished:  # the cache holds the prompt and the generated tokens fed so far
                i = live[row]
                fed = torch.tensor(generated[i][:-1], dtype=torch.long, device=self.device)
                contexts[i] = _extract(cache, mask, row, torch.cat([prompts[i], fed]))
            if len(finished) == len(live):
                break
            if finished:  # finished sequences leave the batch
                keep = (~done).nonzero()[:, 0]
                cache.batch_select_indices(keep)
                mask, tails, tokens, lengths = mask[keep], tails[keep], tokens[keep], lengths[keep]
                live = [live[row] for row in keep.tolist()]
            mask = torch.cat([mask, torch.ones_like(tokens[:, None])], 1)
            out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=lengths[:, None],
                             cache=cache, use_cache=True)
            cache, logits, lengths = out.cache, out.logits[:, -1].float(), lengths + 1
        self.pool.update([base for base, _, _ in rows], [c for c in contexts if c is not None] + new)
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [truncate_at_stop(t, self.stop) for t in texts]

    def _pick(self, logits: torch.Tensor, warpers: list[Any], generators: list[torch.Generator]) -> torch.Tensor:
        """Greedy, or one draw per row from its own generator (independent of the other rows)."""
        if not warpers:
            return logits.argmax(-1)
        for warp in warpers:
            logits = warp(None, logits)
        probs = logits.softmax(-1)
        return torch.cat([torch.multinomial(probs[row], 1, generator=g) for row, g in enumerate(generators)])


def _extract(cache: DynamicCache, mask: torch.Tensor, row: int, ids: torch.Tensor) -> CachedContext:
    """Row ``row`` of a batch cache without its pads: the context of ``ids``."""
    columns = mask[row].nonzero()[:, 0]
    if len(columns) != len(ids):
        raise AssertionError(f"cache row holds {len(columns)} tokens, expected {len(ids)}")
    return CachedContext(ids, [layer.keys[row][:, columns] for layer in cache.layers],
                         [layer.values[row][:, columns] for layer in cache.layers])


def local_policy(model: str, engine: Engine = DEFAULT_ENGINE, **kwargs: Any) -> LocalPolicy:
    """A local model run by ``engine``; ``kwargs`` as :class:`LocalPolicy` takes them (``batch_size``: recompute only:
    the prefix-cache engine runs every episode of a call in one batch)."""
    if engine not in ("prefix-cache", "recompute"):
        raise UsageError(f"engine: expected prefix-cache or recompute, got {engine!r}")
    return (PrefixCachePolicy if engine == "prefix-cache" else LocalPolicy)(model, **kwargs)
