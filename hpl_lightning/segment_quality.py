"""How well a segmenter's action groups match a reference segmentation (ScienceWorld's sub-goals): the metrics, pure
functions of covers, and the report ``hpl-pipeline segment-quality`` writes.

A *boundary* is a cut between two consecutive actions, named by the action that starts the next group (1..n-1); a
cover of n actions in g groups has g - 1 of them. Per segmenter, over every trajectory pooled (micro-averaged):

- boundary precision, recall and F1, exact and within a tolerance of one action (one-to-one matching: a reference
  boundary is matched by at most one predicted boundary, so cutting twice around it is not rewarded twice);
- mean group length, next to the reference's (a segmenter can score by cutting often; this shows it);
- the share of groups that *straddle* a reference boundary: a group holding the end of one sub-goal and the start of
  the next, the group-level exploration then samples alternatives to two half sub-tasks at once.

The trivial baseline cuts at random with the reference's number of groups, so its numbers say what chance gives.
"""

from __future__ import annotations

import json
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from hpl_lightning.segmentation import Group, groups_from_starts

RANDOM = "random"  # name of the trivial baseline in the tables
ALL = "all"  # the row of every task type pooled


def boundaries(cover: Sequence[Group]) -> list[int]:
    """The cover's cuts: the first action of every group but the first."""
    return [start for start, _ in cover[1:]]


def matched(predicted: Sequence[int], reference: Sequence[int], tolerance: int = 0) -> int:
    """The most one-to-one pairs (predicted, reference) of sorted boundaries at most ``tolerance`` actions apart.

    Greedy from the left is optimal on a line: pairing the leftmost boundaries that can pair never blocks a pair."""
    i = j = n = 0
    while i < len(predicted) and j < len(reference):
        if abs(predicted[i] - reference[j]) <= tolerance:
            i, j, n = i + 1, j + 1, n + 1
        elif predicted[i] < reference[j]:
            i += 1
        else:
            j += 1
    return n


@dataclass(frozen=True)
class Counts:
    """Tallies of predicted covers against reference covers; ``+`` pools them (micro-averaging)."""

    trajectories: int = 0
    actions: int = 0
    groups: int = 0
    reference_groups: int = 0
    boundaries: int = 0  # predicted
    reference_boundaries: int = 0
    exact: int = 0  # predicted boundaries on a reference boundary
    near: int = 0  # one-to-one matches within the tolerance
    straddling: int = 0  # predicted groups with a reference boundary inside

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(astuple(self), astuple(other))))


def compare(predicted: Sequence[Group], reference: Sequence[Group], tolerance: int = 1) -> Counts:
    """One trajectory's tallies; both covers are of the same actions."""
    pred, ref = boundaries(predicted), boundaries(reference)
    inside = sum(any(s < b <= e for b in ref) for s, e in predicted)
    return Counts(1, predicted[-1][1] + 1 if predicted else 0, len(predicted), len(reference), len(pred), len(ref),
                  matched(pred, ref), matched(pred, ref, tolerance), inside)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _f1(p: float | None, r: float | None) -> float | None:
    if p is None or r is None:
        return None
    return 2 * p * r / (p + r) if p + r else 0.0


def scores(c: Counts) -> dict[str, float | None]:
    """Precision, recall, F1 (exact and ``near``: within the tolerance), group lengths and the straddling share;
    None where undefined (no predicted or no reference boundary)."""
    p, r = _ratio(c.exact, c.boundaries), _ratio(c.exact, c.reference_boundaries)
    pn, rn = _ratio(c.near, c.boundaries), _ratio(c.near, c.reference_boundaries)
    return {"precision": p, "recall": r, "f1": _f1(p, r), "precision_near": pn, "recall_near": rn,
            "f1_near": _f1(pn, rn), "mean_group_length": _ratio(c.actions, c.groups),
            "reference_mean_group_length": _ratio(c.actions, c.reference_groups),
            "straddling": _ratio(c.straddling, c.groups), "trajectories": c.trajectories}


def random_cover(n_actions: int, n_groups: int, rng: np.random.Generator) -> list[Group]:
    """``n_groups`` groups cut at distinct positions drawn uniformly from 1..n-1."""
    cuts = rng.choice(np.arange(1, n_actions), size=n_groups - 1, replace=False) if n_groups > 1 else []
    return groups_from_starts(sorted(int(c) for c in cuts), n_actions)


