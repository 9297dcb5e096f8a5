"""An experiment's results from its evaluation episodes: ``results.json`` (every per-episode record, the table, the
comparisons), ``results.md`` (the paper-style table, paired comparisons, per-task-type breakdown) and
``results.png`` (bars with confidence intervals).

Statistics (see :mod:`hpl_lightning.stats`): an arm's number on a split is the mean over its distinct evaluations
(one per seed; arms without a preference stage and greedy evaluation have one) of the evaluation's average over
tasks, ± the Student-t half-width over seeds (on these tasks); comparisons pair the two arms' rewards on the same
(seed, task) cells and generalise over seeds and tasks (crossed random effects, Satterthwaite t: docs/statistics.md).
Episodes whose environment crashed are never in a finished evaluation.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from hpl_lightning.power import achieved_mde, paired_matrix
from hpl_lightning.stats import METHOD, Interval, holm, mean_ci, paired_difference

METRICS = ("reward", "success")
STALE_MARK = "†"


def collect(evals: Mapping[tuple[str, int, str], tuple[str, Path]]) -> list[dict[str, Any]]:
    """One record per (arm, seed, split, task) from ``(arm, seed, split) -> (evaluation key, episodes.jsonl)``."""
    records = []
    for (arm, seed, split), (key, path) in evals.items():
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            e = json.loads(line)
            if e.get("error") is None:
                valid = e.get("valid")  # per-turn valid-action flags, where the evaluation records them
                records.append({"arm": arm, "seed": seed, "split": split, "evaluation": key, "task": e["id"],
                                "group": e["group"], "reward": float(e["reward"]), "success": float(e["success"]),
                                "turns": e["turns"], "valid_actions": sum(valid) / len(valid) if valid else None})
    return records


def per_evaluation(records: Sequence[dict[str, Any]], metric: str, group: str | None = None) -> dict[
        tuple[str, str], list[float]]:
    """(arm, split) -> the metric's task average of each distinct evaluation (optionally one task group only)."""
    sums: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    seen: set[tuple[str, str, str, str]] = set()
    for r in records:
        if group is not None and r["group"] != group:
            continue
        cell = (r["arm"], r["split"], r["evaluation"], r["task"])
        if cell in seen:  # a shared evaluation is listed under every seed; count it once
            continue
        seen.add(cell)
        sums[(r["arm"], r["split"], r["evaluation"])].append(r[metric])
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (arm, split, _), values in sorted(sums.items()):
        out[(arm, split)].append(sum(values) / len(values))
    return dict(out)


def table(records: Sequence[dict[str, Any]], confidence: float, group: str | None = None) -> dict[str, Any]:
    """{arm: {split: {metric: Interval, "tasks": n}}}."""
    out: dict[str, Any] = defaultdict(dict)
    tasks: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in records:
        if group is None or r["group"] == group:
            tasks[(r["arm"], r["split"])].add(r["task"])
    for metric in METRICS:
        for (arm, split), values in per_evaluation(records, metric, group).items():
            out[arm].setdefault(split, {"tasks": len(tasks[(arm, split)])})[metric] = mean_ci(values, confidence)
    recorded = [r for r in records if r["valid_actions"] is not None]  # episodes with at least one turn
    for (arm, split), values in per_evaluation(recorded, "valid_actions", group).items():
        out[arm][split]["valid_actions"] = mean_ci(values, confidence)
    return dict(out)


def comparisons(records: Sequence[dict[str, Any]], arms: Sequence[str], confidence: float,
                baselines: Sequence[str] = ("sft", "eto")) -> list[dict[str, Any]]:
    """Each arm against each baseline present, per split and metric, paired on (seed, task)."""
    cells: dict[tuple[str, str, str], dict[tuple[int, str], float]] = defaultdict(dict)
    for r in records:
        for metric in METRICS:
            cells[(r["arm"], r["split"], metric)][(r["seed"], r["task"])] = r[metric]
    splits = sorted({r["split"] for r in records})
    out = []
    for baseline in baselines:
        if baseline not in arms:
            continue
        for arm in arms:
            if arm == baseline:
                continue
            for split in splits:
                row: dict[str, Any] = {"arm": arm, "baseline": baseline, "split": split}
                for metric in METRICS:
                    c = paired_difference(cells[(arm, split, metric)], cells[(baseline, split, metric)],
                                          confidence)
                    row[metric] = {"diff": c.diff, "low": _finite(c.low), "high": _finite(c.high),
                                   "p_value": _finite(c.p_value), "se": _finite(c.se), "df": _finite(c.df),
                                   "tasks": c.n_tasks, "seeds": c.n_seeds}
                out.append(row)
    return out


