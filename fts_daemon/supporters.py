"""FTSEarlyStopping and FTSCheckpoint: Lightning's callbacks, made phase-aware.

* FTSEarlyStopping: in a non-final phase, running out of patience ends the *phase*, not the fit.
* FTSCheckpoint: remembers which phase the best checkpoint was saved in (``restore_best`` replays from there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor

from fts_daemon import compat

if TYPE_CHECKING:
    from fts_daemon.callback import FinetuningScheduler


def find_fts(trainer: pl.Trainer, owner: str) -> FinetuningScheduler:
    from fts_daemon.callback import FinetuningScheduler

    found = [c for c in trainer.callbacks if isinstance(c, FinetuningScheduler)]  # type: ignore[attr-defined]
    if not found:
        raise MisconfigurationException(f"{owner} is meant to be used with a FinetuningScheduler callback; none found")
    return found[0]


class FTSEarlyStopping(EarlyStopping):
    """EarlyStopping whose patience ends the current phase (the fit ends only in the final phase).

    Takes every argument of Lightning's ``EarlyStopping``; ``check_on_train_epoch_end`` defaults to ``False`` so the
    check runs after validation. As in FTS, ``best_score`` carries over between phases.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        compat.skip_unused_batch_hooks(self)
        self.es_phase_complete = False
        self.final_phase = True
        self.fts: FinetuningScheduler | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.fts = find_fts(trainer, type(self).__name__)
        if self._check_on_train_epoch_end is None:
            self._check_on_train_epoch_end = False
        super().setup(trainer, pl_module, stage)

    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        if should_stop and not self.final_phase and self.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
            # out of patience in a non-final phase: finish the phase instead of the fit
            self.stopping_reason = EarlyStoppingReason.NOT_STOPPED
            self.es_phase_complete = True
            self.wait_count = 0
            return False, None
        return should_stop, reason

    def reset_phase(self) -> None:
        self.es_phase_complete = False
        self.wait_count = 0

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        # FTS does not save this, so a run resumed right after patience ran out never transitions; we do
        state["es_phase_complete"] = self.es_phase_complete
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.es_phase_complete = bool(state_dict.get("es_phase_complete", False))


class FTSCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that records the phase of its best checkpoint. ``save_on_train_epoch_end`` defaults to False."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        compat.skip_unused_batch_hooks(self)
        self.current_ckpt_depth = 0
        self.best_ckpt_depth = 0
        self.fts: FinetuningScheduler | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.fts = find_fts(trainer, type(self).__name__)
        if self.fts.restore_best:
            if not self.save_top_k:
                raise MisconfigurationException(
                    "restore_best=True needs FTSCheckpoint to keep checkpoints, but save_top_k is 0; "
                    "set save_top_k >= 1 or restore_best=False"
                )
            if not self.monitor:
                raise MisconfigurationException(
                    "restore_best=True needs FTSCheckpoint(monitor=...) to know which checkpoint is best; "
                    "set a monitor or restore_best=False"
                )
        if self._save_on_train_epoch_end is None:
            self._save_on_train_epoch_end = False
        super().setup(trainer, pl_module, stage)

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        previous_best = self.best_model_path
        self.current_ckpt_depth = self.fts.curr_depth if self.fts else 0
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        if self.best_model_path != previous_best:
            self.best_ckpt_depth = self.current_ckpt_depth

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["current_ckpt_depth"] = self.fts.curr_depth if self.fts else self.current_ckpt_depth
        state["best_ckpt_depth"] = self.best_ckpt_depth
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.current_ckpt_depth = int(state_dict.get("current_ckpt_depth", 0))
        self.best_ckpt_depth = int(state_dict.get("best_ckpt_depth", self.current_ckpt_depth))
