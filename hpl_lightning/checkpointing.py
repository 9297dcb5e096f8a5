"""Checkpoints that survive a kill at any moment, and a resume that steps over a damaged one.

Lightning's ``TorchCheckpointIO`` stages a checkpoint in ``$TMPDIR`` and moves it into place; when ``$TMPDIR`` is on
another filesystem (common on clusters) the move is a copy into the final name, so a kill during it leaves a
truncated ``last.ckpt`` and no previous copy. :class:`AtomicCheckpointIO` writes a temporary file next to the
checkpoint, fsyncs it and renames it over the old one: a reader sees the old checkpoint or the new one, never a part.

``--ckpt_path last`` (or a path) is checked before Lightning loads it (:func:`resume_checkpoint`): a truncated or
corrupt checkpoint is named with what is wrong, and ``last`` falls back to the newest intact checkpoint in the same
directory instead of ending in a torch traceback.

:class:`FinalCheckpoint` makes ``last.ckpt`` hold the end of a fit, whatever ``every_n_train_steps`` is.
"""

from __future__ import annotations

import contextlib
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from hpl_lightning.errors import UsageError

PARTIAL_SUFFIX = ".partial"
SHARDED_META = "meta.pt"  # Lightning's non-tensor state in a sharded (FSDP/ModelParallel) checkpoint directory


class CheckpointError(UsageError):
    """A checkpoint to resume from is unusable and no intact one can stand in for it."""

    def __init__(self, message: str):
        super().__init__(f"unusable checkpoint: {message}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partials(directory: Path) -> list[Path]:
    """Deletes temporary files that a killed save left in ``directory`` (only this module's, by name)."""
    removed = []
    for stale in directory.glob(f".*{PARTIAL_SUFFIX}"):
        if stale.is_file():
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
            removed.append(stale)
    return removed


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` into a temporary file in ``path``'s directory, fsync, rename over ``path``, fsync the
    directory. The rename stays on one filesystem, so it is atomic; the temporary file never outlives a failure
    that Python sees, and one left by a kill is deleted by the next save into that directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_partials(path.parent)
    tmp = path.parent / f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic on every filesystem (see the module docstring); remote
    URLs (``s3://`` ...) keep Lightning's fsspec path."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, Path(path))


def use_atomic_checkpoint_io(strategy: Any) -> None:
    """Makes ``strategy`` write through :class:`AtomicCheckpointIO` if it has Lightning's default writer."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


class FinalCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` (``save_last``) also holds a fit's final optimizer step.

    Lightning 2.6 writes ``last.ckpt`` beside a periodic save only, and at the end of training only if nothing was
    saved at all: with ``every_n_train_steps: 10`` a 19-step fit left ``last.ckpt`` at step 10, so exporting,
    evaluating or resuming "the trained model" took an earlier one. Here, with step- or time-based saving, the batch
    that ends the fit (``max_steps``, or the last batch of the last epoch) saves ``last.ckpt`` as a periodic save
    would, so resuming a finished run finds the loops where a periodic checkpoint leaves them (it trains nothing
    more; a larger ``max_steps`` goes on); a fit that ends otherwise (``should_stop``, ``max_time``) or saves by
    epochs gets it at the end of training, unless its last save was at the final step. Every rank takes the same
    decision (same step, same epoch) and saves together.
    """

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # not when a save of this step still comes (at the epoch's end, or deferred until validation): saving now
        # would make Lightning skip it as already done
        if self._every_n_epochs < 1 and not self._defer_save_until_validation and _ends_fit(trainer):
            self._save_final(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._save_final(trainer)
        super().on_train_end(trainer, pl_module)

    def _save_final(self, trainer: Any) -> None:
        """``last.ckpt`` at the current step unless this step is saved already."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _ends_fit(trainer: Any) -> bool:
    """Whether the fit loop stops after the current training batch: ``max_steps`` reached, or the epoch's last
    batch in the last epoch."""
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return True
    last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
    return last_epoch and trainer.fit_loop.epoch_loop._num_ready_batches_reached()


# ------------------------------------------------------------------------------------------------ checking
def _zip_problem(path: Path) -> str | None:
    """What is wrong with a torch zip checkpoint (every member's CRC is checked), or None."""
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with zipfile.ZipFile(path) as z:
            if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in z.namelist()):
                return "not a torch checkpoint (no data.pkl inside)"
            bad = z.testzip()
    except zipfile.BadZipFile:
        return f"truncated or not a checkpoint: no zip directory at the end of its {size:,} bytes"
    except (OSError, EOFError, zipfile.LargeZipFile) as e:
        return f"unreadable ({size:,} bytes): {e}"
    return f"corrupt: member {bad!r} fails its CRC check" if bad else None


