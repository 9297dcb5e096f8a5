"""Pre-registered hypotheses decided by the report: claims paired on (seed, task), Holm over the family, a control
on its own, the wrong sign never counted as support, and a claim on arms the study lacks refused before it runs."""

from __future__ import annotations

import numpy as np
import pytest

from hpl_lightning.errors import UsageError
from hpl_lightning.experiment import Benchmark, Evaluation, Experiment
from hpl_lightning.power import components, minimum_detectable_effect
from hpl_lightning.results import Hypothesis, decide, format_markdown
from hpl_lightning.stats import holm, paired_difference


def records(effects: dict[str, float], seeds: int = 3, tasks: int = 12) -> list[dict]:
    """Rewards per (arm, seed, task): a task difficulty shared by every arm, the arm's effect, and cell noise."""
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0.2, 0.6, tasks)
    out = []
    for arm, effect in effects.items():
        for s in range(seeds):
            for t in range(tasks):
                reward = difficulty[t] + effect + rng.normal(0, 0.02)
                out.append({"arm": arm, "seed": s, "split": "test", "task": f"t{t}", "reward": reward,
                            "success": float(reward > 0.5)})
    return out


HYPOTHESES = [
    Hypothesis("control", ["eto > sft"], family=False),
    Hypothesis("H1", ["hpl > eto", "hpl > sft"]),
    Hypothesis("H2", ["hpl-no-group < hpl"]),
    Hypothesis("H3", ["hpl-static < hpl"]),
    Hypothesis("H4", ["hpl-subgoal > hpl"]),
]


def test_hypotheses_are_decided_with_holm_over_the_family() -> None:
    recs = records({"sft": 0.0, "eto": 0.1, "hpl": 0.25, "hpl-no-group": 0.25, "hpl-static": 0.35})
    decided = {h["name"]: h for h in decide(recs, HYPOTHESES, 0.95)}
    assert decided["control"]["verdict"] == "supported" and decided["control"]["level"] == pytest.approx(0.05)
    assert decided["H1"]["verdict"] == "supported"
    # hpl-no-group equals hpl (no support); hpl-static beats hpl, the wrong side: p 1, never support
    assert decided["H2"]["verdict"] == "not supported"
    assert decided["H3"]["p_value"] == 1.0 and decided["H3"]["verdict"] == "not supported"
    assert decided["H4"]["verdict"] == "not evaluated"  # no hpl-subgoal evaluations
    # H1's p is its weaker claim's; Holm over the evaluated family (H1-H3), the control outside it
    cells = {a: {(r["seed"], r["task"]): r["reward"] for r in recs if r["arm"] == a} for a in ("hpl", "eto", "sft")}
    p1 = max(paired_difference(cells["hpl"], cells[b]).p_value for b in ("eto", "sft"))
    assert decided["H1"]["p_value"] == pytest.approx(p1)
    family = [decided[n]["p_value"] for n in ("H1", "H2", "H3")]
    assert [decided[n]["p_adjusted"] for n in ("H1", "H2", "H3")] == pytest.approx(holm(family))
    assert decided["H1"]["level"] == pytest.approx(0.05 / 3)  # the smallest p is tested at α / m
    low = decided["H1"]["comparisons"][0]["low"]
    assert low > 0  # its interval at that level excludes 0 on the predicted side


def test_the_report_shows_each_claim_and_verdict() -> None:
    recs = records({"sft": 0.0, "eto": 0.1, "hpl": 0.25})
    decided = decide(recs, [Hypothesis("H1", ["hpl > eto", "hpl > sft"]), Hypothesis("H4", ["hpl-subgoal > hpl"])],
                     0.95)
    md = format_markdown("t", ["sft", "eto", "hpl"], ["test"], {}, [], {}, 0.95, decided=decided)
    assert "## Pre-registered hypotheses" in md
    assert "| H1 | hpl > eto | test |" in md and "|  | hpl > sft | test |" in md and "**supported**" in md
    assert "| H4 | hpl-subgoal > hpl | test | — | — | — | — | — | not evaluated |" in md


def test_each_claim_reports_the_minimum_effect_its_design_could_detect() -> None:
    """The achieved MDE: the design as run (seeds x tasks) under the variance of the claim's own differences; the
    stricter the level Holm tested a claim at, the larger; a noisier comparison, larger too; one seed, none."""
    recs = records({"sft": 0.0, "eto": 0.1, "hpl": 0.25})
    noisy = [{**r, "reward": r["reward"] + (0.2 * (int(r["task"][1:]) % 5 - 2) if r["arm"] == "hpl" else 0)}
             for r in recs]
    hyps = [Hypothesis("control", ["eto > sft"], family=False), Hypothesis("H1", ["hpl > eto"])]
    quiet, loud = decide(recs, hyps, 0.95), decide(noisy, hyps, 0.95)
    d = np.array([[r["reward"] for r in recs if r["arm"] == "eto" and r["seed"] == s] for s in range(3)]) - \
        np.array([[r["reward"] for r in recs if r["arm"] == "sft" and r["seed"] == s] for s in range(3)])
    assert quiet[0]["comparisons"][0]["mde"] == pytest.approx(minimum_detectable_effect(components(d), 3, 12, 0.05))
    assert 0 < quiet[0]["comparisons"][0]["mde"] < 0.1  # cell noise 0.02 over 3 x 12 cells
    assert loud[1]["comparisons"][0]["mde"] > 3 * quiet[1]["comparisons"][0]["mde"]
    strict = decide(recs, [Hypothesis("H1", ["hpl > eto"], family=False)], 0.99)
    assert strict[0]["comparisons"][0]["mde"] > quiet[1]["comparisons"][0]["mde"]
    one_seed = decide([r for r in recs if r["seed"] == 0], hyps, 0.95)
    assert one_seed[0]["comparisons"][0]["mde"] is None
    md = format_markdown("t", ["sft", "eto", "hpl"], ["test"], {}, [], {}, 0.95, decided=quiet)
    assert f"| 0.95 | {100 * quiet[0]['comparisons'][0]['mde']:.1f} |" in md


@pytest.mark.parametrize("claims, message", [(["hpl >> eto"], "not 'ARM > ARM'"), (["hpl > eto < sft"], "not"),
                                             ([], "no claims")])
def test_malformed_claims_are_refused(claims: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Hypothesis("H", claims).parsed()


def test_a_claim_on_an_arm_or_split_the_experiment_lacks_fails_at_load(tmp_path) -> None:
    benchmark = Benchmark(task_types=["lifespan-longest-lived"], train_per_type=2, eval_per_type=1,
                          eval_splits=["test"])

    def experiment(h: Hypothesis) -> Experiment:
        return Experiment(str(tmp_path), benchmark=benchmark, arms=["sft", "eto"],
                          evaluation=Evaluation(hypotheses=[h]))

    experiment(Hypothesis("control", ["eto > sft"], family=False))
    with pytest.raises(UsageError, match=r"evaluation.hypotheses\[0\] \('H1'\): arms \['hpl'\] are not in arms"):
        experiment(Hypothesis("H1", ["hpl > eto"]))
    with pytest.raises(UsageError, match="split 'dev' is not in benchmark.eval_splits"):
        experiment(Hypothesis("control", ["eto > sft"], split="dev"))
    with pytest.raises(UsageError, match="not 'ARM > ARM'"):
        experiment(Hypothesis("H1", ["eto >= sft"]))
