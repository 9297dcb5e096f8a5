"""HPL's dual-layer curriculum and the deterministic, resumable batch plan built on it (pure; no model needed).

Group pairs fall into a 3x3 grid of buckets B[l, d]: ``l`` is the group-length level (sub-task complexity) and
``d`` the difficulty level (reward gap; a large gap is an easy sample). Phase 1 trains on B11, phase 2 adds B12 and
B21, phase 3 adds the rest; trajectory, step and behaviour-cloning items are in every phase.

The paper's HPL stage is one pass over the data (1 epoch): :func:`one_pass_members` splits the trajectory, step and
behaviour-cloning items across the phases and brings each group pair in at the phase it enters, so every item is
seen once. Replaying each phase's whole pool (:func:`phase_members`) is the multi-epoch alternative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection, Literal, Sequence

import torch

from hpl_lightning.errors import UsageError

Mode = Literal["dual", "static", "length", "difficulty"]
# Group-length thresholds (upper bounds of levels 1 and 2) per benchmark, from the paper; sciworld's gold paths are
# longer than ALFWorld's, so it gets ALFWorld's.
LENGTH_THRESHOLDS: dict[str, tuple[int, int]] = {
    "alfworld": (3, 6),
    "webshop": (2, 4),
    "intercode_sql": (2, 4),
    "sciworld": (3, 6),
}
FROM_BENCHMARK = "benchmark"


def benchmark_of(task_id: str, meta: dict | None = None) -> str:
    """A record's benchmark: ``meta.benchmark`` when given, else the first part of its task id (``sciworld/boil/3``,
    ``intercode_sql``, ``alfworld/...``)."""
    return str((meta or {}).get("benchmark") or task_id.split("/", 1)[0])


@dataclass(frozen=True)
class Curriculum:
    """How group pairs are staged; ``mode`` covers the paper's ablations (``static`` = one phase with all data)."""

    mode: Mode = "dual"
    # upper bounds of length levels 1 and 2; "benchmark": the paper's for the data's benchmark (LENGTH_THRESHOLDS)
    length_thresholds: tuple[int, int] | Literal["benchmark"] = FROM_BENCHMARK
    difficulty_thresholds: tuple[float, float] = (0.7, 0.4)

    @property
    def n_phases(self) -> int:
        return 1 if self.mode == "static" else 3

    @property
    def uses_length(self) -> bool:
        return self.mode in ("dual", "length")

    def for_benchmarks(self, benchmarks: Collection[str]) -> tuple["Curriculum", str]:
        """This curriculum with its length thresholds resolved, and a line saying where they came from.

        ``benchmarks``: the benchmarks of the group pairs. Explicit thresholds are kept; ``"benchmark"`` takes the
        paper's thresholds of the one benchmark of the data and is an error for mixed or unknown benchmarks.
        """
        if self.length_thresholds != FROM_BENCHMARK:
            return self, f"length thresholds {list(self.length_thresholds)} (set explicitly)"
        names = sorted(set(benchmarks))
        known = len(names) == 1 and names[0] in LENGTH_THRESHOLDS
        if not known and (not self.uses_length or not names):
            why = "no group pairs" if not names else f"curriculum mode {self.mode} ignores group length"
            return self, f"length thresholds unused ({why})"
        if not known:
            what = f"mixed benchmarks {names}" if len(names) > 1 else f"unknown benchmark {names[0]!r}"
            raise UsageError(
                f"data.curriculum.length_thresholds: the group pairs are from {what}; the paper's thresholds are "
                f"known for {sorted(LENGTH_THRESHOLDS)} only: set data.curriculum.length_thresholds=[LOW, HIGH]"
            )
        thresholds = LENGTH_THRESHOLDS[names[0]]
        resolved = Curriculum(self.mode, thresholds, self.difficulty_thresholds)
        return resolved, f"length thresholds {list(thresholds)} (the paper's for {names[0]}, from the data)"

    def length_level(self, group_length: int) -> int:
        if self.length_thresholds == FROM_BENCHMARK:
            raise ValueError("length thresholds not resolved: call Curriculum.for_benchmarks with the data's")
        low, high = self.length_thresholds
        return 1 if group_length <= low else 2 if group_length <= high else 3

    def difficulty_level(self, reward_gap: float) -> int:
        easy, medium = self.difficulty_thresholds
        return 1 if reward_gap >= easy else 2 if reward_gap >= medium else 3

    def first_phase(self, level: str, group_length: int | None, difficulty: float | None) -> int:
        """The phase (1-based) from which an item is trained on; every later phase keeps it."""
        if level != "group" or self.mode == "static":
            return 1
        if self.mode == "difficulty":
            return self.difficulty_level(difficulty)
        l, d = self.length_level(group_length), self.difficulty_level(difficulty)
        if self.mode == "length":
            return l
        return 1 if (l, d) == (1, 1) else 2 if (l, d) in ((1, 2), (2, 1)) else 3

    def bucket(self, group_length: int, difficulty: float) -> str:
        """``B<length level><difficulty level>`` (``B?<d>`` when the length thresholds are unused and unresolved)."""
        l = "?" if self.length_thresholds == FROM_BENCHMARK else self.length_level(group_length)
        return f"B{l}{self.difficulty_level(difficulty)}"


