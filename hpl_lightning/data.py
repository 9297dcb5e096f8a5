"""The LightningDataModule: validated, tokenized records served in curriculum order, resumable mid-epoch.

Each Lightning epoch trains on one curriculum phase; by default (:class:`PhaseSchedule`) each phase is one pass over
its pool, the items of every phase so far, as the authors' release builds its phase files. Validation at the end of an
epoch is the paper's evaluation at the end of a phase. The train loader is stateful: its position is saved in every
checkpoint and restored on ``--ckpt_path last``, so a preempted run continues at the next unseen batch; a resume
that would change the batch order (seed, curriculum, schedule, batch size, accumulation, world size, training data)
is refused. Every batch carries the number of pairs of each level (and behaviour-cloning tokens) in its whole
optimizer step, all micro-batches and ranks included, so the model averages each level over the step without a
collective (:func:`step_counts`).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from hpl_lightning.curriculum import Curriculum, Slot, benchmark_of, epoch_batches, one_pass_members, phase_members
from hpl_lightning.errors import UsageError
from hpl_lightning.models import context_length, load_tokenizer
from hpl_lightning.packing import pack
from hpl_lightning.schema import LEVELS, PreferencePair, Record, load_records
from hpl_lightning.tokenization import ChatTokenizer, Example, OverlongPolicy, TokenizationReport, UnscorablePolicy

log = logging.getLogger(__name__)
LEVEL_CODES: dict[str, int] = {level: i for i, level in enumerate(LEVELS)}
# What every train batch counts over its whole optimizer step: pairs per level, expert trajectories, and the agent
# tokens of expert trajectories and of pairs' chosen sides (the behaviour-cloning token mean's denominators).
STEP_COUNTS: tuple[str, ...] = (*LEVELS, "bc", "bc_tokens", "chosen_tokens")


@dataclass(frozen=True)
class PhaseSchedule:
    """How the curriculum phases divide training; each phase is one Lightning epoch (``epochs``: ``length`` epochs).

    ``epochs`` (default): each phase is ``length`` epochs, each a full pass over the phase's pool: every item of the
    phases so far, so with the dual curriculum the B11 group pairs are seen in all three phases, B12 and B21 in the
    last two, and trajectory, step and behaviour-cloning items in every phase. These are the release's cumulative
    phases (``create_curriculum.py``: P1 = B11, P2 = B11 + B12 + B21, P3 = all), each trained for the paper's one
    epoch (``length`` 1). ``one_pass``: the whole stage is a single pass over the data; the trajectory, step and
    behaviour-cloning items are split evenly across the phases and each group pair is used once, in the phase it
    enters (``length`` must be 1). ``steps``: each phase is one epoch of exactly ``length`` batches drawn from the
    phase's pool (reshuffled passes). With ``epochs``/``steps``, epochs after the last phase repeat it.
    """

    unit: Literal["one_pass", "epochs", "steps"] = "epochs"
    length: int = 1

    def __post_init__(self) -> None:
        if self.length < 1 or (self.unit == "one_pass" and self.length != 1):
            raise UsageError(f"data.schedule.length={self.length}: must be >= 1, and 1 with unit one_pass")

    def phase(self, epoch: int, n_phases: int) -> int:
        if self.unit == "one_pass" and epoch >= n_phases:
            raise ValueError(
                f"epoch {epoch}: the one-pass schedule has {n_phases} epochs (one per curriculum phase); set "
                f"trainer.max_epochs <= {n_phases}, or data.schedule.unit=epochs to train several epochs"
            )
        per_phase = self.length if self.unit == "epochs" else 1
        return min(epoch // per_phase + 1, n_phases)

    def n_epochs(self, n_phases: int) -> int:
        """Epochs of a run through every phase once."""
        return n_phases * (self.length if self.unit == "epochs" else 1)

    def n_batches(self) -> int | None:
        return self.length if self.unit == "steps" else None

    def describe(self, n_phases: int) -> str:
        """E.g. ``epochs x1: 3 epoch(s), 1 per curriculum phase``."""
        per = {"one_pass": "1 per curriculum phase, one pass over the data in all",
               "epochs": f"{self.length} per curriculum phase, each a pass over its pool",
               "steps": f"1 of {self.length} batches per curriculum phase"}[self.unit]
        return f"{self.unit} x{self.length}: {self.n_epochs(n_phases)} epoch(s), {per}"


def step_counts(per_rank: Sequence[list[list[Slot]]], examples: Sequence[Example], accumulate: int) -> list[torch.Tensor]:
    """For each batch index of an epoch, :data:`STEP_COUNTS` over its whole optimizer step: the ``accumulate``
    micro-batches of its window (the last window of an epoch may be shorter, as Lightning steps there) on every rank.

    ``per_rank``: every rank's batches of the epoch (equal counts). Fillers count for nothing (weight 0).
    """
    index = {name: i for i, name in enumerate(STEP_COUNTS)}
    n_batches = len(per_rank[0])
    windows = []
    for start in range(0, n_batches, accumulate):
        counts = torch.zeros(len(STEP_COUNTS), dtype=torch.float64)
        for batches in per_rank:
            for batch in batches[start : start + accumulate]:
                for slot in batch:
                    if slot.filler:
                        continue
                    ex = examples[slot.index]
                    counts[index[ex.level]] += 1
                    counts[index["bc_tokens" if ex.level == "bc" else "chosen_tokens"]] += ex.chosen.n_scored
        windows.append(counts)
    return [windows[b // accumulate] for b in range(n_batches)]


def data_warnings(files: Sequence[tuple[str, Sequence[tuple[Record, int]]]]) -> list[str]:
    """Legal but suspect records, one line per kind with its count and first place: pairs whose chosen equals
    rejected (nothing to learn), pairs whose chosen_reward < rejected_reward (preference against the rewards), ids
    found in more than one file (the same item trained twice, or a validation item trained on)."""
    same, inverted, first_file = [], [], {}
    duplicates: list[tuple[str, str, str]] = []
    for path, records in files:
        for record, line in records:
            where = f"{path}:{line}"
            if isinstance(record, PreferencePair):
                if record.chosen == record.rejected:
                    same.append(where)
                if None not in (record.chosen_reward, record.rejected_reward) and \
                        record.chosen_reward < record.rejected_reward:
                    inverted.append(where)
            if record.id in first_file and first_file[record.id][0] != path:
                duplicates.append((record.id, first_file[record.id][1], where))
            first_file.setdefault(record.id, (path, where))
    out = []
    if same:
        out.append(f"{len(same)} pair(s) whose chosen equals rejected (first: {same[0]})")
    if inverted:
        out.append(f"{len(inverted)} pair(s) with chosen_reward < rejected_reward (first: {inverted[0]})")
    if duplicates:
        first_id, a, b = duplicates[0]
        out.append(f"{len(duplicates)} id(s) in more than one file (first: {first_id!r} at {a} and {b})")
    return out


class ExampleDataset(Dataset):
    def __init__(self, examples: Sequence[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, slot: Slot) -> tuple[Example, bool]:
        return self.examples[slot.index], slot.filler


def collate(
    items: list[tuple[Example, bool]], pad_id: int, packing: bool = False, pack_row_tokens: int | None = None
) -> dict[str, Any]:
    """Sequences ordered [pairs' chosen, pairs' rejected, bc trajectories] plus per-item metadata.

    Per-pair (default): one right-padded row per sequence; ``scored[b, t]`` marks tokens whose log-prob counts.
    ``packing``: shared-prefix tree rows instead (:func:`hpl_lightning.packing.pack`), same sequence order.
    Fillers (weight 0) only keep ranks in step. ``ref_logps`` ([chosen..., rejected...]) when every pair has cached
    reference log-probs.
    """
    pairs = [(ex, f) for ex, f in items if ex.rejected is not None]
    bcs = [(ex, f) for ex, f in items if ex.rejected is None]
    seqs = [ex.chosen for ex, _ in pairs] + [ex.rejected for ex, _ in pairs] + [ex.chosen for ex, _ in bcs]
    meta = {
        "n_pairs": len(pairs),
        "n_seqs": len(seqs),
        "pair_level": torch.tensor([LEVEL_CODES[ex.level] for ex, _ in pairs], dtype=torch.long),
        "pair_weight": torch.tensor([0.0 if f else 1.0 for _, f in pairs]),
        "bc_weight": torch.tensor([0.0 if f else 1.0 for _, f in bcs]),
        "ids": [ex.id for ex, f in items if not f],
    }
    if pairs and all(ex.ref_logps is not None for ex, _ in pairs):
        chosen, rejected = [ex.ref_logps[0] for ex, _ in pairs], [ex.ref_logps[1] for ex, _ in pairs]
        meta["ref_logps"] = torch.tensor(chosen + rejected, dtype=torch.float64)
    if packing:
        return {**pack(seqs, pad_id, pack_row_tokens).as_dict(), **meta}
    width = max(len(s.input_ids) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    scored = torch.zeros((len(seqs), width), dtype=torch.bool)
    for b, s in enumerate(seqs):
        n = len(s.input_ids)
        input_ids[b, :n] = torch.tensor(s.input_ids)
        attention_mask[b, :n] = 1
        scored[b, :n] = torch.tensor(s.scored)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "scored": scored, **meta}


@dataclass(frozen=True)
class Collate:
    """Picklable collate (worker processes) bound to the pad id and the packing settings."""

    pad_id: int
    packing: bool = False
    pack_row_tokens: int | None = None

    def __call__(self, items: list[tuple[Example, bool]]) -> dict[str, Any]:
        return collate(items, self.pad_id, self.packing, self.pack_row_tokens)


class ResumableLoader(DataLoader):
    """A DataLoader over a fixed list of batches that reports how many it has handed out.

    Lightning saves ``state_dict()`` in each checkpoint and calls ``load_state_dict`` before iterating on resume;
    the skipped batches are never loaded nor collated. A position in another epoch (a resume with changed settings
    that Lightning counted into the next epoch) is an error, or with ``allow_changed_resume`` the epoch's start.
    Batch ``b`` gets ``counts[b]`` as ``step_counts`` and ``step_end`` (whether it closes its optimizer step, every
    ``accumulate`` batches and at the epoch's end).
    """

    def __init__(
        self, dataset: Dataset, batches: list[list[Slot]], epoch: int, phase: int, counts: list[torch.Tensor],
        accumulate: int, allow_changed_resume: bool = False, **kwargs: Any,
    ):
        super().__init__(dataset, batch_sampler=batches, **kwargs)
        self.epoch, self.phase, self._yielded, self._skip = epoch, phase, 0, 0
        self.counts, self.accumulate, self.allow_changed_resume = counts, accumulate, allow_changed_resume

    def __iter__(self) -> Iterator[Any]:
        skip, self._skip = self._skip, 0
        self._yielded = skip
        if skip:
            log.info("resuming epoch %d at batch %d of %d", self.epoch, skip, len(self.batch_sampler))
        batches = self.batch_sampler[skip:]
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            persistent_workers=False,
        )
        n = len(self.batch_sampler)
        for batch in loader:
            b = self._yielded
            self._yielded += 1
            batch["phase"] = self.phase
            batch["step_counts"] = self.counts[b]
            batch["step_end"] = (b + 1) % self.accumulate == 0 or b + 1 == n
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["epoch"] == self.epoch:
            self._skip = state["batches"]
        elif not self.allow_changed_resume:
            raise RuntimeError(f"checkpoint is at epoch {state['epoch']} but the loader was built for {self.epoch}")


def close_restored_epoch(trainer: L.Trainer) -> None:
    """Finish the epoch a checkpoint saved at its last batch (``every_n_train_steps``) belongs to.

    Lightning 2.6 moves such a resume on to the next epoch but zeroes the batch counters only when the saved epoch's
    batch count reaches ``num_training_batches``, which by then is the *next* epoch's (the loader is rebuilt each
    epoch; curriculum phases differ in size). A longer next epoch then starts "at" the saved batch count and ends
    that many batches early. Called from ``on_train_start``, between the loops' restore and the epoch loop's reset,
    it does what Lightning does for equal-sized epochs: count the saved batch completed and start the next epoch at
    batch 0.
    """
    loop = trainer.fit_loop.epoch_loop
    if not (loop.restarted_on_train_batch_end and loop.batch_progress.is_last_batch):
        return
    loop.batch_progress.increment_completed()
    loop.batch_progress.reset_on_run()
    loop.scheduler_progress.reset_on_run()
    loop.automatic_optimization.optim_progress.reset_on_run()
    loop.val_loop.batch_progress.total.reset()
    loop.reset_restart_stage()  # handled: the epoch loop's reset must not count the batch again


class HPLDataModule(L.LightningDataModule):
    """Preference pairs (trajectory/step/group) and expert trajectories (behaviour cloning), curriculum-ordered.

    Files are JSON Lines in the data contract (``docs/data-format.md``); a file may mix pairs and trajectories, and
    ``train_path`` may list several files. Everything is validated and tokenized in ``setup`` so bad data stops the
    run before any training step, with file, line and field in the error.

    ``packing`` (linked from ``model.packing`` by the CLI) collates shared-prefix tree rows; ``pack_row_tokens``
    caps a packed row (None: one row per batch), bounding the attention's quadratic cost on dense-mask backends.
    ``allow_changed_resume``: resume although a setting that orders the batches (seed, curriculum, schedule, batch
    size, accumulation, world size) or the training files' content changed since the checkpoint (a warning, not an
    error): the loader's saved position then points into another plan, so data is skipped or repeated.
    """

    def __init__(
        self,
        train_path: str | list[str] | None = None,
        val_path: str | list[str] | None = None,
        test_path: str | list[str] | None = None,
        tokenizer: str = "hpl-tiny",
        max_length: int = 6000,
        overlong: OverlongPolicy = "truncate",
        unscorable: UnscorablePolicy = "error",
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        curriculum: Curriculum = Curriculum(),
        schedule: PhaseSchedule = PhaseSchedule(),
        packing: bool = False,
        pack_row_tokens: int | None = None,
        allow_changed_resume: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.paths = {stage: _as_list(p) for stage, p in (("fit", train_path), ("val", val_path), ("test", test_path))}
        self.curriculum, self.schedule = curriculum, schedule
        self.examples: dict[str, list[Example]] = {}
        self.first_phases: list[int] = []
        self._train_hash: str | None = None
        self._thresholds_note = ""
        self._pad_id = 0

    # -- loading -------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        required = {"fit": "fit", "validate": "val", "test": "test"}.get(stage)
        if required and not self.paths[required]:
            raise UsageError(f"data.{required.replace('fit', 'train')}_path is required for {stage}")
        wanted = {"fit": ["fit", "val"], "validate": ["val"], "test": ["test"]}.get(stage, ["fit", "val", "test"])
        wanted = [s for s in wanted if s not in self.examples and self.paths[s]]
        if not wanted:
            return
        context = context_length(self.hparams.tokenizer)
        if context is not None and self.hparams.max_length > context:
            raise UsageError(f"data.max_length {self.hparams.max_length} is above the context length {context} of "
                             f"{self.hparams.tokenizer}: lower it to at most {context}")
        tokenizer = load_tokenizer(self.hparams.tokenizer)
        self._pad_id = tokenizer.pad_token_id
        chat = ChatTokenizer(tokenizer, self.hparams.max_length, self.hparams.overlong, self.hparams.unscorable)
        # Validate every file before tokenizing any: a typo in the val file should not wait for train tokenization.
        loaded = {s: [(p, load_records(p)) for p in self.paths[s]] for s in wanted}
        for warning in data_warnings([f for files in loaded.values() for f in files]):
            print(f"[hpl] warning: {warning}")
        if "fit" in loaded:
            self._resolve_curriculum([r for _, records in loaded["fit"] for r, _ in records])
            self._train_hash = files_hash(self.paths["fit"])
        for split, files in loaded.items():
            report = TokenizationReport()
            examples = []
            for path, records in files:
                for record, line in records:
                    example = chat(record, report, path, line)
                    if example is not None:
                        examples.append(example)
            if not examples:
                raise UsageError(f"no usable {split} example in {self.paths[split]} ({report.summary()})")
            self.examples[split] = examples
            log.info("%s data: %s", split, report.summary())
            print(f"[hpl] {split} data: {report.summary()}")
        if "fit" in loaded:
            self.first_phases = [
                self.curriculum.first_phase(ex.level, ex.group_length, ex.difficulty) for ex in self.examples["fit"]
            ]
            self._check_schedule()
            print("\n".join(f"[hpl] {line}" for line in self.describe_plan()))

    def _resolve_curriculum(self, records: list) -> None:
        """Length thresholds from the benchmark of the group pairs when not given (the paper's per benchmark)."""
        benchmarks = {benchmark_of(r.task_id, r.meta) for r in records if getattr(r, "level", None) == "group"}
        self.curriculum, self._thresholds_note = self.curriculum.for_benchmarks(benchmarks)

    def _check_schedule(self) -> None:
        """Before training, with the trainer's limits: an epoch limit that ends the schedule before its last phase is
        an error (``trainer.max_epochs=1`` is not the paper's "1 epoch"); a step limit that does is the user's
        explicit choice and gets a warning naming the phases never reached. Each epoch serves its own phase, so the
        train loader is rebuilt every epoch, also for a ``Trainer`` built in Python (its default builds it once)."""
        trainer = self.trainer
        if trainer is None:
            return
        trainer.reload_dataloaders_every_n_epochs = 1
        n, max_epochs = self.curriculum.n_phases, trainer.max_epochs
        planned = self.schedule.n_epochs(n)
        what = f"data.schedule {self.schedule.describe(n)}"
        if max_epochs is not None and 0 < max_epochs < planned:
            reached = self.phase(max_epochs - 1)
            raise UsageError(f"trainer.max_epochs={max_epochs} stops after curriculum phase {reached} of {n}, phase(s) "
                             f"{_names(range(reached + 1, n + 1))} never trained ({what}): set "
                             f"trainer.max_epochs={planned}, or trainer.max_steps to stop early on purpose")
        if self.schedule.unit == "one_pass" and max_epochs is not None and max_epochs > planned:
            raise UsageError(f"trainer.max_epochs={max_epochs} is more than {what}: set trainer.max_epochs={n}, or "
                             "data.schedule.unit=epochs for a pass over each phase's pool")
        if trainer.max_steps > 0:
            done = 0
            for epoch in range(planned):
                done += -(-self.batches_per_epoch(epoch) // self._accumulate())
                if done >= trainer.max_steps:
                    phase = self.phase(epoch)
                    if phase < n:
                        print(f"[hpl] warning: trainer.max_steps={trainer.max_steps} ends training in curriculum "
                              f"phase {phase} of {n}, phase(s) {_names(range(phase + 1, n + 1))} never reached "
                              f"({what}: {self._planned_steps()} optimizer steps)")
                    break

    # -- curriculum plan -----------------------------------------------------------------------------------------
    def phase(self, epoch: int) -> int:
        return self.schedule.phase(epoch, self.curriculum.n_phases)

    def _members(self, epoch: int) -> list[int]:
        phase = self.phase(epoch)
        if self.schedule.unit == "one_pass":
            levels = [ex.level for ex in self.examples["fit"]]
            return one_pass_members(self.first_phases, levels, phase, self.curriculum.n_phases, self.hparams.seed)
        return phase_members(self.first_phases, phase)

    def _batches(self, epoch: int, rank: int, world_size: int) -> list[list[Slot]]:
        return epoch_batches(
            self._members(epoch), self.hparams.batch_size, self.hparams.seed, epoch, rank, world_size,
            self.schedule.n_batches(),
        )

    def batches_per_epoch(self, epoch: int) -> int:
        return len(self._batches(epoch, 0, self._world_size()))

    def _planned_steps(self) -> int:
        accumulate = self._accumulate()
        return sum(-(-self.batches_per_epoch(e) // accumulate) for e in range(self.schedule.n_epochs(
            self.curriculum.n_phases)))

    def _n_epochs(self) -> int:
        planned = self.schedule.n_epochs(self.curriculum.n_phases)
        max_epochs = self.trainer.max_epochs if self.trainer is not None else None
        return max_epochs if max_epochs is not None and max_epochs > 0 else planned

    def _accumulate(self) -> int:
        return self.trainer.accumulate_grad_batches if self.trainer is not None else 1

    def _kind(self, ex: Example) -> str:
        return self.curriculum.bucket(ex.group_length, ex.difficulty) if ex.level == "group" else ex.level

    def bucket_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self._kind(ex) for ex in self.examples["fit"]).items()))

    def describe_plan(self) -> list[str]:
        """The run's plan: thresholds, buckets, each epoch's items, batches and optimizer steps, and how many times
        each kind of item is seen over the run (printed at start)."""
        examples, world, accumulate = self.examples["fit"], self._world_size(), self._accumulate()
        lines = [
            f"curriculum {self.curriculum.mode}, {self._thresholds_note}, difficulty thresholds "
            f"{list(self.curriculum.difficulty_thresholds)}; items {self.bucket_counts()}",
            f"schedule {self.schedule.describe(self.curriculum.n_phases)}; batch {self.hparams.batch_size} x "
            f"{world} rank(s) x accumulate {accumulate}",
        ]
        seen: Counter = Counter()
        total_steps = 0
        for epoch in range(self._n_epochs()):
            per_rank = [self._batches(epoch, r, world) for r in range(world)]
            used = [s.index for batches in per_rank for b in batches for s in b if not s.filler]
            seen.update(used)
            steps = -(-len(per_rank[0]) // accumulate)
            total_steps += steps
            kinds = Counter(examples[i].level for i in used)
            lines.append(
                f"epoch {epoch} (phase {self.phase(epoch)}): {len(used)} items {dict(sorted(kinds.items()))}, "
                f"{len(per_rank[0])} batches per rank, {steps} optimizer steps"
            )
        times: dict[str, set[int]] = {}
        for i, ex in enumerate(examples):
            times.setdefault(self._kind(ex), set()).add(seen[i])
        summary = ", ".join(f"{k} {'/'.join(map(str, sorted(v)))}" for k, v in sorted(times.items()))
        lines.append(f"{total_steps} optimizer steps; times each item is seen: {summary}")
        if not any(ex.level == "bc" for ex in examples):
            lines.append(
                "no expert trajectories in the training data: L_BC (the paper's Eq. 1) is 0 unless model.bc_on_chosen "
                "(write them with `pipeline pairs --with_experts true`)"
            )
        return lines

    # -- loaders -------------------------------------------------------------------------------------------------
    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def train_dataloader(self) -> ResumableLoader:
        self._check_sampler_setting()
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        world = self._world_size()
        per_rank = [self._batches(epoch, r, world) for r in range(world)]
        return ResumableLoader(
            ExampleDataset(self.examples["fit"]),
            per_rank[self._rank()],
            epoch=epoch,
            phase=self.phase(epoch),
            counts=step_counts(per_rank, self.examples["fit"], self._accumulate()),
            accumulate=self._accumulate(),
            allow_changed_resume=self.hparams.allow_changed_resume,
            collate_fn=self.make_collate(),
            num_workers=self.hparams.num_workers,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        self._check_sampler_setting()
        members = list(range(len(self.examples[split])))
        batches = epoch_batches(
            members, self.hparams.batch_size, 0, 0, self._rank(), self._world_size(), shuffle=False
        )
        return DataLoader(
            ExampleDataset(self.examples[split]),
            batch_sampler=batches,
            collate_fn=self.make_collate(),
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val") if "val" in self.examples else []

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def make_collate(self) -> Collate:
        return Collate(self._pad_id, self.hparams.packing, self.hparams.pack_row_tokens)

    def _check_sampler_setting(self) -> None:
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise UsageError(
                "set trainer.use_distributed_sampler=false: HPLDataModule shards batches across ranks itself "
                "(disjoint, equal-size shares per curriculum phase)"
            )

    def _order_settings(self) -> dict[str, Any]:
        """What decides the batch order a checkpoint's loader position points into."""
        return {"seed": self.hparams.seed, "curriculum": self.curriculum.mode, "schedule": self.schedule.unit,
                "batch_size": self.hparams.batch_size, "accumulate": self._accumulate(),
                "world_size": self._world_size(), "train_data": self._train_hash}

    def state_dict(self) -> dict[str, Any]:
        return self._order_settings()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuses (one line) a resume whose batch order would differ from the checkpoint's run, unless
        ``allow_changed_resume``; checkpoints older than a setting's check do not hold it and pass it."""
        saved = {"schedule": "epochs", **state}  # checkpoints from before the schedule was saved trained by epochs
        names = {"seed": "data.seed", "curriculum": "data.curriculum.mode", "schedule": "data.schedule.unit",
                 "batch_size": "data.batch_size", "accumulate": "trainer.accumulate_grad_batches",
                 "world_size": "world size", "train_data": "training data (content hash)"}
        changed = [f"{names[k]} {saved[k]} -> {v}" for k, v in self._order_settings().items()
                   if k in saved and saved[k] != v]
        if not changed:
            return
        what = (f"resuming with {', '.join(changed)} since the checkpoint: the batch order differs, so its saved "
                "position would skip or repeat data")
        if not self.hparams.allow_changed_resume:
            raise UsageError(f"{what}; resume with the checkpoint's settings and data, or set "
                             "data.allow_changed_resume=true")
        print(f"[hpl] warning: {what} (data.allow_changed_resume)")


def files_hash(paths: Sequence[str]) -> str:
    """Content hash of files, in order (names not included)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _names(phases: Iterable[int]) -> str:
    return ", ".join(map(str, phases))


def _as_list(path: str | list[str] | None) -> list[str]:
    if path is None:
        return []
    return [path] if isinstance(path, str) else list(path)
