"""Preference pairs from expert trajectories and exploration rollouts (HPL §2), with the paper's filters.

Everything here is a pure function of records, so the filters are testable without an environment or a model.
Rollout records are the lines ``hpl_lightning.explore`` writes (``Rollout``); expert trajectories are the data
contract's ``Trajectory`` records with their action groups in ``meta["groups"]`` (``pipeline segment``).

Filters (defaults from the authors' release, all configurable in ``PairFilters``):
- trajectory: outcome rewards differ by more than ``traj_margin`` (the better episode is chosen);
- step: the expert suffix is chosen; expert final reward > agent final reward + ``step_reward_margin`` and expert MC
  step value > agent MC step value + ``step_value_margin``;
- group: r̂(G_w) > r̂(G_l) + ``group_margin`` and r̂(G_w) >= ``group_min_chosen``.
Every candidate that a filter drops is counted under the filter's name, so a summary says where pairs went.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any, Iterable, Mapping, Sequence

from hpl_lightning.envs.base import parse_action
from hpl_lightning.schema import PreferencePair, Trajectory, parse_pair, to_json
from hpl_lightning.segmentation import action_indices

Message = dict[str, str]


@dataclass(frozen=True)
class Rollout:
    """One finished rollout, one JSONL line. ``key`` is stable across runs, so a re-run skips finished work.

    ``level``/``index``/``role``/``sample``/``parent`` say what it is:
    - trajectory: ``role="agent"``, a greedy episode from the start (``index`` 0);
    - step ``index`` = t (the expert's first t actions were replayed): ``proposal`` (the agent's alternative action
      â_t and a completion to the end), ``proposal_mc`` (further completions after â_t), ``expert_mc`` (completions
      after the expert's action a_t);
    - group ``index`` = i: ``try`` (``sample`` = try number: a sampled group of the expert group's length, from the
      expert state at the group's start), ``negative_mc`` (completions after the accepted try ``parent``),
      ``expert_mc`` (completions after the expert group).
    ``messages`` are the turns this rollout generated (assistant actions with the observations they got);
    ``reward`` is the outcome reward where it stopped (episode end or the action cap). ``error`` says why a rollout
    failed (its environment crashed on every attempt, or raised): then ``reward`` is None and the rollout takes part
    in no pair and no MC value.
    """

    key: str
    task_id: str
    level: str
    index: int
    role: str
    sample: int
    messages: list[Message]
    actions: list[str | None]
    reward: float | None
    done: bool
    parent: int | None = None
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def rollout_key(task_id: str, level: str, index: int, role: str, sample: int, parent: int | None = None) -> str:
    parts = [task_id, level, str(index), role, str(sample)] + ([] if parent is None else [str(parent)])
    return "|".join(parts)


@dataclass(frozen=True)
class PairFilters:
    """Thresholds of the pair filters; defaults are the paper's (authors' release)."""

    traj_margin: float = 0.01
    step_reward_margin: float = 0.01
    step_value_margin: float = 0.3
    group_margin: float = 0.3
    group_min_chosen: float = 0.8


def expert_actions(trajectory: Trajectory) -> list[str]:
    """The environment commands of the expert's actions ('' where a turn has no ``Action:``, as the agent loop)."""
    return [parse_action(trajectory.messages[i]["content"]) or "" for i in action_indices(trajectory.messages)]


def action_signature(actions: Sequence[str | None], texts: Sequence[str]) -> tuple[str, ...]:
    """What makes two groups the same: their commands (whitespace-normalised), or the whole turn where none parsed."""
    return tuple(" ".join((a if a else t).split()) for a, t in zip(actions, texts))


def rollout_signature(rollout: Rollout) -> tuple[str, ...]:
    texts = [m["content"] for m in rollout.messages if m["role"] == "assistant"]
    return action_signature(rollout.actions, texts)


def accepted_tries(
    expert_signature: tuple[str, ...], tries: Sequence[Rollout], group_length: int, max_negatives: int = 3
) -> list[Rollout]:
    """The tries that become negatives, in try order: exactly ``group_length`` actions, distinct from the expert
    group and from each earlier accepted try, at most ``max_negatives``. Recomputed from the records (never stored)
    so explore and pairs agree, also after a resume."""
    seen = {expert_signature}
    out: list[Rollout] = []
    for t in sorted(tries, key=lambda r: r.sample):
        sig = rollout_signature(t)
        if t.error is None and len(t.actions) == group_length and sig not in seen and len(out) < max_negatives:
            seen.add(sig)
            out.append(t)
    return out


def up_to_last_action(messages: Sequence[Message]) -> list[Message]:
    """Drops the observations after the last assistant turn (a group ends with its last action)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    return list(messages[: last + 1])


def task_head(trajectory: Trajectory) -> list[Message]:
    """The task statement: everything before the first action."""
    return list(trajectory.messages[: action_indices(trajectory.messages)[0]])


@dataclass
class PairReport:
    """Candidates per level and how many each filter dropped."""

    candidates: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)
    dropped: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    def drop(self, level: str, why: str) -> None:
        self.dropped[level][why] += 1

    def summary(self) -> str:
        lines = []
        for level in ("trajectory", "step", "group"):
            why = ", ".join(f"{n} {w}" for w, n in sorted(self.dropped[level].items())) or "none"
            lines.append(f"{level:<10} {self.candidates[level]:>5} candidates, {self.kept[level]:>5} pairs; "
                         f"dropped: {why}")
        return "\n".join(lines)


def _by(rollouts: Iterable[Rollout], level: str) -> dict[tuple[str, int], list[Rollout]]:
    out: dict[tuple[str, int], list[Rollout]] = defaultdict(list)
    for r in rollouts:
        if r.level == level:
            out[(r.task_id, r.index)].append(r)
    return out


def trajectory_pairs(
    experts: Sequence[Trajectory], rollouts: Sequence[Rollout], filters: PairFilters, report: PairReport
) -> list[PreferencePair]:
    """Expert vs greedy agent episode of the same task; the better one is chosen."""
    by_id = {t.id: t for t in experts}
    pairs = []
    for r in rollouts:
        if r.level != "trajectory" or r.task_id not in by_id:
            continue
        report.candidates["trajectory"] += 1
        expert = by_id[r.task_id]
        if abs(expert.reward - r.reward) <= filters.traj_margin:
            report.drop("trajectory", "reward_margin")
            continue
        if not any(m["role"] == "assistant" for m in r.messages):
            report.drop("trajectory", "no_agent_turn")
            continue
        head = task_head(expert)
        expert_turns = expert.messages[len(head):]
        (chosen, cr), (rejected, rr) = sorted(
            [(expert_turns, expert.reward), (r.messages, r.reward)], key=lambda x: -x[1]
        )
        pairs.append(_pair(f"{expert.id}|trajectory", expert.id, "trajectory", head, chosen, rejected, cr, rr,
                           meta={"chosen": "expert" if chosen is expert_turns else "agent"}))
        report.kept["trajectory"] += 1
    return pairs


def step_pairs(
    experts: Sequence[Trajectory], rollouts: Sequence[Rollout], filters: PairFilters, report: PairReport
) -> list[PreferencePair]:
    """Expert suffix vs the agent's suffix from the same expert prefix; rewards are the MC step values."""
    groups = _by(rollouts, "step")
    pairs = []
    for expert in experts:
        at = action_indices(expert.messages)
        for t in range(len(at)):
            rs = groups.get((expert.id, t))
            if not rs:
                continue
            report.candidates["step"] += 1
            proposal = [r for r in rs if r.role == "proposal"]
            agent_mc = [r.reward for r in rs if r.role in ("proposal", "proposal_mc")]
            expert_mc = [r.reward for r in rs if r.role == "expert_mc"]
            if not proposal or not expert_mc:
                report.drop("step", "incomplete")
                continue
            agent, v_expert, v_agent = proposal[0], fmean(expert_mc), fmean(agent_mc)
            if not expert.reward > agent.reward + filters.step_reward_margin:
                report.drop("step", "reward_margin")
                continue
            if not v_expert > v_agent + filters.step_value_margin:
                report.drop("step", "value_margin")
                continue
            pairs.append(_pair(
                f"{expert.id}|step|{t}", expert.id, "step", expert.messages[: at[t]], expert.messages[at[t]:],
                agent.messages, v_expert, v_agent,
                meta={"t": t, "chosen_final_reward": expert.reward, "rejected_final_reward": agent.reward,
                      "mc_samples": [len(expert_mc), len(agent_mc)]},
            ))
            report.kept["step"] += 1
    return pairs


def group_pairs(
    experts: Sequence[Trajectory],
    rollouts: Sequence[Rollout],
    filters: PairFilters,
    report: PairReport,
    max_negatives: int = 3,
) -> list[PreferencePair]:
    """Expert group vs each accepted negative group from the same context; rewards are the MC group values r̂(G)."""
    by_group = _by(rollouts, "group")
    pairs = []
    for expert in experts:
        at = action_indices(expert.messages)
        actions = expert_actions(expert)
        for i, (s, e) in enumerate(expert.meta.get("groups") or []):
            rs = by_group.get((expert.id, i))
            if not rs:
                continue
            length = e - s + 1
            texts = [expert.messages[j]["content"] for j in at[s:e + 1]]
            negatives = accepted_tries(action_signature(actions[s:e + 1], texts),
                                       [r for r in rs if r.role == "try"], length, max_negatives)
            expert_mc = [r.reward for r in rs if r.role == "expert_mc"]
            chosen = up_to_last_action(expert.messages[at[s]: at[e] + 1])
            for neg in negatives:
                report.candidates["group"] += 1
                neg_mc = [r.reward for r in rs if r.role == "negative_mc" and r.parent == neg.sample]
                if not expert_mc or not neg_mc:
                    report.drop("group", "incomplete")
                    continue
                v_w, v_l = fmean(expert_mc), fmean(neg_mc)
                if not v_w > v_l + filters.group_margin:
                    report.drop("group", "margin")
                    continue
                if not v_w >= filters.group_min_chosen:
                    report.drop("group", "min_chosen")
                    continue
                pairs.append(_pair(
                    f"{expert.id}|group|{i}|{neg.sample}", expert.id, "group", expert.messages[: at[s]], chosen,
                    up_to_last_action(neg.messages), v_w, v_l, group_length=length, difficulty=v_w - v_l,
                    meta={"group": [s, e], "try": neg.sample, "mc_samples": [len(expert_mc), len(neg_mc)]},
                ))
                report.kept["group"] += 1
    return pairs


def _pair(
    pid: str, task_id: str, level: str, prompt: list[Message], chosen: list[Message], rejected: list[Message],
    chosen_reward: float, rejected_reward: float, group_length: int | None = None,
    difficulty: float | None = None, meta: Mapping[str, Any] | None = None,
) -> PreferencePair:
    """A validated pair: it goes through the schema's parser, as train.py will read it."""
    pair = PreferencePair(pid, task_id, level, list(prompt), list(chosen), list(rejected), chosen_reward,
                          rejected_reward, group_length, difficulty, dict(meta or {}))
    return parse_pair(to_json(pair))


def build_pairs(
    experts: Sequence[Trajectory],
    rollouts: Sequence[Rollout],
    filters: PairFilters = PairFilters(),
    levels: Sequence[str] = ("trajectory", "step", "group"),
    max_negatives: int = 3,
) -> tuple[list[PreferencePair], PairReport]:
    """All pairs of the asked levels and the report of what each filter dropped (failed rollouts are left out)."""
    rollouts = [r for r in rollouts if r.error is None]
    report = PairReport()
    pairs: list[PreferencePair] = []
    if "trajectory" in levels:
        pairs += trajectory_pairs(experts, rollouts, filters, report)
    if "step" in levels:
        pairs += step_pairs(experts, rollouts, filters, report)
    if "group" in levels:
        pairs += group_pairs(experts, rollouts, filters, report, max_negatives)
    return pairs, report