def phase_members(first_phases: Sequence[int], phase: int) -> list[int]:
    """Indices of the items in ``phase``: each phase is a superset of the previous one."""
    return [i for i, first in enumerate(first_phases) if first <= phase]


def one_pass_members(
    first_phases: Sequence[int], levels: Sequence[str], phase: int, n_phases: int, seed: int
) -> list[int]:
    """The items of ``phase`` when the whole stage is one pass over the data (the paper: 1 epoch).

    Group pairs are used once, in the phase they enter (``first_phases``). The items that are in every phase
    (trajectory and step pairs, behaviour-cloning trajectories) are dealt once across the phases: per level, a
    seeded permutation cut into ``n_phases`` near-equal consecutive parts. Every item is in exactly one phase.
    """
    part: set[int] = set()
    for k, level in enumerate(sorted(set(levels) - {"group"})):
        items = [i for i, lv in enumerate(levels) if lv == level]
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (k + 1))
        shuffled = [items[j] for j in torch.randperm(len(items), generator=g).tolist()]
        bounds = [round(b * len(items) / n_phases) for b in range(n_phases + 1)]
        part.update(shuffled[bounds[phase - 1] : bounds[phase]])
    return [i for i, lv in enumerate(levels) if i in part or (lv == "group" and first_phases[i] == phase)]


@dataclass(frozen=True)
class Slot:
    """One position of a batch: which item, and whether it is a filler that only evens out ranks (weight 0)."""

    index: int
    filler: bool = False


def epoch_batches(
    members: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    n_batches: int | None = None,
    shuffle: bool = True,
) -> list[list[Slot]]:
    """This rank's batches for one epoch over ``members``, identical on every run with the same arguments.

    The epoch's order is a seeded permutation of the members (repeated, reshuffled, when ``n_batches`` asks for more
    than one pass). It is padded with weight-0 fillers to a multiple of ``world_size``; each global batch of
    ``batch_size * world_size`` slots is dealt round-robin, so ranks get disjoint shares of equal batch count and every
    member is used exactly once per pass.
    """
    if not members:
        raise ValueError("a curriculum phase with no training items")
    order: list[int] = []
    passes = 1 if n_batches is None else math.ceil(n_batches * batch_size * world_size / len(members))
    for p in range(passes):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + p)
        perm = torch.randperm(len(members), generator=g).tolist() if shuffle else range(len(members))
        order.extend(members[i] for i in perm)
    if n_batches is not None:
        order = order[: n_batches * batch_size * world_size]
    slots = [Slot(i) for i in order]
    slots += [Slot(order[j % len(order)], filler=True) for j in range(-len(order) % world_size)]
    global_size = batch_size * world_size
    return [
        slots[start : start + global_size][rank::world_size] for start in range(0, len(slots), global_size)
    ]
