"""Every private Lightning or torch API fts touches, in one place.

These are the calls that may break on a Lightning/torch upgrade; nothing else in the package reaches past public
APIs. Each function says why the private call is needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau


def scheduler_initial_step(scheduler: Any) -> None:
    """Re-run a scheduler's construction-time step after its groups were rebuilt (phase-0 enforcement).

    torch has no public way to "re-initialize in place"; FTS calls ``_initial_step`` and parity needs the same
    arithmetic (some schedulers compute their first value differently in initial mode).
    """
    if isinstance(scheduler, ReduceLROnPlateau):
        return
    scheduler._initial_step()


def set_scheduler_last_lr(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Keep ``get_last_lr()`` truthful after groups were rebuilt underneath a scheduler."""
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def reorder_callbacks(trainer: Any, callbacks: list[Any]) -> list[Any]:
    """Lightning's own ordering (checkpoint callbacks last) after we insert or move callbacks."""
    return trainer._callback_connector._reorder_callbacks(callbacks)


def restore_best_checkpoint(trainer: Any, path: str) -> dict[str, Any]:
    """Load weights and return the raw checkpoint, without touching loops or schedulers.

    Lightning has no public "load weights from this checkpoint mid-fit"; the strategy's load/restore methods are
    public but the loaded-checkpoint plumbing (precision plugin, datamodule) goes through the connector.
    """
    checkpoint = trainer.strategy.load_checkpoint(path)
    trainer.strategy.load_model_state_dict(checkpoint, strict=True)
    return checkpoint


def batches_that_stepped(trainer: Any) -> int:
    """The step LearningRateMonitor logs against (``global_step`` counts optimizer steps, not the same thing)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def set_max_epochs(trainer: Any, max_epochs: int) -> None:
    """FTS raises ``max_epochs`` when the final phase's ``max_transition_epoch`` is larger (public attribute)."""
    trainer.fit_loop.max_epochs = max_epochs


def configure_optimizers_without_trainer(module: Any) -> tuple[list[Any], list[Any]]:
    """Run ``configure_optimizers`` and parse its output into (optimizers, LRSchedulerConfigs) with no Trainer.

    Used by ``fts-daemon plan``/``validate`` on a freshly built module. Lightning's parser is private; its helpers
    for the no-trainer case are the only ones that accept every return shape configure_optimizers allows.
    """
    from pytorch_lightning.core.optimizer import _configure_optimizers, _configure_schedulers_automatic_opt

    optimizers, schedulers, monitor = _configure_optimizers(module.configure_optimizers())
    return optimizers, _configure_schedulers_automatic_opt(schedulers, monitor)


def rewrap_ddp(trainer: Any) -> bool:
    """Re-wrap the module in DistributedDataParallel so parameters thawed since the last wrap are all-reduced.

    DDP registers only the parameters that require grad when it is constructed; Lightning wraps once, before the
    first phase, so every later phase's gradients would stay rank-local and the replicas would drift apart.
    ``configure_ddp`` is DDPStrategy's own (public) wrapping step; unwrapping first is what it expects.
    """
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    model = getattr(strategy, "model", None)
    if not isinstance(model, DistributedDataParallel) or not hasattr(strategy, "configure_ddp"):
        return False
    strategy.model = model.module
    strategy.configure_ddp()
    return True
