"""Small models and helpers for the engine tests (real Lightning modules, real Trainers)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from fts_daemon import FinetuningScheduler

# val_loss per epoch: improves for 3 epochs, then never again, so FTSEarlyStopping(patience=1) ends a phase each
# epoch from epoch 3 on. Scripted (not computed) so phase decisions cannot depend on float noise.
DEFAULT_VAL_LOSS = [1.0, 0.9, 0.8] + [0.85 + 0.01 * i for i in range(40)]


class TinyNet(pl.LightningModule):
    """Four Linear layers (8 parameters) → four phases with the two-per-phase implicit rule."""

    def __init__(
        self,
        optimizer: str = "SGD",
        optimizer_args: dict[str, Any] | None = None,
        scheduler: str | None = "StepLR",
        scheduler_args: dict[str, Any] | None = None,
        lrs_cfg: dict[str, Any] | None = None,
        no_decay: Sequence[str] | None = None,
        val_losses: Sequence[float] = DEFAULT_VAL_LOSS,
        all_params: bool = False,
        width: int = 16,
    ):
        super().__init__()
        self.layer = torch.nn.Sequential(
            torch.nn.Linear(width, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, 2),
        )
        self.optimizer_name = optimizer
        self.optimizer_args = optimizer_args or {"lr": 1e-3, "weight_decay": 1e-6}
        self.scheduler_name = scheduler
        self.scheduler_args = scheduler_args if scheduler_args is not None else {"step_size": 1, "gamma": 0.7}
        self.lrs_cfg = lrs_cfg or {}
        if no_decay:
            self.no_decay = list(no_decay)
        self.val_losses = list(val_losses)
        self.all_params = all_params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", torch.tensor(self.val_losses[min(self.current_epoch, len(self.val_losses) - 1)]))

    def configure_optimizers(self) -> Any:
        params = self.parameters() if self.all_params else [p for p in self.parameters() if p.requires_grad]
        opt = getattr(torch.optim, self.optimizer_name)(params, **self.optimizer_args)
        if self.scheduler_name is None:
            return opt
        sched = getattr(torch.optim.lr_scheduler, self.scheduler_name)(opt, **self.scheduler_args)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, **self.lrs_cfg}}


def loaders(width: int = 16, n: int = 64, batch: int = 16) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, width, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch), DataLoader(ds, batch_size=batch)


class LRRecorder(pl.Callback):
    """The LR every group uses for every optimizer step, plus phase at each epoch start."""

    def __init__(self) -> None:
        self.steps: list[list[float]] = []
        self.epochs: list[tuple[int, int, list[float]]] = []
        self.fts: FinetuningScheduler | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fts = next(c for c in trainer.callbacks if isinstance(c, FinetuningScheduler))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        depth = self.fts.curr_depth if self.fts else -1
        self.epochs.append((trainer.current_epoch, depth, [g["lr"] for g in trainer.optimizers[0].param_groups]))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.steps.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def trainer(tmp_path: Any, callbacks: list, max_epochs: int, **kwargs: Any) -> pl.Trainer:
    defaults = dict(
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


STEP_LR = {"lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.7}}}


def explicit_schedule(overrides: dict[int, dict[str, Any]] | None = None) -> dict[int, dict[str, Any]]:
    """FTS's explicit test schedule shape on TinyNet: head first, one Linear more per phase."""
    sched: dict[int, dict[str, Any]] = {
        0: {"params": ["layer.6.bias", "layer.6.weight"]},
        1: {"params": ["layer.4.*"], "new_lr_scheduler": copy.deepcopy(STEP_LR)},
        2: {
            "params": ["layer.2.*"],
            "lr": 3e-6,
            "new_lr_scheduler": {
                "lr_scheduler_init": {
                    "class_path": "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
                    "init_args": {"T_0": 1, "T_mult": 2, "eta_min": 1e-7},
                },
                "init_pg_lrs": [1e-6, 2e-6],
            },
        },
        3: {"params": ["layer.0.*"]},
    }
    for k, v in (overrides or {}).items():
        sched[int(k)] = v
    return sched
