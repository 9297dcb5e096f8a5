"""The dual-layer curriculum and the batch plan, without a model."""

from __future__ import annotations

import itertools

import pytest

from hpl_lightning.curriculum import Curriculum, benchmark_of, epoch_batches, one_pass_members, phase_members

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


@pytest.mark.parametrize("task_id,expected", [
    ("sciworld/boil/3", (3, 6)), ("alfworld/train/pick_x/trial_1", (3, 6)), ("webshop/12", (2, 4)),
    ("intercode_sql", (2, 4)), ("intercode_sql/17", (2, 4)),
])
def test_length_thresholds_follow_the_benchmark_of_the_data(task_id, expected):
    """By default (``length_thresholds: benchmark``) the paper's thresholds of the data's benchmark are used."""
    resolved, note = Curriculum().for_benchmarks({benchmark_of(task_id)})
    assert resolved.length_thresholds == expected and str(list(expected)) in note
    assert benchmark_of("task-1", {"benchmark": "alfworld"}) == "alfworld"  # an explicit benchmark field wins


def test_mixed_or_unknown_benchmarks_need_explicit_thresholds():
    for benchmarks in ({"sciworld", "intercode_sql"}, {"mygame"}):
        with pytest.raises(ValueError, match="set data.curriculum.length_thresholds"):
            Curriculum().for_benchmarks(benchmarks)
    explicit, note = Curriculum(length_thresholds=(1, 2)).for_benchmarks({"mygame"})
    assert explicit.length_thresholds == (1, 2) and "explicitly" in note
    static, _ = Curriculum(mode="static").for_benchmarks({"mygame"})  # thresholds unused: no error
    assert static.first_phase("group", 9, 0.1) == 1


def test_one_pass_uses_every_item_once_and_phases_group_pairs_in():
    """The paper's 1-epoch stage: trajectory/step/bc items split evenly over the phases, each group pair once, in
    the phase it enters."""
    curriculum = Curriculum(length_thresholds=(2, 4))
    items = _items() * 3  # 3 of each of trajectory and step, 3 x 18 group pairs
    items += [("bc", None, None, "bc")] * 6
    levels = [level for level, *_ in items]
    first = [curriculum.first_phase(level, length, gap) for level, length, gap, _ in items]
    phases = [one_pass_members(first, levels, p, 3, seed=5) for p in (1, 2, 3)]
    assert sorted(i for members in phases for i in members) == list(range(len(items)))  # each item exactly once
    for p, members in enumerate(phases, start=1):
        kinds = [items[i][3] for i in members]
        assert kinds.count("traj") == 1 and kinds.count("step") == 1 and kinds.count("bc") == 2
        assert {k for k in kinds if k.startswith("B")} == set(EXPECTED["dual"][p - 1]) - (
            set(EXPECTED["dual"][p - 2]) if p > 1 else set())
    assert phases == [one_pass_members(first, levels, p, 3, seed=5) for p in (1, 2, 3)]  # deterministic


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


def test_plan_says_how_often_each_item_is_seen(tmp_path):
    from hpl_lightning.data import HPLDataModule, PhaseSchedule
    from tests.synthetic import make_records, write_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", make_records(n_tasks=4))
    plans = {}
    for unit in ("one_pass", "epochs"):
        dm = HPLDataModule(train_path=str(train), max_length=512, schedule=PhaseSchedule(unit=unit))
        dm.setup("fit")
        plans[unit] = dm.describe_plan()
    assert "intercode_sql" in plans["one_pass"][0]  # the thresholds' source
    assert plans["one_pass"][-1].endswith(
        "times each item is seen: B11 1, B12 1, B13 1, B21 1, B22 1, B23 1, B31 1, B32 1, B33 1, bc 1, step 1, trajectory 1"
    )
    # cumulative (one full pass over each phase's pool): B11 and the steady items 3 times
    assert plans["epochs"][-1].endswith(
        "times each item is seen: B11 3, B12 2, B13 1, B21 2, B22 1, B23 1, B31 1, B32 1, B33 1, bc 3, step 3, trajectory 3"
    )
    with pytest.raises(ValueError, match="trainer.max_epochs"):
        PhaseSchedule(unit="one_pass").phase(3, 3)


def test_default_schedule_trains_the_releases_cumulative_phases(tmp_path):
    """create_curriculum.py: P1 = B11, P2 = B11 + B12 + B21, P3 = all; trajectory, step and BC items in every phase."""
    from hpl_lightning.data import HPLDataModule
    from tests.synthetic import make_records, write_jsonl

    dm = HPLDataModule(train_path=str(write_jsonl(tmp_path / "train.jsonl", make_records(n_tasks=3))), max_length=512)
    dm.setup("fit")
    kinds = [dm._kind(ex) for ex in dm.examples["fit"]]
    for epoch, buckets in enumerate(EXPECTED["dual"]):
        assert dm.phase(epoch) == epoch + 1
        assert sorted(dm._members(epoch)) == phase_members(dm.first_phases, epoch + 1)
        assert {kinds[i] for i in dm._members(epoch)} == buckets | {"trajectory", "step", "bc"}


class _Phases:
    """Records the curriculum phase of every training batch, per epoch."""

    def __init__(self) -> None:
        self.seen: dict[int, set[int]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.setdefault(trainer.current_epoch, set()).add(batch["phase"])


def test_a_trainer_built_in_python_refuses_a_short_schedule_and_reloads_each_phase(tmp_path, capsys):
    """trainer.max_epochs=1 (the paper's "1 epoch" misread) would train phase 1 only: an error before training.
    A step limit is the user's choice: a warning names the phases it never reaches. Each epoch serves its phase's
    own loader, although this Trainer was not told to reload it."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from hpl_lightning.data import HPLDataModule
    from hpl_lightning.module import HPLModule
    from hpl_lightning.errors import UsageError
    from tests.synthetic import make_records, write_jsonl

    train = str(write_jsonl(tmp_path / "train.jsonl", make_records(n_tasks=1)))
    common = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(UsageError, match=r"^trainer.max_epochs=1 stops after curriculum phase 1 of 3, phase\(s\) 2, 3 "
                                         r"never trained .*: set trainer.max_epochs=3"):
        L.Trainer(max_epochs=1, **common).fit(HPLModule(), HPLDataModule(train_path=train, max_length=512))
    phases = type("Recorder", (_Phases, Callback), {})()
    trainer = L.Trainer(max_epochs=3, max_steps=2, callbacks=[phases], **common)  # one batch per phase
    trainer.fit(HPLModule(), HPLDataModule(train_path=train, batch_size=8, max_length=512))
    assert phases.seen == {0: {1}, 1: {2}}
    assert ("[hpl] warning: trainer.max_steps=2 ends training in curriculum phase 2 of 3, phase(s) 3 never reached"
            in capsys.readouterr().out)


def test_a_short_schedule_is_one_line_in_the_cli(tmp_path, capsys):
    from hpl_lightning.cli import main
    from tests.synthetic import make_records, write_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", make_records(n_tasks=1))
    with pytest.raises(SystemExit) as info:
        main(["fit", "--trainer.accelerator=cpu", "--data.max_length=512", f"--data.train_path={train}",
              "--trainer.max_epochs=2", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("error: trainer.max_epochs=2 stops after curriculum phase 2 of 3, phase(s) 3 never")
