"""Rollouts that prefill each unique context token once, with every episode in flight in one decoding loop (issue 21).

LocalPolicy's default path re-encodes every conversation at every turn (a 10-turn ScienceWorld episode prefills
~8x its unique tokens) and its ``reuse_cache`` path runs one episode at a time. Here each episode keeps the KV cache
of its previous turn, the prefix every conversation of a call shares (system turn, instruction) is encoded once and
kept, and a turn prefills only each episode's new tokens, batched: per-episode caches of different lengths are
left-padded into one batch cache, with per-row positions, so the keys/values and hence the greedy text are the ones
the recompute path computes (up to float rounding). Sampling draws from one generator per request, seeded by the
request's key (rollout and turn), so a sample does not depend on the other episodes in its batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
from transformers.generation.stopping_criteria import StopStringCriteria

from hpl_lightning.policies import Conversation, LocalPolicy, request_keys, request_seed, truncate_at_stop

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


class PrefixCachePolicy(LocalPolicy):
    """:class:`LocalPolicy` with the same prompts (window and truncation) and stops, computed incrementally.

    ``prefixes``: how many shared prefixes to keep besides the last call's episodes. ``prefilled`` counts the context
    tokens fed to the model (decoding steps aside), for ``prefill_per_unique`` in ``benchmarks/rollout_speed.py``.
    """

    def __init__(self, *args: Any, prefixes: int = 4, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.prefixes = prefixes
        self.prefilled = 0
        self._episodes: list[CachedContext] = []  # the last call's conversations, one each
        self._shared: list[CachedContext] = []  # prefixes shared by the conversations of a call, newest last
        self._sent: Counter = Counter()
        self._stop = StopStringCriteria(self.tokenizer, list(self.stop)) if self.stop else None

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"engine": "prefix-cache"}

    def clear(self) -> None:
        """Forgets every cached context (a benchmark's fresh start; the next call encodes its prefix again)."""
        self._episodes, self._shared = [], []

    def generate(self, conversations: list[Conversation], keys: Sequence[str] | None = None) -> list[str]:
        if not conversations:
            return []
        prompts = [torch.tensor(self.prompt_ids(c), device=self.device) for c in conversations]
        keys = list(keys) if keys is not None else request_keys(conversations, self._sent)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads or threads)
        try:
            texts, self._episodes = self._turn(prompts, keys)
        finally:
            torch.set_num_threads(threads)
        return texts

    def _match(self, ids: torch.Tensor) -> tuple[CachedContext | None, int]:
        """The cached context sharing the longest prefix with ``ids``, and how many tokens it can give (at least
        one token of ``ids`` is left to feed, whose logits start the turn)."""
        best, reused = None, 0
        for cached in self._episodes + self._shared:
            n = min(common_prefix(cached.ids, ids), len(ids) - 1)
            if n > reused:
                best, reused = cached, n
        return best, reused

    def _share_prefix(self, prompts: list[torch.Tensor], matches: list[tuple[CachedContext | None, int]]) -> None:
        """Encodes once the prefix all ``prompts`` share, where that saves encoding it in several rows."""
        n = min(len(p) for p in prompts) - 1
        for p in prompts[1:]:
            n = min(n, common_prefix(prompts[0], p))
        if sum(n > reused for _, reused in matches) < 2:
            return
        ids = prompts[0][:n]
        base, reused = self._match(ids)
        reused = min(reused, n - 1) if base is not None else 0
        cache, mask, _ = self._prefill([(base, reused, ids)])
        shared = _extract(cache, mask, 0, ids)
        self._shared = (self._shared + [shared])[-self.prefixes:]
        for i, (_, got) in enumerate(matches):
            if n > got:
                matches[i] = (shared, n)

    @torch.no_grad()
    def _prefill(self, rows: list[tuple[CachedContext | None, int, torch.Tensor]]
                 ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Feeds each row's ``ids[reused:]`` after ``reused`` cached tokens, all rows in one forward.

        Layout per row: ``[pad][cached][pad][new]``; the mask hides the pads and positions count real tokens only,
        so every row computes what it would alone. Returns the batch cache, its mask and the last logits."""
        past = max(r for _, r, _ in rows)
        width = max(len(ids) - r for _, r, ids in rows)
        layers = self.model.config.num_hidden_layers
        keys: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        values: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        masks, inputs, positions = [], [], []
        for cached, reused, ids in rows:
            new = len(ids) - reused
            for layer in range(layers):
                k, v = (cached.keys[layer][:, :reused], cached.values[layer][:, :reused]) if cached else (None, None)
                if k is None:
                    k = v = self._empty_kv(layer)
                keys[layer].append(F.pad(k, (0, 0, past - reused, 0)))
                values[layer].append(F.pad(v, (0, 0, past - reused, 0)))
            masks.append([0] * (past - reused) + [1] * reused + [0] * (width - new) + [1] * new)
            inputs.append(F.pad(ids[reused:], (width - new, 0), value=self.tokenizer.pad_token_id))
            positions.append(F.pad(torch.arange(reused, len(ids)), (width - new, 0), value=reused))
            self.prefilled += new
        cache = DynamicCache(ddp_cache_data=[(torch.stack(keys[i]), torch.stack(values[i])) for i in range(layers)],
                             config=self.model.config)
        mask = torch.tensor(masks, device=self.device)
        out = self.model(input_ids=torch.stack(inputs), attention_mask=mask,
                         position_ids=torch.stack(positions).to(self.device), cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out.cache, mask, out.logits[:, -1].float()

    def _empty_kv(self, layer: int) -> torch.Tensor:
        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return torch.zeros(heads, 0, dim, dtype=self.model.dtype, device=self.device)

    @torch.no_grad()
    def _turn(self, prompts: list[torch.Tensor], keys: list[str]) -> tuple[list[str], list[CachedContext]]:
        """One assistant turn for every prompt: batched prefill of the new tokens, then one decoding loop."""
        matches = [self._match(p) for p in prompts]
        if len(prompts) > 1:
            self._share_prefix(prompts, matches)
        cache, mask, logits = self._prefill([(c, r, p) for (c, r), p in zip(matches, prompts)])
        generators = [torch.Generator(device=self.device).manual_seed(request_seed(self.seed, k)) for k in keys]
        warpers = [TemperatureLogitsWarper(self.temperature), TopPLogitsWarper(self.top_p)] if self.temperature > 0 \
            else []
        rows = list(range(len(prompts)))  # the batch row -> prompt index of the sequences still decoding
        generated: list[list[int]] = [[] for _ in prompts]
        contexts: list[CachedContext | None] = [None] * len(prompts)
        tails = torch.stack([F.pad(p[-_STOP_CONTEXT:], (_STOP_CONTEXT - min(len(p), _STOP_CONTEXT), 0),
                                   value=self.tokenizer.pad_token_id) for p in prompts])
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        for step in range(self.max_new_tokens):
            tokens = self._pick(logits, warpers, [generators[i] for i in rows])
            tails = torch.cat([tails, tokens[:, None]], 1)
            done = torch.isin(tokens, torch.tensor(self.eos_token_ids, device=self.device))
            if self._stop is not None:
                done |= self._stop(tails, logits)
            for row, i in enumerate(rows):
                generated[i].append(int(tokens[row]))
            if step == self.max_new_tokens - 1:
                done[:] = True
            finished = [row for row in range(len(rows)) if done[row]]
            for row in finished:  # the cache holds the prompt and the generated tokens fed so far
                i = rows[row]
                contexts[i] = _extract(cache, mask, row, torch.cat([prompts[i], torch.tensor(generated[i][:-1])]))
            keep = [row for row in range(len(rows)) if not done[row]]
            if not keep:
                break
            if finished:  # finished sequences leave the batch
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask, tails, tokens, lengths = mask[index], tails[index], tokens[index], lengths[index]
                rows = [rows[row] for row in keep]
            mask = torch.cat([mask, torch.ones_like(tokens[:, None])], 1)
            out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=lengths[:, None],
                             cache=cache, use_cache=True)
            cache, logits, lengths = out.cache, out.logits[:, -1].float(), lengths + 1
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [truncate_at_stop(t, self.stop) for t in texts], [c for c in contexts if c is not None]

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
