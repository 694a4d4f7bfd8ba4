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


def last_callback_metrics(trainer: Any) -> dict[str, Any]:
    """``trainer.callback_metrics`` as Lightning last computed them, without computing them again.

    The public property recomputes every logged value on each access (the costliest part of a step's events);
    Lightning already computes them once after every training batch (after the callbacks' ``on_train_batch_end``)
    and keeps the result in this dict, so reading it at the next batch's start costs nothing.
    """
    return trainer._logger_connector._callback_metrics


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


# Hooks Lightning calls on every callback at every training step (and validation batch), each through
# ``_call_callback_hooks``.
PER_BATCH_HOOKS = (
    "on_train_batch_start", "on_before_zero_grad", "on_before_backward", "on_after_backward",
    "on_before_optimizer_step", "on_train_batch_end", "on_validation_batch_start", "on_validation_batch_end",
)
_SKIPS_NON_CALLABLE: bool | None = None


def _dispatcher_skips_non_callables() -> bool:
    """Whether the installed Lightning's ``_call_callback_hooks`` passes over hook attributes that are not callable
    (it tests ``callable(fn)`` before entering the profiler context); read from its source once."""
    global _SKIPS_NON_CALLABLE
    if _SKIPS_NON_CALLABLE is None:
        import inspect

        from pytorch_lightning.trainer import call

        try:
            _SKIPS_NON_CALLABLE = "if callable(fn):" in inspect.getsource(call._call_callback_hooks)
        except (AttributeError, OSError, TypeError):
            _SKIPS_NON_CALLABLE = False
    return _SKIPS_NON_CALLABLE


def skip_unused_batch_hooks(callback: Any) -> list[str]:
    """Let Lightning pass over the per-batch hooks ``callback``'s class does not override; returns their names.

    Lightning calls every hook of every callback, overridden or not, each inside a profiler context and an f-string
    (about 1.7 us a hook in a small VM: ~10 us per step for each callback, ~1% of a 1 ms step). Its dispatcher
    skips a hook attribute that is not callable, so shadowing the no-op hooks with ``None`` on the instance removes
    that cost. Done only when the installed Lightning is seen to skip such attributes; otherwise nothing changes.
    """
    from pytorch_lightning.callbacks import Callback

    if not _dispatcher_skips_non_callables():
        return []
    skipped = [name for name in PER_BATCH_HOOKS if getattr(type(callback), name, None) is getattr(Callback, name)]
    for name in skipped:
        setattr(callback, name, None)
    return skipped


def dump_checkpoint(trainer: Any) -> dict[str, Any]:
    """The dict ``trainer.save_checkpoint`` would write, without writing it (every rank calls this, as it does).

    Lightning offers no public way to take the checkpoint and write it elsewhere; the crash-safety checkpoint copies
    it and writes the copy on a background thread so that training does not wait for the disk.
    """
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
