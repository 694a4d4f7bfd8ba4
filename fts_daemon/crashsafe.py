"""Crash safety: the daemon's checkpoint cadence.

At every epoch end (after that epoch's validation, at the same point as ``stop --at-epoch-end``, so a resume from it
is exact) :class:`EpochCheckpoint` replaces ``<run_dir>/checkpoints/last.ckpt`` (not when the run is stopping: a
stopped epoch may be cut short, and the stop writes its own checkpoint). ``fts-daemon start --checkpoint-every N``
writes it every N epochs instead (0: never), for models whose checkpoint costs more than an epoch's worth of risk. The file is replaced atomically:
the checkpoint is written to a temporary file in the same directory, flushed to disk, then renamed over the old one,
so a daemon killed at any instant (SIGKILL, power loss) leaves either the previous or the new ``last.ckpt``, never a
torn one. ``fts-daemon start --resume`` takes the newest ``*.ckpt`` in the run dir, which after a crash is this file
(or a newer stop checkpoint), so at most the epoch in progress is trained again.

A checkpoint that cannot be written (disk full, quota, read-only) is reported through ``on_error`` (the daemon then
stops the run and says why) instead of crashing the training loop.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

LAST_CHECKPOINT = "last.ckpt"


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomically(trainer: pl.Trainer, path: Path) -> None:
    """``trainer.save_checkpoint(path)`` such that ``path`` is always a complete checkpoint (or absent).

    Every rank must call this (saving is a collective); only global rank 0 writes and renames.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # not *.ckpt: never taken for a checkpoint by --resume
    try:
        trainer.save_checkpoint(tmp, weights_only=False)  # a full resumable checkpoint (and no info line per save)
        if trainer.is_global_zero:
            _fsync(tmp)
            os.replace(tmp, path)
            _fsync(path.parent, directory=True)
    except BaseException:
        if trainer.is_global_zero:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


class EpochCheckpoint(Callback):
    """Writes ``dirpath/last.ckpt`` atomically at every epoch end, or every ``every_n_epochs`` (``fts-daemon start
    --checkpoint-every N``; 0: never); see the module docstring.

    ``steps_started`` counts the training steps this process began (the daemon reports a failure before the first
    one as a set-up problem of the config, in one line).
    """

    def __init__(self, dirpath: Path, on_error: Callable[[str], Any] | None = None, every_n_epochs: int = 1):
        super().__init__()
        self.dirpath = Path(dirpath)
        self.on_error = on_error
        self.every_n_epochs = max(0, int(every_n_epochs))  # 0: never
        self.failed = False
        self.path = self.dirpath / LAST_CHECKPOINT
        self.steps_started = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.steps_started += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a stopping run (``stop``, a signal, max_time, early stopping of the last phase) may have cut this epoch
        # short: a checkpoint of it would resume as if the epoch had been completed. The stop writes its own.
        if self.failed or trainer.should_stop or not self.every_n_epochs:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        try:
            save_atomically(trainer, self.path)
        except OSError as err:
            self.failed = True
            message = f"cannot write checkpoint {self.path}: {err.strerror or err}"
            if self.on_error is None:
                raise OSError(err.errno, message) from None
            self.on_error(message)