def trajectory_rng(seed: int, trajectory_id: str) -> np.random.Generator:
    """A generator per (seed, trajectory), so a trajectory's random cuts do not depend on which others are scored."""
    return np.random.default_rng([seed, zlib.crc32(trajectory_id.encode())])


def stratified(variations: Sequence[tuple[str, int]], per_task: int) -> list[tuple[str, int]]:
    """The first ``per_task`` variations of each task type, in split order."""
    taken: dict[str, int] = defaultdict(int)
    out = []
    for name, variation in variations:
        if taken[name] < per_task:
            taken[name] += 1
            out.append((name, variation))
    return out


@dataclass(frozen=True)
class Gold:
    """A gold trajectory as the study sees it: its actions, the simulator's scores and the reference they give."""

    id: str
    task_type: str
    commands: list[str]
    start_score: float
    scores: list[float]  # after each action
    reference: list[Group]


def count(golds: Sequence[Gold], covers: Mapping[str, Sequence[Sequence[Group]]], seed: int = 0,
          draws: int = 20) -> tuple[dict[str, dict[str, Counts]], dict[str, list[list[Group]]]]:
    """segmenter -> task type -> pooled Counts, for each segmenter's covers (one per gold trajectory, in order) and
    the random baseline (``draws`` covers per trajectory with the reference's group count, pooled); and the random
    covers drawn, by trajectory id."""
    counts: dict[str, dict[str, Counts]] = {name: defaultdict(Counts) for name in [*covers, RANDOM]}
    randoms = {}
    for i, g in enumerate(golds):
        rng = trajectory_rng(seed, g.id)
        randoms[g.id] = [random_cover(len(g.commands), len(g.reference), rng) for _ in range(draws)]
        for name, cover in [(name, c[i]) for name, c in covers.items()] + [(RANDOM, c) for c in randoms[g.id]]:
            counts[name][g.task_type] += compare(cover, g.reference)
    return {name: dict(c) for name, c in counts.items()}, randoms


