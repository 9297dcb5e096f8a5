"""The LightningModule: a trainable policy, a frozen reference, and HPL's three-level DPO plus behaviour cloning.

One forward pass of the policy over a batch scores every sequence (pairs' chosen and rejected continuations and
expert trajectories); the reference runs under ``no_grad`` on the pair sequences only. Log-probs are summed over the
agent's tokens (``batch['scored']``), so observations and instructions never receive gradient.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.strategies import FSDPStrategy
import torch
from torchmetrics import Metric

from hpl_lightning import logprobs, refcache
from hpl_lightning.data import LEVEL_CODES, STEP_COUNTS, close_restored_epoch
from hpl_lightning.distributed import fully_shard_model
from hpl_lightning.errors import UsageError
from hpl_lightning.losses import LEVEL_KEYS, LossType, objective_share, preference_loss
from hpl_lightning.models import LoraSettings, Quantization, apply_lora, load_causal_lm
from hpl_lightning.packing import packed_sequence_logps, tree_attention_mask, tree_block_mask
from hpl_lightning.schedules import Schedule, warmup_then

log = logging.getLogger(__name__)
PAIR_STATS = ("loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy")
ROWS = (*LEVEL_KEYS.values(), "bc")  # the objective's terms; behaviour cloning has the loss column only


@dataclass(frozen=True)
class LossWeights:
    """``L = bc * L_BC + traj * L_traj + step * L_step + group * L_group`` (the paper uses 1 for all)."""

    bc: float = 1.0
    traj: float = 1.0
    step: float = 1.0
    group: float = 1.0


@dataclass(frozen=True)
class Optimization:
    """AdamW with warmup then decay; the paper's HPL stage: lr 1e-6 (3e-6 ALFWorld), cosine, warmup 0.1."""

    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Schedule = "cosine"
    warmup_ratio: float = 0.1


