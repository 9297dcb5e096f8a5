"""Preference pairs from expert trajectories and exploration rollouts (HPL §2), with the paper's filters.

Everything here is a pure function of records, so the filters are testable without an environment or a model.
Rollout records are the lines ``hpl_lightning.explore`` writes (``Rollout``); expert trajectories are the data
contract's ``Trajectory`` records with their action groups in ``meta["groups"]`` (``pipeline segment``).

Filters (thresholds from the authors' release where the paper gives none, all configurable in ``PairFilters``):
- trajectory: outcome rewards differ by more than ``traj_margin`` (the better episode is chosen);
- step: the agent's alternative action â_t must differ from the expert's a_t (explore resamples it); one side is
  chosen when its final reward beats the other's by ``step_reward_margin`` and its MC step value by
  ``step_value_margin`` (the expert's side, or with ``step_both_directions`` the agent's too). Both sides are capped
  alike: with an action cap, the expert suffix is cut where the agent's rollouts are, and its final reward is the
  one reached at that cut (``expert_cut``), not the whole episode's;
- group: r̂(G_w) > r̂(G_l) + ``group_margin`` and r̂(G_w) >= ``group_min_chosen``.
Every candidate that a filter drops is counted under the filter's name, and every sampled alternative equal to the
expert's (resampled) is counted, so a summary says where pairs went.
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
    - step ``index`` = t (the expert's first t actions were replayed): ``try`` (``sample`` = try number: one sampled
      action, the alternative â_t when it differs from the expert's a_t), ``proposal_mc`` (completions after the
      accepted try ``parent``; sample 0 is the rejected continuation), ``expert_mc`` (completions after the expert's
      a_t), ``expert_cut`` (with an action cap: the expert's own actions replayed up to the cap, ``sample`` = how many
      after the branch point; its reward is the expert's at that cut);
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
    """Thresholds of the pair filters. The paper states none but the group's (0.3, 0.8); every default is the
    authors' release (github.com/PatrickG1014/HPL, commit dc23ada), file named per field."""

    traj_margin: float = 0.01  # pipeline/trajectory/create_preference_traj.py --traj_threshold
    step_reward_margin: float = 0.01  # pipeline/step/construct_preference_step.py (final rewards, "+ 0.01")
    step_value_margin: float = 0.3  # ibid. --step_threshold (IPR used 0.01)
    step_both_directions: bool = True  # ibid.: the agent's continuation is chosen when it wins by both margins
    group_margin: float = 0.3  # paper §2.2; pipeline/group/construct_preference_group.py ("+ 0.3")
    group_min_chosen: float = 0.8  # paper §2.2; ibid. (">= 0.8"); expert-chosen only, as there


def expert_actions(trajectory: Trajectory) -> list[str]:
    """The environment commands of the expert's actions ('' where a turn has no ``Action:``, as the agent loop)."""
    return [parse_action(trajectory.messages[i]["content"]) or "" for i in action_indices(trajectory.messages)]


def action_signature(actions: Sequence[str | None], texts: Sequence[str]) -> tuple[str, ...]:
    """What makes two groups the same: their commands (whitespace-normalised), or the whole turn where none parsed."""
    return tuple(" ".join((a if a else t).split()) for a, t in zip(actions, texts))


def expert_signature(trajectory: Trajectory, start: int, end: int) -> tuple[str, ...]:
    """The signature of the expert's actions ``start..end`` (inclusive), as :func:`action_signature` makes it."""
    at, actions = action_indices(trajectory.messages), expert_actions(trajectory)
    return action_signature(actions[start:end + 1], [trajectory.messages[j]["content"] for j in at[start:end + 1]])


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


def equal_to_expert(expert_signature: tuple[str, ...], tries: Sequence[Rollout]) -> int:
    """How many finished tries sampled exactly the expert's actions (each one resampled)."""
    return sum(t.error is None and rollout_signature(t) == expert_signature for t in tries)


def through_observation(messages: Sequence[Message], at: Sequence[int], t: int) -> list[Message]:
    """The conversation up to and including action t's observation (or action t, when nothing followed it)."""
    end = at[t] + 1
    return list(messages[: end + 1] if end < len(messages) and messages[end]["role"] == "user" else messages[:end])


def up_to_last_action(messages: Sequence[Message]) -> list[Message]:
    """Drops the observations after the last assistant turn (a group ends with its last action)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    return list(messages[: last + 1])


def task_head(trajectory: Trajectory) -> list[Message]:
    """The task statement: everything before the first action."""
    return list(trajectory.messages[: action_indices(trajectory.messages)[0]])


@dataclass
class PairReport:
    """Per level: candidates, sampled alternatives equal to the expert's, what each filter dropped, pairs kept (and
    how many of them chose the agent's side)."""

    candidates: Counter = field(default_factory=Counter)
    equal_to_expert: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)
    agent_chosen: Counter = field(default_factory=Counter)
    dropped: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    def drop(self, level: str, why: str) -> None:
        self.dropped[level][why] += 1

    def keep(self, level: str, agent_chosen: bool) -> None:
        self.kept[level] += 1
        self.agent_chosen[level] += agent_chosen

    def summary(self) -> str:
        lines = []
        for level in ("trajectory", "step", "group"):
            why = ", ".join(f"{n} {w}" for w, n in sorted(self.dropped[level].items())) or "none"
            same = "episodes" if level == "trajectory" else "alternatives (resampled)"
            lines.append(
                f"{level:<10} {self.candidates[level]:>5} candidates, {self.equal_to_expert[level]} {same} equal to "
                f"the expert's; dropped: {why}; kept {self.kept[level]}: {self.kept[level] - self.agent_chosen[level]}"
                f" expert-chosen, {self.agent_chosen[level]} agent-chosen"
            )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"pairs": dict(self.kept), "candidates": dict(self.candidates),
                "equal_to_expert": dict(self.equal_to_expert), "agent_chosen": dict(self.agent_chosen),
                "dropped": {k: dict(v) for k, v in self.dropped.items()}}


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
        whole = expert_signature(expert, 0, len(action_indices(expert.messages)) - 1)
        report.equal_to_expert["trajectory"] += equal_to_expert(whole, [r])
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
        agent_chosen = chosen is not expert_turns
        pairs.append(_pair(f"{expert.id}|trajectory", expert.id, "trajectory", head, chosen, rejected, cr, rr,
                           meta={"chosen": "agent" if agent_chosen else "expert"}))
        report.keep("trajectory", agent_chosen)
    return pairs


