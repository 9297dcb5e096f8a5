"""Cached reference log-probs: same loss as computing the reference each step, no reference model in memory, and a
changed reference or changed data computes a new cache."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import hpl_lightning.module as module_lib
from hpl_lightning.data import HPLDataModule
from hpl_lightning.module import HPLModule
from tests.synthetic import make_records, write_jsonl
from tests.tiny import save_tiny_checkpoint


class FirstLoss(Callback):
    def __init__(self) -> None:
        self.loss: torch.Tensor | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.loss is None:
            self.loss = outputs["loss"].detach()


def _first_loss(tmp_path, train, reference, cache=None, packing=False) -> tuple[float, HPLModule]:
    capture = FirstLoss()
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[capture], default_root_dir=tmp_path,
        reload_dataloaders_every_n_epochs=1, use_distributed_sampler=False,
    )
    model = HPLModule(reference=reference, init_seed=3, packing=packing, reference_cache=cache)
    trainer.fit(model, HPLDataModule(train_path=str(train), batch_size=6, max_length=512, packing=packing))
    return float(capture.loss), model


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("refs")
    return [str(save_tiny_checkpoint(root / f"ref{seed}", seed=seed)) for seed in (2, 4)]


@pytest.mark.parametrize("packing", [False, True])
def test_cached_reference_gives_the_same_loss_without_loading_it(tmp_path, references, monkeypatch, packing):
    train = write_jsonl(tmp_path / "train.jsonl", make_records(n_tasks=2))
    cache = tmp_path / "cache"
    expected, _ = _first_loss(tmp_path, train, references[0])
    computed, _ = _first_loss(tmp_path, train, references[0], cache, packing)  # computes the cache
    assert len(list(cache.iterdir())) == 1

    loads = []
    real_load = module_lib.load_causal_lm
    monkeypatch.setattr(module_lib, "load_causal_lm", lambda spec, *a: loads.append(spec) or real_load(spec, *a))
    cached, model = _first_loss(tmp_path, train, references[0], cache, packing)  # reads it
    assert loads == ["hpl-tiny"] and model.reference is None  # the policy only: the reference is never loaded
    assert computed == pytest.approx(expected, abs=1e-5)
    assert cached == pytest.approx(expected, abs=1e-5)


def test_cache_of_the_initial_policy_as_reference(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_records(n_tasks=1))
    expected, _ = _first_loss(tmp_path, train, None)
    cached, model = _first_loss(tmp_path, train, None, tmp_path / "cache")
    assert model.reference is None
    assert cached == pytest.approx(expected, abs=1e-5)


def test_changed_reference_or_data_invalidates(tmp_path, references, capsys):
    cache = tmp_path / "cache"
    records = make_records(n_tasks=1)
    train = write_jsonl(tmp_path / "train.jsonl", records)
    _first_loss(tmp_path, train, references[0], cache)
    capsys.readouterr()
    _first_loss(tmp_path, train, references[0], cache)
    assert "reference log-probs read from" in capsys.readouterr().out
    assert len(list(cache.iterdir())) == 1

    _first_loss(tmp_path, train, references[1], cache)  # another reference
    assert "computing" in capsys.readouterr().out
    assert len(list(cache.iterdir())) == 2

    records[1]["rejected"][0]["content"] += " (edited)"
    write_jsonl(train, records)  # other data
    _first_loss(tmp_path, train, references[0], cache)
    assert "computing" in capsys.readouterr().out
    assert len(list(cache.iterdir())) == 3