class HPLModule(L.LightningModule):
    """Hierarchical preference learning (and plain SFT: give it expert trajectories only).

    ``policy``/``reference``: a Hugging Face name, a local checkpoint, or ``hpl-tiny`` (the bundled tiny config).
    With ``reference=None`` the reference is the policy's starting point: the LoRA base with adapters disabled (no
    second copy), or a frozen copy for full fine-tuning. ``L_BC`` is the NLL of the expert trajectories in the data
    (the paper's Eq. 1), averaged over their agent tokens in the optimizer step; ``bc_on_chosen`` (off by default)
    adds the chosen continuations of the pairs to it (IPR's choice).
    ``packing``: batches arrive as shared-prefix tree rows (``data.packing``, linked by the CLI) and one forward
    scores every sequence of the batch; per-pair rows (the reference implementation) otherwise.
    ``reference_cache``: a directory of reference log-probs computed once per (data, reference) before training (see
    :mod:`hpl_lightning.refcache`); training then never loads the reference model.
    """

    def __init__(
        self,
        policy: str = "hpl-tiny",
        reference: str | None = None,
        beta: float = 0.3,
        loss_type: LossType = "sigmoid",
        label_smoothing: float = 0.0,
        weights: LossWeights = LossWeights(),
        bc_on_chosen: bool = False,
        optim: Optimization = Optimization(),
        lora: LoraSettings | None = None,
        quantization: Quantization = "none",
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
        init_seed: int = 0,
        packing: bool = False,
        reference_cache: str | None = None,
    ):
        super().__init__()
        if quantization != "none" and lora is None:
            raise UsageError("quantized (QLoRA) training needs model.lora: 4/8-bit base weights cannot be trained")
        self.save_hyperparameters()
        # Dataclass settings are kept as objects: under LightningCLI ``hparams`` holds their raw config (dicts).
        self.weights, self.optim, self.lora = weights, optim, lora
        # Checkpoints hold the trainable policy state only (no reference, no frozen LoRA base).
        self.strict_loading = False
        self.register_state_dict_post_hook(_drop_frozen_state)
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        # what is logged: sums over the current optimizer step (train) or the whole split (val, test), all ranks
        self.train_sums, self.val_sums, self.test_sums = LevelSums(), LevelSums(), LevelSums()

    # -- models --------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Builds policy and reference once (Lightning may call it again, e.g. under FSDP)."""
        if self.policy is not None:
            return
        hp = self.hparams
        policy = load_causal_lm(hp.policy, hp.dtype, hp.quantization, hp.init_seed, hp.attn_implementation)
        if hp.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            policy.config.use_cache = False
        reference = None
        if hp.reference_cache is not None:
            self._attach_reference_cache(policy)  # before LoRA: the bare policy is the reference when none is named
        elif hp.reference is not None:
            reference = load_causal_lm(hp.reference, hp.dtype, hp.quantization, hp.init_seed, hp.attn_implementation)
        elif self.lora is None:
            reference = copy.deepcopy(policy)
        if self.lora is not None:
            policy = apply_lora(policy, self.lora, hp.quantization != "none", hp.gradient_checkpointing)
        policy.train()  # from_pretrained returns eval mode, and Lightning keeps module modes as they are
        if reference is not None:
            reference.requires_grad_(False)
            reference.eval()
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2-shard both models over the data-parallel mesh
            for model in (policy, reference):
                if model is not None:
                    fully_shard_model(model, self.device_mesh["data_parallel"])
        self.policy, self.reference = policy, reference

    def _attach_reference_cache(self, policy: torch.nn.Module) -> None:
        """Gives the data module's examples their cached reference log-probs, computing any missing cache file
        first with a reference loaded for that pass only (or the not-yet-trained policy when none is named)."""
        hp = self.hparams
        datamodule = getattr(self._trainer, "datamodule", None)
        if not hasattr(datamodule, "examples"):
            raise ValueError("model.reference_cache needs the HPLDataModule (set up before configure_model)")
        settings = {k: hp[k] for k in ("dtype", "quantization", "init_seed", "attn_implementation")}
        if hp.reference is not None:
            reference_fp = refcache.spec_fingerprint(hp.reference, settings)
        else:
            reference_fp = "initial-policy-" + refcache.weights_fingerprint(policy)
        reference = None
        for split, examples in datamodule.examples.items():
            path = refcache.cache_path(hp.reference_cache, refcache.data_fingerprint(examples), reference_fp)
            if path.exists():
                print(f"[hpl] {split}: reference log-probs read from {path}")
                values = torch.load(path)
            else:
                print(f"[hpl] {split}: no reference log-probs for this data and reference yet; computing {path}")
                if reference is None:
                    reference = policy if hp.reference is None else load_causal_lm(
                        hp.reference, hp.dtype, hp.quantization, hp.init_seed, hp.attn_implementation
                    )
                values = self._compute_reference_logps(reference, examples, datamodule)
                refcache.save(path, values)
            datamodule.examples[split] = refcache.attach(examples, values)

    def _compute_reference_logps(self, model: torch.nn.Module, examples: list, datamodule) -> torch.Tensor:
        """``[n, 2]`` float64 (chosen, rejected) reference log-probs of every pair (NaN for trajectories), in
        batches collated as training collates them (packed when packing is on)."""
        device = self._trainer.strategy.root_device
        collate = datamodule.make_collate()
        values = torch.full((len(examples), 2), float("nan"), dtype=torch.float64)
        pairs = [i for i, ex in enumerate(examples) if ex.rejected is not None]
        was_training, original_device = model.training, next(model.parameters()).device
        model.eval().to(device)
        with torch.no_grad():
            for start in range(0, len(pairs), datamodule.hparams.batch_size):
                index = pairs[start : start + datamodule.hparams.batch_size]
                batch = move_data_to_device(collate([(examples[i], False) for i in index]), device)
                logps = self.sequence_logps(model, batch, slice(0, 2 * len(index)), torch.float64)[0].cpu()
                values[index] = torch.stack([logps[: len(index)], logps[len(index) :]], 1)
        model.train(was_training).to(original_device)
        return values

    @property
    def _sharded(self) -> bool:
        return self.device_mesh is not None or isinstance(getattr(self._trainer, "strategy", None), FSDPStrategy)

    def train(self, mode: bool = True) -> "HPLModule":
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # dropout off in the reference, always
        return self

    # -- log-probs -----------------------------------------------------------------------------------------------
    @staticmethod
    def sequence_logps(
        model: torch.nn.Module, batch: dict[str, Any], rows: slice = slice(None), sum_dtype=torch.float32
    ):
        """Summed log-prob of the scored tokens per sequence, the number of scored tokens, and the token log-probs.

        The LM head runs on scored positions only (:mod:`hpl_lightning.logprobs`). Token log-probs: one per scored
        token (per-pair), one per unique scored token (packed: the tree rows are run whole and ``rows`` selects
        sequences afterwards). Training sums in float64 (``sum_dtype``): DPO takes differences of differences of
        sums of hundreds of token log-probs.
        """
        if "tree_end" in batch:
            logps, n_tokens, token_logps = _packed_logps(model, batch, sum_dtype)
            return logps[rows], n_tokens[rows], token_logps
        input_ids, attention_mask = batch["input_ids"][rows], batch["attention_mask"][rows]
        hidden = logprobs.final_hidden_states(model, input_ids=input_ids, attention_mask=attention_mask)
        mask = batch["scored"][rows, 1:]  # token t is scored from the hidden state at t - 1
        token_logps = logprobs.token_logps(model, hidden[:, :-1][mask], input_ids[:, 1:][mask])
        per_token = torch.zeros(mask.shape, dtype=sum_dtype, device=mask.device)
        return per_token.masked_scatter(mask, token_logps.to(sum_dtype)).sum(-1), mask.sum(-1), token_logps

    def reference_logps(self, batch: dict[str, Any], rows: slice) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                return self.sequence_logps(self.reference, batch, rows, torch.float64)[0]
            with self.policy.disable_adapter():
                return self.sequence_logps(self.policy, batch, rows, torch.float64)[0]

    # -- steps ---------------------------------------------------------------------------------------------------
    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor | None:
        """Training: this batch's share of the objective (:func:`~hpl_lightning.losses.objective_share`);
        validation/test: the batch's own objective (level means over the batch), None for a batch of fillers.

        Each level is a mean over its pairs in the whole optimizer step and ``L_BC`` a mean over the step's
        behaviour-cloning tokens, from the step's counts the data module puts in every batch (``step_counts``); the
        share is scaled by accumulation and world size, which Lightning and DDP divide by. Every stage adds the
        batch's sums to :class:`LevelSums`: logged per optimizer step (train) or, over the whole split, at its end
        (validation/test: ``val/loss`` is the objective over the split, what the best checkpoint is chosen by).
        """
        hp = self.hparams
        if ("tree_end" in batch) != hp.packing:
            raise ValueError(
                f"model.packing={hp.packing} but the batch is {'packed' if 'tree_end' in batch else 'per-pair'}: "
                "set data.packing to the same value"
            )
        train = stage == "train"
        if train and "step_counts" not in batch:
            raise ValueError("training batches need step_counts (the HPLDataModule's train loader provides them)")
        n = batch["n_pairs"]
        logps, n_tokens, _ = self.sequence_logps(self.policy, batch, sum_dtype=torch.float64)
        sums: dict[str, torch.Tensor] = {}
        denominators: dict[str, torch.Tensor | float] = {}
        # every row on every batch, absent levels as zeros: the ranks' sums meet in one reduction whatever they hold
        table = torch.zeros(len(ROWS), len(PAIR_STATS), dtype=torch.float64, device=logps.device)
        counts = torch.zeros(len(ROWS), dtype=torch.float64, device=logps.device)
        if not n and self._sharded and hp.reference_cache is None:
            # Sharded models gather their weights collectively: every rank must run the same forwards, so a rank
            # whose batch has no pair still runs the reference (on one row, result unused).
            self.reference_logps(batch, slice(0, 1))
        if n:
            if hp.reference_cache is None:
                ref = self.reference_logps(batch, slice(0, 2 * n))
            elif "ref_logps" in batch:
                ref = batch["ref_logps"]
            else:
                raise ValueError("model.reference_cache is set but the batch has no ref_logps (cache not attached)")
            out = preference_loss(
                logps[:n], logps[n : 2 * n], ref[:n], ref[n:], hp.beta, hp.loss_type, hp.label_smoothing,
                n_tokens[:n], n_tokens[n : 2 * n],
            )
            stats = torch.stack([out.losses.detach(), out.chosen_rewards, out.rejected_rewards, out.margins,
                                 out.accuracies], 1).to(torch.float64)  # columns: PAIR_STATS
            for level, key in LEVEL_KEYS.items():
                mask = (batch["pair_level"] == LEVEL_CODES[level]) & (batch["pair_weight"] > 0)
                row = ROWS.index(key)
                table[row], counts[row] = stats[mask].sum(0), mask.sum()
                if mask.any():  # a level absent from the batch adds nothing to the objective
                    sums[key] = out.losses[mask].sum()
                    denominators[key] = mask.sum()
        pair_weight = batch["pair_weight"]
        bc_rows = torch.cat([pair_weight * hp.bc_on_chosen, torch.zeros_like(pair_weight), batch["bc_weight"]])
        if bc_rows.any():  # summed NLL of the rows' agent tokens, over a number of tokens
            sums["bc"] = -(logps * bc_rows).sum()
            denominators["bc"] = (n_tokens * bc_rows).sum()
            table[ROWS.index("bc"), 0], counts[ROWS.index("bc")] = sums["bc"].detach(), denominators["bc"]
        self._level_sums(stage).update(table, counts)
        if not train:  # validation/test log their means over the whole split at its end; this is the batch's own
            return objective_share(sums, denominators, asdict(self.weights)) if sums else None  # objective
        counts = dict(zip(STEP_COUNTS, batch["step_counts"]))
        denominators = {key: counts[level] for level, key in LEVEL_KEYS.items()}
        denominators["bc"] = counts["bc_tokens"] + hp.bc_on_chosen * counts["chosen_tokens"]
        if sums:
            loss = objective_share(sums, denominators, asdict(self.weights))
        else:  # a batch of fillers only (evens out DDP ranks): a zero that still reaches every parameter
            loss = 0.0 * logps.sum()
        if batch["step_end"]:
            self._log_means("train")
            self.log("curriculum/phase", float(batch.get("phase", 0)), on_step=True, on_epoch=False, batch_size=1)
        # Lightning divides each micro-batch's loss by accumulate_grad_batches and DDP/FSDP average gradients over
        # ranks: undo both, so the step's gradient is that of the sum of the shares, i.e. of L.
        return loss * self.trainer.accumulate_grad_batches * self.trainer.world_size

    def _log_means(self, stage: str) -> None:
        """Logs ``stage``'s sums so far (an optimizer step, a whole split), summed over ranks by torchmetrics, as
        means, then starts them afresh: per level its statistics (and pair count in training), and ``loss``, the
        objective. Train logs per step; validation/test per epoch."""
        sums, counts = self._level_sums(stage).compute()
        self._level_sums(stage).reset()
        values = level_means(sums, counts, asdict(self.weights))
        train = stage == "train"
        if train:
            values |= {f"{key}/pairs": counts[ROWS.index(key)] for key in LEVEL_KEYS.values()}
        for name, value in values.items():
            # Epoch values are already equal on every rank, with the same keys in the same order: the sync (a mean of
            # equal values) only tells Lightning so.
            self.log(f"{stage}/{name}", value.float(), batch_size=1, on_step=train, on_epoch=not train,
                     sync_dist=not train, prog_bar=train and name == "loss")

    def _level_sums(self, stage: str) -> "LevelSums":
        return getattr(self, f"{stage}_sums")

    def on_validation_epoch_end(self) -> None:
        self._log_means("val")

    def on_test_epoch_end(self) -> None:
        self._log_means("test")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def on_train_start(self) -> None:
        close_restored_epoch(self.trainer)
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.logger is not None and hasattr(datamodule, "bucket_counts"):
            counts = {f"curriculum/count_{name}": float(n) for name, n in datamodule.bucket_counts().items()}
            self.logger.log_metrics(counts, step=self.global_step)

    # -- optimisation --------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.optim
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas)
        total = self._total_steps()
        scheduler = warmup_then(optimizer, optim.scheduler, int(optim.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        """Optimizer steps of the whole run, from the curriculum plan.

        ``trainer.estimated_stepping_batches`` is avoided on purpose: in Lightning 2.6 calling it with ``max_epochs``
        silently prevents the train loader's position from being restored on resume (Lightning issue #20550).
        """
        trainer = self.trainer
        if trainer.max_steps > 0:
            return trainer.max_steps
        datamodule = trainer.datamodule
        accumulate = trainer.accumulate_grad_batches
        return sum(-(-datamodule.batches_per_epoch(e) // accumulate) for e in range(trainer.max_epochs))

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if state is not None and self.policy is not None:
            missing = [k for k in self.state_dict() if k not in state]
            if missing:
                raise KeyError(f"checkpoint lacks {len(missing)} policy weights, e.g. {missing[:3]}")


def _drop_frozen_state(module: "HPLModule", state_dict: dict, prefix: str, metadata: Any) -> None:
    """Checkpoints hold the policy's trainable state only: no reference, and with LoRA only the adapter (the frozen
    parts are rebuilt from ``policy``/``reference``). A state-dict hook rather than a checkpoint filter, so sharded
    (distributed) checkpoints plan their load from the same keys they saved."""
    trainable = None
    if module.lora is not None and module.policy is not None:
        trainable = {f"{prefix}policy.{n}" for n, p in module.policy.named_parameters() if p.requires_grad}
    for key in list(state_dict):
        if not key.startswith(f"{prefix}policy.") or (trainable is not None and key not in trainable):
            del state_dict[key]


class LevelSums(Metric):
    """Sums of the logged statistics per row of :data:`ROWS` (columns :data:`PAIR_STATS`; behaviour cloning's NLL in
    the loss column) and the number of terms behind each row (pairs; behaviour-cloning tokens).

    torchmetrics sums both over ranks when they are computed. Every rank updates every row on every batch (zeros for
    what its batch lacks), so every rank takes part in the same reduction whatever its shard holds.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("sums", torch.zeros(len(ROWS), len(PAIR_STATS), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(len(ROWS), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        self.sums += sums
        self.counts += counts

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sums.clone(), self.counts.clone()


def level_means(sums: torch.Tensor, counts: torch.Tensor, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """``{"traj/loss": ..., "bc/loss": ..., "loss": ...}`` from :class:`LevelSums`: each statistic's mean over its
    level's terms, and ``loss`` the objective ``sum_k w_k * mean_k`` over the levels present
    (:func:`~hpl_lightning.losses.objective_share` of the whole sums). A level with no term has no mean: left out."""
    present = [key for row, key in enumerate(ROWS) if counts[row] > 0]
    values = {}
    for key in present:
        row = ROWS.index(key)
        for stat, value in zip(PAIR_STATS if key != "bc" else ("loss",), sums[row] / counts[row]):
            values[f"{key}/{stat}"] = value
    if present:
        values["loss"] = objective_share(
            {key: sums[ROWS.index(key), 0] for key in present}, {key: counts[ROWS.index(key)] for key in present},
            weights,
        )
    return values


def _packed_logps(model: torch.nn.Module, batch: dict[str, Any], sum_dtype: torch.dtype):
    """One forward over tree rows with a tree mask and depth position ids; the LM head only at parents of scored
    tokens. SDPA takes a boolean 4D mask, eager an additive one, FlexAttention a BlockMask."""
    attn = model.config._attn_implementation
    if attn == "flex_attention":
        mask = tree_block_mask(batch["tree_end"])
    elif attn == "sdpa":
        mask = tree_attention_mask(batch["tree_end"])
    elif attn == "eager":
        mask = tree_attention_mask(batch["tree_end"], model.dtype)
    else:
        raise ValueError(f"packing needs an attention with arbitrary masks (sdpa, eager, flex_attention), not {attn}")
    hidden = logprobs.final_hidden_states(
        model, input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]
    )
    hidden = hidden.reshape(-1, hidden.shape[-1])[batch["target_parent"]]
    token_logps = logprobs.token_logps(model, hidden, batch["target_label"])
    return packed_sequence_logps(token_logps, batch, batch["n_seqs"], sum_dtype)
