"""Which optimizer step the study's exported and evaluated checkpoints held (correction.md), from its stage records.

The training logs were not kept, so the step counts are rebuilt from what the records hold: the pairs per level of
each pairs stage, the experts, each run's options; and the project's own batch plan (curriculum.one_pass_members,
epoch_batches). The records keep how many group pairs a run had, not their curriculum buckets, so every assignment
of group pairs to phases is tried and the resulting range printed. Until issue 23's fix, ``last.ckpt`` was written
only at multiples of ``checkpoint.every_n_train_steps``.

    python results/sciworld-cpu-small/correction_steps.py
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from hpl_lightning.curriculum import epoch_batches, one_pass_members, phase_members

STAGES = Path(__file__).resolve().parent / "stages"


def records(kind: str) -> dict[str, dict]:
    return {r["key"]: r for r in (json.loads(p.read_text()) for p in (STAGES / kind).glob("*/done.json"))}


def batch_sizes(levels: list[str], first_phases: list[int], n_phases: int, batch: int) -> list[int]:
    """Items per optimizer step of a one-pass run, in order (one process, no accumulation)."""
    sizes = []
    for phase in range(1, n_phases + 1):
        members = one_pass_members(first_phases, levels, phase, n_phases, seed=0)
        sizes += [len(b) for b in epoch_batches(members, batch, 0, phase - 1)]
    return sizes


def main() -> None:
    experts = next(iter(records("experts").values()))["result"]["trajectories"]
    pairs = records("pairs")
    print("| run | training items | optimizer steps | step of last.ckpt | items trained on by then |")
    print("|---|---|---|---|---|")
    for sft in sorted(records("sft").values(), key=lambda r: r["params"]["seed"]):
        o = sft["params"]["options"]
        assert o["data.curriculum.mode"] == "static" and o["data.schedule.unit"] == "epochs"
        steps = sum(len(epoch_batches(phase_members([1] * experts, 1), o["data.batch_size"], 0, e))
                    for e in range(o["trainer.max_epochs"]))
        every = o["checkpoint.every_n_train_steps"]
        saved = steps // every * every
        print(f"| sft{sft['params']['seed']} | {experts} experts x {o['trainer.max_epochs']} epochs | {steps} | "
              f"{saved} of {steps} | {saved * o['data.batch_size']} of {steps * o['data.batch_size']} (item passes) |")
    for name, run in sorted((p.parent.name, records("train")[json.loads(p.read_text())["key"]])
                            for p in (STAGES / "train").glob("*/done.json")):
        options = {**run["params"]["training"]["options"], **run["params"]["options"]}
        every, batch = options["checkpoint.every_n_train_steps"], options["data.batch_size"]
        static = options.get("data.curriculum.mode", "dual") == "static"
        n_phases = 1 if static else 3
        assert options["trainer.max_epochs"] == n_phases  # one pass, one epoch per phase
        counts = pairs[run["deps"][0]]["result"]["pairs"]
        levels = [lv for lv, n in counts.items() for _ in range(n) if lv != "group"] + ["bc"] * experts
        n_groups = counts.get("group", 0)
        outcomes = set()
        for phases in itertools.product(range(1, n_phases + 1), repeat=n_groups):
            sizes = batch_sizes(levels + ["group"] * n_groups, [1] * len(levels) + list(phases), n_phases, batch)
            saved = len(sizes) // every * every
            outcomes.add((len(sizes), saved, sum(sizes[:saved])))
        items = len(levels) + n_groups
        steps = " or ".join(str(n) for n in sorted({o[0] for o in outcomes}))
        saved = " or ".join(f"{k} of {n}" for n, k in sorted({o[:2] for o in outcomes}))
        trained = " or ".join(str(i) for i in sorted({o[2] for o in outcomes}))
        print(f"| {name.rsplit('-', 1)[0]} | {items} | {steps} | {saved} | {trained} of {items} |")

if __name__ == "__main__":
    main()