def _sharded_problem(path: Path) -> str | None:
    """What is wrong with a sharded checkpoint directory (torch.distributed.checkpoint + Lightning's meta.pt)."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / ".metadata").is_file():
        return "sharded checkpoint without .metadata (its save did not finish)"
    if not (path / SHARDED_META).is_file():
        return f"sharded checkpoint without {SHARDED_META} (its save did not finish)"
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # torch raises whatever unpickling a damaged file raises
        return f"unreadable .metadata: {type(e).__name__}: {e}"
    sizes: dict[str, int] = {}
    for item in (metadata.storage_data or {}).values():
        name = item.relative_path
        if name not in sizes:
            shard = path / name
            sizes[name] = shard.stat().st_size if shard.is_file() else -1
        if sizes[name] < 0:
            return f"shard {name} is missing"
        if item.offset + item.length > sizes[name]:
            return f"shard {name} is truncated ({sizes[name]:,} bytes, .metadata expects {item.offset + item.length:,})"
    return _zip_problem(path / SHARDED_META)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be resumed from (missing, truncated, corrupt), or None if it is intact."""
    p = Path(path)
    if p.is_dir():
        return _sharded_problem(p)
    if not p.is_file():
        return "no such file"
    return _zip_problem(p)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimizer step a checkpoint (a file, or a sharded directory's ``meta.pt``) was saved at."""
    p = Path(path)
    state = torch.load(p / SHARDED_META if p.is_dir() else p, map_location="cpu", weights_only=False, mmap=True)
    return int(state["global_step"])


def _say(message: str) -> None:
    if rank_zero_only.rank == 0:
        print(message, file=sys.stderr, flush=True)


def fallback_checkpoint(damaged: Path) -> Path | None:
    """The newest (by modification time) intact checkpoint next to ``damaged``, other than it."""
    candidates = [p for p in damaged.parent.glob("*.ckpt") if p != damaged and not p.name.startswith(".")]
    for candidate in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if checkpoint_problem(candidate) is None:
            return candidate
    return None


def resume_checkpoint(ckpt_path: str | None, trainer: Any) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` itself when intact. ``last`` is resolved the way Lightning
    resolves it; when that checkpoint is damaged, the newest intact one in its directory is used instead (said on
    stderr). A damaged checkpoint named by path, or a damaged ``last`` with nothing intact beside it, raises
    :class:`CheckpointError`. Other values (None, ``best``, ``hpc``, remote URLs, missing files) pass through."""
    if ckpt_path is None or ckpt_path in ("best", "hpc") or "://" in str(ckpt_path):
        return ckpt_path
    if ckpt_path == "last":
        from lightning.pytorch.trainer.states import TrainerFn

        resolved = trainer._checkpoint_connector._parse_ckpt_path(
            TrainerFn.FITTING, "last", model_provided=True, model_connected=False
        )
        if resolved is None:
            return None  # nothing saved yet: Lightning starts afresh (and warns)
        path = Path(resolved)
    else:
        path = Path(ckpt_path)
        if not path.exists():
            return ckpt_path  # Lightning's own message
    if path.is_dir() or path.is_file():
        remove_partials(path.parent)
    problem = checkpoint_problem(path)
    if problem is None:
        return str(path)
    if ckpt_path != "last":
        raise CheckpointError(f"{path}: {problem}")
    fallback = fallback_checkpoint(path)
    if fallback is None:
        raise CheckpointError(
            f"{path}: {problem}; no intact checkpoint beside it in {path.parent} to resume from "
            "(move it away to start afresh)"
        )
    _say(f"warning: {path}: {problem}; resuming from {fallback} instead, the newest intact checkpoint in "
         f"{path.parent}")
    return str(fallback)
