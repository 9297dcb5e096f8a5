"""The dual-layer curriculum and the batch plan, without a model."""

from __future__ import annotations

import itertools

import pytest

from hpl_lightning.curriculum import Curriculum, epoch_batches, phase_members

# one group pair per bucket, lengths/gaps chosen on and around the thresholds (SQL: lengths 2/4, gaps 0.7/0.4)
LENGTHS = {1: [1, 2], 2: [3, 4], 3: [5, 9]}
GAPS = {1: [0.7, 1.0], 2: [0.4, 0.69], 3: [0.0, 0.39]}


def _items():
    items = [("trajectory", None, None, "traj"), ("step", None, None, "step")]
    for l, d in itertools.product((1, 2, 3), (1, 2, 3)):
        for length, gap in zip(LENGTHS[l], GAPS[d]):
            items.append(("group", length, gap, f"B{l}{d}"))
    return items


EXPECTED = {
    "dual": [{"B11"}, {"B11", "B12", "B21"}, {f"B{l}{d}" for l in (1, 2, 3) for d in (1, 2, 3)}],
    "length": [{"B11", "B12", "B13"}, {"B11", "B12", "B13", "B21", "B22", "B23"},
               {f"B{l}{d}" for l in (1, 2, 3) for d in (1, 2, 3)}],
    "difficulty": [{"B11", "B21", "B31"}, {"B11", "B21", "B31", "B12", "B22", "B32"},
                   {f"B{l}{d}" for l in (1, 2, 3) for d in (1, 2, 3)}],
    "static": [{f"B{l}{d}" for l in (1, 2, 3) for d in (1, 2, 3)}],
}


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_each_phase_holds_exactly_the_papers_buckets(mode):
    curriculum = Curriculum(mode=mode, length_thresholds=(2, 4), difficulty_thresholds=(0.7, 0.4))
    items = _items()
    assert [curriculum.bucket(length, gap) for level, length, gap, _ in items if level == "group"] == [
        name for level, _, _, name in items if level == "group"
    ]
    first = [curriculum.first_phase(level, length, gap) for level, length, gap, _ in items]
    assert curriculum.n_phases == len(EXPECTED[mode])
    for phase, buckets in enumerate(EXPECTED[mode], start=1):
        members = {items[i][3] for i in phase_members(first, phase)}
        assert members == buckets | {"traj", "step"}  # trajectory and step pairs in every phase


def test_alfworld_thresholds():
    curriculum = Curriculum(length_thresholds=(3, 6))
    assert [curriculum.length_level(n) for n in (1, 3, 4, 6, 7)] == [1, 1, 2, 2, 3]


@pytest.mark.parametrize("n_items,batch,world", [(19, 4, 2), (15, 4, 2), (3, 2, 2), (28, 3, 3), (5, 4, 1)])
def test_ranks_get_disjoint_equal_count_shares_that_cover_the_phase(n_items, batch, world):
    members = list(range(100, 100 + n_items))
    per_rank = [epoch_batches(members, batch, seed=1, epoch=2, rank=r, world_size=world) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # same number of steps on every rank (no DDP hang)
    real = [s.index for batches in per_rank for b in batches for s in b if not s.filler]
    assert sorted(real) == members  # every item exactly once: nothing repeated or skipped
    for batches in per_rank:
        assert all(0 < len(b) <= batch for b in batches)
    sizes = [sum(len(b) for b in batches) for batches in per_rank]
    assert len(set(sizes)) == 1  # equal-size shares (fillers, weight 0, even out the remainder)
    assert sum(s.filler for batches in per_rank for b in batches for s in b) < world


def test_plan_is_deterministic_and_reshuffled_per_epoch():
    members = list(range(40))
    a = epoch_batches(members, 4, seed=3, epoch=0)
    assert a == epoch_batches(members, 4, seed=3, epoch=0)
    assert a != epoch_batches(members, 4, seed=3, epoch=1)
    assert a != epoch_batches(members, 4, seed=4, epoch=0)


def test_step_schedule_cycles_through_reshuffled_passes():
    batches = epoch_batches(list(range(10)), 4, seed=0, epoch=0, n_batches=6)
    flat = [s.index for b in batches for s in b]
    assert len(batches) == 6 and len(flat) == 24
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