_CLAIM = re.compile(r"\s*([\w.-]+)\s*([<>])\s*([\w.-]+)\s*")


@dataclass(frozen=True)
class Hypothesis:
    """A pre-registered claim the report decides. ``claims``: ``"A > B"`` or ``"A < B"``, arm A's mean ``metric`` on
    ``split`` above (below) arm B's, paired on (seed, task); every claim must hold. ``family``: tested with the other
    family members under Holm's correction; otherwise alone at the report's level (e.g. a positive control)."""

    name: str
    claims: list[str] = field(default_factory=list)
    split: str = "test"
    metric: str = "reward"
    family: bool = True

    def parsed(self) -> list[tuple[str, str, int]]:
        """(arm, other arm, +1 for ">" or -1 for "<") per claim; a malformed claim is a ValueError."""
        out = []
        for claim in self.claims:
            m = _CLAIM.fullmatch(claim)
            if m is None:
                raise ValueError(f"hypothesis {self.name!r}: claim {claim!r} is not 'ARM > ARM' or 'ARM < ARM'")
            out.append((m[1], m[3], 1 if m[2] == ">" else -1))
        if not out:
            raise ValueError(f"hypothesis {self.name!r}: no claims")
        return out


def decide(records: Sequence[dict[str, Any]], hypotheses: Sequence[Hypothesis], confidence: float
           ) -> list[dict[str, Any]]:
    """Each hypothesis's verdict. A claim's p is the two-sided p of its paired comparison when the difference has the
    predicted sign, else 1; a hypothesis's p is its claims' largest (all must hold). Family members are
    Holm-adjusted together; a hypothesis is supported when its (adjusted) p is below 1 − ``confidence``, i.e. when
    every claim's interval at the level Holm tested it at (α / (m − rank) in the family, α alone) excludes 0 on the
    predicted side. A hypothesis whose arms were not all evaluated yet is reported as such, outside the family.
    Each claim also gets the achieved minimum detectable effect (``mde``): the effect this design (its seeds x tasks)
    would detect with 80% power at that level, under the variance components its own differences show."""
    alpha = 1 - confidence
    cells: dict[tuple[str, str, str], dict[tuple[int, str], float]] = defaultdict(dict)
    for r in records:
        for metric in METRICS:
            cells[(r["arm"], r["split"], metric)][(r["seed"], r["task"])] = r[metric]

    def compare(h: Hypothesis, arm: str, other: str, level: float):
        return paired_difference(cells[(arm, h.split, h.metric)], cells[(other, h.split, h.metric)], 1 - level)

    p: dict[int, float] = {}
    for i, h in enumerate(hypotheses):
        try:
            tests = [(sign, compare(h, a, b, alpha)) for a, b, sign in h.parsed()]
        except ValueError:  # an arm without evaluations on the split (yet)
            continue
        p[i] = max(c.p_value if sign * c.diff > 0 and not math.isnan(c.p_value) else 1.0 for sign, c in tests)
    family = [i for i in p if hypotheses[i].family]
    adjusted = dict(zip(family, holm([p[i] for i in family]))) if family else {}
    rank = {i: r for r, i in enumerate(sorted(family, key=lambda i: p[i]))}
    out = []
    for i, h in enumerate(hypotheses):
        row: dict[str, Any] = {"name": h.name, "claims": list(h.claims), "split": h.split, "metric": h.metric,
                               "family": h.family}
        if i not in p:
            out.append({**row, "verdict": "not evaluated"})
            continue
        level = alpha / (len(family) - rank[i]) if h.family else alpha
        p_adj = adjusted.get(i, p[i])
        comparisons = []
        for a, b, sign in h.parsed():
            c = compare(h, a, b, level)
            mde = achieved_mde(paired_matrix(cells[(a, h.split, h.metric)], cells[(b, h.split, h.metric)]), level)
            comparisons.append({"claim": f"{a} {'>' if sign > 0 else '<'} {b}", "diff": c.diff,
                                "low": _finite(c.low), "high": _finite(c.high), "p_value": _finite(c.p_value),
                                "tasks": c.n_tasks, "seeds": c.n_seeds, "mde": mde})
        out.append({**row, "p_value": p[i], "p_adjusted": p_adj, "level": level, "comparisons": comparisons,
                    "verdict": "supported" if p_adj < alpha else "not supported"})
    return out