@dataclass(frozen=True)
class _Side:
    """One side of a step candidate: its continuation from the branch point, final reward and MC step value."""

    messages: list[Message]
    final_reward: float
    value: float
    samples: int


def _step_sides(expert: Trajectory, t: int, rs: Sequence[Rollout], report: PairReport) -> tuple[_Side, _Side] | str:
    """(expert side, agent side) of the step candidate at prefix t, or why it has none."""
    at = action_indices(expert.messages)
    tries = [r for r in rs if r.role == "try"]
    signature = expert_signature(expert, t, t)
    report.equal_to_expert["step"] += equal_to_expert(signature, tries)
    alternative = accepted_tries(signature, tries, 1, 1)
    if not alternative:
        return "no_distinct_alternative" if tries else "incomplete"
    agent_mc = sorted((r for r in rs if r.role == "proposal_mc" and r.parent == alternative[0].sample),
                      key=lambda r: r.sample)
    expert_mc = [r.reward for r in rs if r.role == "expert_mc"]
    if not agent_mc or not expert_mc:
        return "incomplete"
    cut = [r for r in rs if r.role == "expert_cut"]
    if cut:  # the expert's suffix where the agent's rollouts stop: compared like with like
        chosen = through_observation(expert.messages, at, t + cut[0].sample - 1)[at[t]:]
        expert_final = cut[0].reward
    else:
        chosen, expert_final = expert.messages[at[t]:], expert.reward
    first = agent_mc[0]
    expert_side = _Side(chosen, expert_final, fmean(expert_mc), len(expert_mc))
    agent_side = _Side(alternative[0].messages + first.messages, first.reward, fmean(r.reward for r in agent_mc),
                       len(agent_mc))
    return expert_side, agent_side


def _beats(winner: _Side, loser: _Side, filters: PairFilters) -> str | None:
    """None when ``winner`` beats ``loser`` by both step margins, else the margin it misses."""
    if not winner.final_reward > loser.final_reward + filters.step_reward_margin:
        return "reward_margin"
    if not winner.value > loser.value + filters.step_value_margin:
        return "value_margin"
    return None


def step_pairs(
    experts: Sequence[Trajectory], rollouts: Sequence[Rollout], filters: PairFilters, report: PairReport
) -> list[PreferencePair]:
    """Expert continuation vs the agent's from the same expert prefix, after an alternative action that differs
    from the expert's; rewards are the MC step values. The expert's side is chosen when it wins by both margins;
    with ``step_both_directions`` the agent's side is when it does (a candidate that neither side wins is
    dropped under the margin the expert's side missed)."""
    by_step = _by(rollouts, "step")
    pairs = []
    for expert in experts:
        at = action_indices(expert.messages)
        for t in range(len(at)):
            rs = by_step.get((expert.id, t))
            if not rs:
                continue
            report.candidates["step"] += 1
            sides = _step_sides(expert, t, rs, report)
            if isinstance(sides, str):
                report.drop("step", sides)
                continue
            expert_side, agent_side = sides
            missed = _beats(expert_side, agent_side, filters)
            agent_chosen = missed is not None and filters.step_both_directions and not _beats(
                agent_side, expert_side, filters)
            if missed is not None and not agent_chosen:
                report.drop("step", missed)
                continue
            chosen, rejected = (agent_side, expert_side) if agent_chosen else (expert_side, agent_side)
            pairs.append(_pair(
                f"{expert.id}|step|{t}", expert.id, "step", expert.messages[: at[t]], chosen.messages,
                rejected.messages, chosen.value, rejected.value,
                meta={"t": t, "chosen": "agent" if agent_chosen else "expert",
                      "chosen_final_reward": chosen.final_reward, "rejected_final_reward": rejected.final_reward,
                      "mc_samples": [chosen.samples, rejected.samples]},
            ))
            report.keep("step", agent_chosen)
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
        for i, (s, e) in enumerate(expert.meta.get("groups") or []):
            rs = by_group.get((expert.id, i))
            if not rs:
                continue
            length = e - s + 1
            tries = [r for r in rs if r.role == "try"]
            signature = expert_signature(expert, s, e)
            report.equal_to_expert["group"] += equal_to_expert(signature, tries)
            negatives = accepted_tries(signature, tries, length, max_negatives)
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
                report.keep("group", False)
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
