"""Test-only Lightning pieces that the reliability tests put into daemon configs (``class_path: tests.reliability_probe.*``).

:class:`Probe` tells the test process where the daemon is, without any event-bus latency: it appends one line per
section it enters or leaves (``step``, ``val``, ``transition``) to a file, flushed at once, and can stretch
validation batches and phase transitions with a sleep so that a signal sent after the "enter" line lands inside
that section. (Training steps are stretched by ``TinyClassifier(step_delay=...)``, which sleeps inside
``training_step``.) Sleeping changes no number the run computes. :class:`Chatter` makes a run publish many events.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from tests.engine_models import loaders


class Probe(Callback):
    """Appends ``<what> <index> <pid> <unix time>`` lines to ``log_path``; sleeps in validation and transitions."""

    def __init__(self, log_path: str, val_delay: float = 0.0, transition_delay: float = 0.0):
        super().__init__()
        self.log_path = log_path
        self.val_delay = float(val_delay)
        self.transition_delay = float(transition_delay)
        self._hooked: Any = None

    def mark(self, what: str, index: int) -> None:
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(f"{what} {index} {os.getpid()} {time.time():.6f}\n")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from fts_daemon.tap import find_fts

        fts = find_fts(trainer)
        if stage == "fit" and fts is not None and fts is not self._hooked:
            self._hooked = fts
            fts.before_transition.append(self._transition)

    def _transition(self, fts: Any, next_depth: int) -> None:
        self.mark("transition", next_depth)
        time.sleep(self.transition_delay)
        self.mark("transition_end", next_depth)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.mark("step", trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.mark("step_end", trainer.global_step - 1)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking:
            return
        self.mark("val", trainer.current_epoch)
        time.sleep(self.val_delay)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self.mark("val_end", trainer.current_epoch)


class Chatter(Callback):
    """Logs ``per_step`` info lines to the ``fts_daemon`` logger after every step: the daemon publishes each as a
    ``log`` event, so a run produces events at a known rate whatever its LR groups."""

    def __init__(self, per_step: int = 20):
        super().__init__()
        self.per_step = int(per_step)
        self.chatter = logging.getLogger("fts_daemon.chatter")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for i in range(self.per_step):
            self.chatter.info("chatter %d at step %d", i, trainer.global_step)


class TinyNetData(pl.LightningDataModule):
    """``tests.engine_models.loaders()`` as a DataModule, so LightningCLI configs can train ``engine_models.TinyNet``
    (the model the schedule corpus in ``test_validation_corpus.py`` is written against)."""

    def train_dataloader(self) -> Any:
        return loaders()[0]

    def val_dataloader(self) -> Any:
        return loaders()[1]