def _finite(x: float) -> float | None:
    """None for NaN (an interval one (seed, task) cell cannot have), which JSON cannot hold."""
    return None if math.isnan(x) else x


def _points(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f}"


def _mde(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _compared(m: dict[str, Any]) -> str:
    """One metric's comparison as the table's "Δ [low, high] | p | df"."""
    p = "—" if m["p_value"] is None else f"{m['p_value']:.3f}"
    df = "—" if m["df"] is None else f"{m['df']:.1f}"
    return f"{_points(m['diff'])} [{_points(m['low'])}, {_points(m['high'])}] | {p} | {df}"


def _pct(ci: Interval) -> str:
    hw = "—" if math.isnan(ci.half_width) else f"{100 * ci.half_width:.1f}"
    return f"{100 * ci.mean:.1f} ± {hw}"


def format_markdown(title: str, arms: Sequence[str], splits: Sequence[str], main: dict[str, Any],
                    compared: list[dict[str, Any]], groups: dict[str, dict[str, Any]], confidence: float,
                    stale_arms: Sequence[str] = (), decided: Sequence[dict[str, Any]] = ()) -> str:
    level = f"{round(100 * confidence)}%"
    lines = [f"# {title}", "",
             f"Mean ± {level} CI (Student t) over seeds, on these tasks; rewards and success rates in percent; "
             "valid = share of the agent's turns with a parsable action the environment accepted (a reward without "
             "valid actions is the simulator's starting score, not skill); n = evaluations (seeds; one where the "
             "model and greedy evaluation are shared) x tasks.", "",
             "| arm | " + " | ".join(f"{s} reward | {s} success | {s} valid | {s} n" for s in splits) + " |",
             "|---|" + "---|---|---|---|" * len(splits)]
    for arm in arms:
        cells = []
        for split in splits:
            s = main.get(arm, {}).get(split)
            valid = _pct(s["valid_actions"]) if s and "valid_actions" in s else "-"
            cells += ([_pct(s["reward"]), _pct(s["success"]), valid, f"{s['reward'].n}x{s['tasks']}"] if s
                      else ["-"] * 4)
        lines.append(f"| {arm}{STALE_MARK if arm in stale_arms else ''} | " + " | ".join(cells) + " |")
    if stale_arms:
        lines += ["", f"{STALE_MARK} built on stages made by other code than this report's (--reuse_stale): see "
                      "'How this was produced'."]
    if decided:
        lines += ["", "## Pre-registered hypotheses", "",
                  "Each claim's Δ in points with its interval at the level its hypothesis was tested at (Holm's "
                  f"α / (m − rank) over the family's m hypotheses, α = {1 - confidence:.2g}; alone at α outside the "
                  "family); a hypothesis's p is its claims' largest (1 where a difference has the wrong sign); "
                  "supported when its Holm-adjusted p is below α. MDE: the achieved minimum detectable effect, the "
                  "difference this design would detect with 80% power at that level under the variance components "
                  "(seed, task, residual) of the claim's own differences (docs/statistics.md).", "",
                  "| hypothesis | claim | split | Δ [interval] | level | MDE | p | adjusted p | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for h in decided:
            if h["verdict"] == "not evaluated":
                lines.append(f"| {h['name']} | {'; '.join(h['claims'])} | {h['split']} | — | — | — | — | — | "
                             "not evaluated |")
                continue
            for j, c in enumerate(h["comparisons"]):
                tail = (f"{h['p_value']:.3f} | {h['p_adjusted']:.3f} | **{h['verdict']}**" if j == 0
                        else "| |")
                lines.append(f"| {h['name'] if j == 0 else ''} | {c['claim']} | {h['split']} | "
                             f"{_points(c['diff'])} [{_points(c['low'])}, {_points(c['high'])}] | "
                             f"{1 - h['level']:.4g} | {_mde(c.get('mde'))} | {tail} |")
    if compared:
        lines += ["", "## Paired comparisons", "",
                  "Δ = arm − baseline in points, the mean over the (seed, task) cells both arms have. It estimates "
                  "the expected difference over training seeds and over tasks of the benchmark (both random samples): "
                  f"{level} t interval, standard error from {METHOD} (df: its degrees of freedom). p: two-sided, from "
                  f"the same t distribution, so p < {1 - confidence:.2g} exactly when the interval excludes 0; there "
                  "is no resampling, so no ties to split. Why, and the coverage measured: docs/statistics.md.", "",
                  f"| arm | vs | split | Δ reward [{level} CI] | p | df | Δ success [{level} CI] | p | df | "
                  "tasks x seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
        for c in compared:
            lines.append(f"| {c['arm']} | {c['baseline']} | {c['split']} | {_compared(c['reward'])} | "
                         f"{_compared(c['success'])} | {c['reward']['tasks']}x{c['reward']['seeds']} |")
    for split in splits:
        names = sorted(groups.get(split, {}))
        if not names:
            continue
        lines += ["", f"## {split}: average reward per task type (mean ± {level} CI over seeds)", "",
                  "| task type | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
        for g in names:
            row = [(_pct(groups[split][g][a][split]["reward"]) if a in groups[split][g] else "-") for a in arms]
            lines.append(f"| {g} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, arms: Sequence[str], splits: Sequence[str], main: dict[str, Any], title: str) -> None:
    """Bars of average reward and success rate per arm, one panel per split and metric, CI whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(METRICS), len(splits), figsize=(max(6, 1.0 * len(arms)) * len(splits), 7),
                             squeeze=False)
    for j, split in enumerate(splits):
        for i, metric in enumerate(METRICS):
            ax = axes[i][j]
            cis = [main.get(a, {}).get(split, {}).get(metric) for a in arms]
            means = [100 * c.mean if c else 0.0 for c in cis]
            errors = [0.0 if c is None or math.isnan(c.half_width) else 100 * c.half_width for c in cis]
            ax.bar(range(len(arms)), means, yerr=errors, capsize=4, color="tab:blue")
            ax.set_xticks(range(len(arms)), arms, rotation=35, ha="right", fontsize=8)
            ax.set(ylabel=f"{'average reward' if metric == 'reward' else 'success rate'} (%)", ylim=(0, 100),
                   title=f"{split}: {metric}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _json_table(t: dict[str, Any]) -> dict[str, Any]:
    def ci(x: Any) -> Any:
        if isinstance(x, Interval):
            return {"mean": x.mean, "half_width": None if math.isnan(x.half_width) else x.half_width, "n": x.n}
        return x

    return {arm: {split: {k: ci(v) for k, v in cells.items()} for split, cells in splits.items()}
            for arm, splits in t.items()}


def machine() -> str:
    """One line naming the hardware and torch a stage ran on: a wall time means little without it."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    accel = f"{len(gpus)}x {gpus[0]}" if gpus else "no GPU"
    return (f"{platform.system()} {platform.machine()}, {cores} CPU cores, {memory:.0f} GiB RAM, {accel}, "
            f"torch {torch.__version__}")


def revision(exclude: Path | None = None) -> dict[str, Any] | None:
    """The checkout's git commit and whether tracked files (other than under ``exclude``, e.g. the results being
    written) differ from it; None outside git: which code produced a report or a stage."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        top = Path(git("rev-parse", "--show-toplevel"))
        skip = exclude.resolve() if exclude is not None else None
        pathspec = [f":(exclude,top){skip.relative_to(top)}"] if skip is not None and skip.is_relative_to(top) else []
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":/", *pathspec)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": head, "dirty": bool(dirty)}


def revision_text(rev: dict[str, Any] | None) -> str:
    if rev is None:
        return "not recorded"
    return rev["commit"] + (" + uncommitted changes" if rev["dirty"] else "")


def _provenance_lines(provenance: Mapping[str, Any]) -> list[str]:
    if not provenance:
        return []
    lines = ["", "## How this was produced", ""]
    if provenance.get("command"):
        lines.append(f"- Command (the run that wrote this report): `{provenance['command']}`")
    if provenance.get("revision"):
        lines.append(f"- Code of that run: commit `{provenance['revision']}` (stages published earlier may come from "
                     "earlier commits: below)")
    commits = provenance.get("stage_commits") or {}
    if commits:
        lines.append("- Commits the stages came from, per stage kind:")
        lines += [f"  - {kind}: " + ", ".join(f"`{c}` ({n})" for c, n in by_commit.items())
                  for kind, by_commit in commits.items()]
    stale = provenance.get("built_on_stale") or []
    if stale:
        by_arm: dict[str, list[str]] = defaultdict(list)
        for e in stale:
            by_arm[e["arm"]].append(f"{e['seed']}/{e['split']}")
        lines.append(f"- **{STALE_MARK} Built on stale stages** (made by other code than the report's, taken with "
                     f"--reuse_stale): {len(stale)} evaluation(s), seed/split: "
                     + "; ".join(f"{arm} {', '.join(cells)}" for arm, cells in by_arm.items()))
    if provenance.get("report_machine"):
        lines.append(f"- Report written on: {provenance['report_machine']}")
    machines = provenance.get("stage_machines") or {}
    if machines:
        lines.append("- Stages (the wall times above) ran on:")
        lines += [f"  - {name}: {n} stage(s)" for name, n in machines.items()]
    return lines


def write_results(root: Path, title: str, arms: Sequence[str], splits: Sequence[str],
                  evals: Mapping[tuple[str, int, str], tuple[str, Path]], confidence: float,
                  config: dict[str, Any], seconds: dict[str, float],
                  notes: Sequence[str] = (), baselines: Sequence[str] = ("sft", "eto"),
                  provenance: Mapping[str, Any] | None = None,
                  hypotheses: Sequence[Hypothesis] = ()) -> dict[str, Any]:
    """Writes results.json, results.md and results.png to ``root`` and returns what results.json holds.
    ``seconds``: wall time per stage kind (summed over its stages and shards); ``notes``: markdown placed between
    the title and the table (a study's pre-registered protocol, its outcome); ``baselines``: the arms every other arm
    is compared with; ``provenance``: the command, code revision and machines behind the numbers (``command``,
    ``revision``, ``report_machine``, ``stage_machines``: machine -> number of stages; ``stage_commits``: stage
    kind -> commit -> number of stages; ``built_on_stale``: the evaluations built on stale stages, whose arms the
    table marks); ``hypotheses``: pre-registered claims, decided in their own section (:func:`decide`)."""
    records = collect(evals)
    decided = decide(records, hypotheses, confidence)
    main = table(records, confidence)
    compared = comparisons(records, arms, confidence, baselines)
    group_names = {split: sorted({r["group"] for r in records if r["split"] == split}) for split in splits}
    groups = {split: {g: table([r for r in records if r["split"] == split], confidence, g) for g in names}
              for split, names in group_names.items()}
    timing = ["", "## Wall time per stage (summed over runs and shards)", "",
              "| stage | minutes |", "|---|---|", *(f"| {k} | {v / 60:.1f} |" for k, v in seconds.items()),
              *_provenance_lines(provenance or {})]
    stale_arms = sorted({e["arm"] for e in (provenance or {}).get("built_on_stale") or []})
    report = format_markdown(title, arms, splits, main, compared, groups, confidence, stale_arms, decided)
    if notes:
        head, _, rest = report.partition("\n\n")
        report = "\n\n".join([head, *(n.strip() for n in notes), "## Results", rest])
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.md").write_text(report + "\n".join(timing) + "\n")
    plot(root / "results.png", arms, splits, main, title)
    result = {"config": config, "confidence": confidence, "arms": list(arms), "splits": list(splits),
              "table": _json_table(main), "comparisons": compared, "hypotheses": decided,
              "per_task_type": {s: {g: _json_table(t) for g, t in gs.items()} for s, gs in groups.items()},
              "stage_seconds": seconds, "provenance": dict(provenance or {}),
              "episodes": records}
    (root / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print((root / "results.md").read_text())
    print(f"results -> {root / 'results.md'}, {root / 'results.json'}, {root / 'results.png'}")
    return result
