"""The LightningDataModule: validated, tokenized records served in curriculum order, resumable mid-epoch.

Each Lightning epoch trains on one curriculum phase (a phase may span several epochs, or a fixed number of steps);
validation at the end of an epoch is the paper's evaluation at the end of a phase. The train loader is stateful: its
position is saved in every checkpoint and restored on ``--ckpt_path last``, so a preempted run continues at the next
unseen batch.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from hpl_lightning.curriculum import Curriculum, Slot, epoch_batches, phase_members
from hpl_lightning.models import load_tokenizer
from hpl_lightning.packing import pack
from hpl_lightning.schema import LEVELS, load_records
from hpl_lightning.tokenization import ChatTokenizer, Example, OverlongPolicy, TokenizationReport, UnscorablePolicy

log = logging.getLogger(__name__)
LEVEL_CODES: dict[str, int] = {level: i for i, level in enumerate(LEVELS)}


@dataclass(frozen=True)
class PhaseSchedule:
    """How long each curriculum phase lasts: ``length`` epochs per phase (each one pass over the phase's data), or
    with ``unit='steps'`` one epoch of exactly ``length`` batches per phase. Epochs after the last phase repeat it."""

    unit: Literal["epochs", "steps"] = "epochs"
    length: int = 1

    def phase(self, epoch: int, n_phases: int) -> int:
        per_phase = self.length if self.unit == "epochs" else 1
        return min(epoch // per_phase + 1, n_phases)

    def n_batches(self) -> int | None:
        return self.length if self.unit == "steps" else None


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
    the skipped batches are never loaded nor collated.
    """

    def __init__(self, dataset: Dataset, batches: list[list[Slot]], epoch: int, phase: int, **kwargs: Any):
        super().__init__(dataset, batch_sampler=batches, **kwargs)
        self.epoch, self.phase, self._yielded, self._skip = epoch, phase, 0, 0

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
        for batch in loader:
            self._yielded += 1
            batch["phase"] = self.phase
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["epoch"] != self.epoch:
            raise RuntimeError(f"checkpoint is at epoch {state['epoch']} but the loader was built for {self.epoch}")
        self._skip = state["batches"]


class HPLDataModule(L.LightningDataModule):
    """Preference pairs (trajectory/step/group) and expert trajectories (behaviour cloning), curriculum-ordered.

    Files are JSON Lines in the data contract (``docs/data-format.md``); a file may mix pairs and trajectories, and
    ``train_path`` may list several files. Everything is validated and tokenized in ``setup`` so bad data stops the
    run before any training step, with file, line and field in the error.

    ``packing`` (linked from ``model.packing`` by the CLI) collates shared-prefix tree rows; ``pack_row_tokens``
    caps a packed row (None: one row per batch), bounding the attention's quadratic cost on dense-mask backends.
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
    ):
        super().__init__()
        self.save_hyperparameters()
        self.paths = {stage: _as_list(p) for stage, p in (("fit", train_path), ("val", val_path), ("test", test_path))}
        self.curriculum, self.schedule = curriculum, schedule
        self.examples: dict[str, list[Example]] = {}
        self.first_phases: list[int] = []
        self._pad_id = 0

    # -- loading -------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        required = {"fit": "fit", "validate": "val", "test": "test"}.get(stage)
        if required and not self.paths[required]:
            raise ValueError(f"data.{required.replace('fit', 'train')}_path is required for {stage}")
        wanted = {"fit": ["fit", "val"], "validate": ["val"], "test": ["test"]}.get(stage, ["fit", "val", "test"])
        wanted = [s for s in wanted if s not in self.examples and self.paths[s]]
        if not wanted:
            return
        tokenizer = load_tokenizer(self.hparams.tokenizer)
        self._pad_id = tokenizer.pad_token_id
        chat = ChatTokenizer(tokenizer, self.hparams.max_length, self.hparams.overlong, self.hparams.unscorable)
        # Validate every file before tokenizing any: a typo in the val file should not wait for train tokenization.
        loaded = {s: [(p, load_records(p)) for p in self.paths[s]] for s in wanted}
        for split, files in loaded.items():
            report = TokenizationReport()
            examples = []
            for path, records in files:
                for record, line in records:
                    example = chat(record, report, path, line)
                    if example is not None:
                        examples.append(example)
            if not examples:
                raise ValueError(f"no usable {split} example in {self.paths[split]} ({report.summary()})")
            self.examples[split] = examples
            log.info("%s data: %s", split, report.summary())
            print(f"[hpl] {split} data: {report.summary()}")
        if "fit" in loaded:
            self.first_phases = [
                self.curriculum.first_phase(ex.level, ex.group_length, ex.difficulty) for ex in self.examples["fit"]
            ]
            print(f"[hpl] {self.describe_plan()}")

    # -- curriculum plan -----------------------------------------------------------------------------------------
    def phase(self, epoch: int) -> int:
        return self.schedule.phase(epoch, self.curriculum.n_phases)

    def _batches(self, epoch: int, rank: int, world_size: int) -> list[list[Slot]]:
        members = phase_members(self.first_phases, self.phase(epoch))
        return epoch_batches(
            members, self.hparams.batch_size, self.hparams.seed, epoch, rank, world_size, self.schedule.n_batches()
        )

    def batches_per_epoch(self, epoch: int) -> int:
        return len(self._batches(epoch, 0, self._world_size()))

    def bucket_counts(self) -> dict[str, int]:
        counts: Counter = Counter()
        for ex in self.examples["fit"]:
            if ex.level == "group":
                counts[self.curriculum.bucket(ex.group_length, ex.difficulty)] += 1
            else:
                counts[ex.level] += 1
        return dict(sorted(counts.items()))

    def describe_plan(self) -> str:
        phases = ", ".join(
            f"phase {p}: {len(phase_members(self.first_phases, p))} items"
            for p in range(1, self.curriculum.n_phases + 1)
        )
        return f"curriculum {self.curriculum.mode}; buckets {self.bucket_counts()}; {phases}"

    # -- loaders -------------------------------------------------------------------------------------------------
    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def train_dataloader(self) -> ResumableLoader:
        self._check_sampler_setting()
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return ResumableLoader(
            ExampleDataset(self.examples["fit"]),
            self._batches(epoch, self._rank(), self._world_size()),
            epoch=epoch,
            phase=self.phase(epoch),
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
            raise ValueError(
                "set trainer.use_distributed_sampler=false: HPLDataModule shards batches across ranks itself "
                "(disjoint, equal-size shares per curriculum phase)"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.hparams.seed, "curriculum": self.curriculum.mode}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.hparams.seed or state.get("curriculum") != self.curriculum.mode:
            raise ValueError(
                f"resuming with data.seed={self.hparams.seed}, curriculum={self.curriculum.mode} but the checkpoint "
                f"was trained with seed={state.get('seed')}, curriculum={state.get('curriculum')}: the batch order "
                "would differ and the run would redo or skip data"
            )


def _as_list(path: str | list[str] | None) -> list[str]:
    if path is None:
        return []
    return [path] if isinstance(path, str) else list(path)