def table(counts: Mapping[str, Mapping[str, Counts]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """segmenter -> task type -> Counts  =>  segmenter -> task type (and ``all``, pooled) -> scores."""
    out = {}
    for name, per_type in counts.items():
        out[name] = {t: scores(c) for t, c in sorted(per_type.items())}
        out[name][ALL] = scores(sum(per_type.values(), Counts()))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}"


def format_table(result: Mapping[str, Mapping[str, Mapping[str, float | None]]]) -> str:
    """The overall markdown table: one row per segmenter."""
    lines = ["| segmenter | F1 exact | P exact | R exact | F1 ±1 | P ±1 | R ±1 | mean group length (reference) | "
             "groups straddling a sub-goal boundary |", "|---|---|---|---|---|---|---|---|---|"]
    for name, per_type in result.items():
        s = per_type[ALL]
        lines.append(f"| {name} | {_pct(s['f1'])} | {_pct(s['precision'])} | {_pct(s['recall'])} | "
                     f"{_pct(s['f1_near'])} | {_pct(s['precision_near'])} | {_pct(s['recall_near'])} | "
                     f"{s['mean_group_length']:.1f} ({s['reference_mean_group_length']:.1f}) | "
                     f"{_pct(s['straddling'])} % |")
    return "\n".join(lines)


def format_per_type(result: Mapping[str, Mapping[str, Mapping[str, float | None]]]) -> str:
    """F1 exact / ±1 per task type (rows) and segmenter (columns), with the reference's group length."""
    names = list(result)
    types = [t for t in next(iter(result.values())) if t != ALL] + [ALL]
    lines = ["| task type | n | reference group length | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for t in types:
        first = result[names[0]][t]
        cells = [f"{_pct(result[n][t]['f1'])} / {_pct(result[n][t]['f1_near'])}" for n in names]
        lines.append(f"| {t} | {first['trajectories']} | {first['reference_mean_group_length']:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: Path, result: Mapping[str, Mapping[str, Mapping[str, float | None]]], title: str) -> None:
    """Two heatmaps, boundary F1 exact and within one action, task types (rows) x segmenters (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result)
    types = [t for t in next(iter(result.values())) if t != ALL] + [ALL]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(names), 1.5 + 0.32 * len(types)), sharey=True)
    for ax, key, label in zip(axes, ("f1", "f1_near"), ("boundary F1, exact", "boundary F1, within one action")):
        values = np.array([[np.nan if result[n][t][key] is None else 100 * result[n][t][key] for n in names]
                           for t in types])
        ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, "-" if np.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 60 else "black")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(types)), types, fontsize=7)
        ax.axhline(len(types) - 1.5, color="white", linewidth=2)
        ax.set_title(label, fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class Example:
    """A predicted group that straddles sub-goal boundaries, with what the actions were and the score they got."""

    segmenter: str
    trajectory: str
    group: Group
    cuts: list[int]  # reference boundaries inside the group
    lines: list[str]  # one per action: index, command, score after it


def worst_group(segmenter: str, gold: Gold, cover: Sequence[Group]) -> Example | None:
    """The cover's group holding the most reference boundaries (the shortest on ties), None if none does."""
    ref = boundaries(gold.reference)
    s, e = max(cover, key=lambda g: (sum(g[0] < b <= g[1] for b in ref), g[0] - g[1]))
    cuts = [b for b in ref if s < b <= e]
    if not cuts:
        return None
    lines = []
    for t in range(s, e + 1):
        before = gold.start_score if t == 0 else gold.scores[t - 1]
        mark = f"  <- score {before:g} -> {gold.scores[t]:g}" if gold.scores[t] > before else ""
        lines.append(f"{t:>3}  {gold.commands[t]}{mark}")
    return Example(segmenter, gold.id, (s, e), cuts, lines)


def worst_example(segmenter: str, golds: Sequence[Gold], covers: Sequence[Sequence[Group]]) -> Example | None:
    """Over all trajectories, the :func:`worst_group` with the most boundaries (the shortest group on ties)."""
    found = [ex for g, c in zip(golds, covers) if (ex := worst_group(segmenter, g, c)) is not None]
    return max(found, key=lambda ex: (len(ex.cuts), ex.group[0] - ex.group[1]), default=None)


def format_examples(examples: Sequence[Example], max_lines: int = 12) -> str:
    out = []
    for ex in examples:
        shown = ex.lines if len(ex.lines) <= max_lines else [*ex.lines[: max_lines - 1],
                                                             f"     ... {len(ex.lines) - max_lines + 1} more"]
        out += [f"**{ex.segmenter}** on `{ex.trajectory}`: group {list(ex.group)} holds {len(ex.cuts)} sub-goal "
                f"boundar{'y' if len(ex.cuts) == 1 else 'ies'}", "", "```", *shown, "```", ""]
    return "\n".join(out)


def write_report(root: Path, title: str, result: Mapping[str, Any], notes: Sequence[str],
                 examples: Sequence[Example], provenance: Mapping[str, Any], per_trajectory: Sequence[dict]) -> str:
    """results.md, results.png, results.json and covers.jsonl (every trajectory's reference and covers) in
    ``root``; returns the markdown."""
    root.mkdir(parents=True, exist_ok=True)
    plot(root / "results.png", result, title)
    md = [f"# {title}", "", *notes, "", "## Overall (every trajectory pooled; %)", "", format_table(result), "",
          "## Boundary F1 per task type (exact / within one action, %)", "", "![F1 per task type](results.png)", "",
          format_per_type(result), "", "## Examples of groups that straddle sub-goals", "",
          "Per segmenter, the group holding the most sub-goal boundaries (the shortest on ties); `<-` marks an "
          "action that raised the score (met a sub-goal: the reference cuts after it).", "",
          format_examples(examples),
          "## How this was produced", "", *(f"- {k}: {v}" for k, v in provenance.items())]
    text = "\n".join(md).rstrip() + "\n"
    (root / "results.md").write_text(text)
    (root / "results.json").write_text(json.dumps(
        {"title": title, "provenance": dict(provenance), "table": result,
         "examples": [{f.name: getattr(ex, f.name) for f in fields(ex)} for ex in examples]}, indent=1) + "\n")
    with (root / "covers.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in per_trajectory)
    return text
