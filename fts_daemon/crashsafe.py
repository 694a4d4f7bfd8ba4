"""Crash safety: the daemon's checkpoint cadence.

At an epoch end (after that epoch's validation, at the same point as ``stop --at-epoch-end``, so a resume from it
is exact) :class:`EpochCheckpoint` replaces ``<run_dir>/checkpoints/last.ckpt`` (not when the run is stopping: a
stopped epoch may be cut short, and the stop writes its own checkpoint). Two knobs bound what it costs:

- ``fts-daemon start --checkpoint-every N``: only every N-th epoch end is a candidate (default 1; 0: never);
- ``--checkpoint-overhead F``: a candidate is skipped while the previous save's duration is more than F (default
  0.01) of the time since it finished, so crash safety takes at most ~1% of the run's time whatever the ratio of
  epoch length to checkpoint size (short epochs of a big model would otherwise spend more time saving than
  training). 0 saves at every candidate. The first candidate is always saved.

The file is replaced atomically: the checkpoint is written to a temporary file in the same directory, flushed to
disk, then renamed over the old one, so a daemon killed at any instant (SIGKILL, power loss) leaves either the
previous or the new ``last.ckpt``, never a torn one. ``fts-daemon start --resume`` takes the newest ``*.ckpt`` in the
run dir, which after a crash is this file (or a newer stop checkpoint); what was trained since is trained again,
identically.

A checkpoint that cannot be written (disk full, quota, read-only) is reported through ``on_error`` (the daemon then
stops the run and says why) instead of crashing the training loop.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from fts_daemon.compat import skip_unused_batch_hooks

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


def due(epoch: int, every_n_epochs: int, max_overhead: float, last_cost: float | None,
        since_last: float | None) -> bool:
    """Whether the end of ``epoch`` (0-based) gets a crash-safety checkpoint (see the module docstring).

    ``last_cost``: seconds the previous save took, ``since_last``: seconds since it finished (None: no save yet).
    """
    if every_n_epochs <= 0 or (epoch + 1) % every_n_epochs:
        return False
    if max_overhead <= 0 or last_cost is None or since_last is None:
        return True
    return last_cost <= since_last * max_overhead


class EpochCheckpoint(Callback):
    """Writes ``dirpath/last.ckpt`` atomically at epoch ends, every ``every_n_epochs`` and within ``max_overhead``
    of the run's time (``fts-daemon start --checkpoint-every N --checkpoint-overhead F``); see the module docstring.

    ``saved_epochs`` lists the epochs whose end was saved.
    """

    def __init__(self, dirpath: Path, on_error: Callable[[str], Any] | None = None, every_n_epochs: int = 1,
                 max_overhead: float = 0.01, clock: Callable[[], float] = time.perf_counter):
        super().__init__()
        self.dirpath = Path(dirpath)
        self.on_error = on_error
        self.every_n_epochs = max(0, int(every_n_epochs))  # 0: never
        self.max_overhead = max(0.0, float(max_overhead))  # 0: no limit
        self.clock = clock
        self.failed = False
        self.path = self.dirpath / LAST_CHECKPOINT
        self.saved_epochs: list[int] = []
        self._last_cost: float | None = None
        self._last_end: float | None = None
        skip_unused_batch_hooks(self)  # it acts at epoch ends only: Lightning need not call it at every step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a stopping run (``stop``, a signal, max_time, early stopping of the last phase) may have cut this epoch
        # short: a checkpoint of it would resume as if the epoch had been completed. The stop writes its own.
        if trainer.should_stop:
            return
        now = self.clock()
        since = None if self._last_end is None else now - self._last_end
        # (a failed write is seen by rank 0 only: it goes into the decision every rank takes)
        save = not self.failed and due(trainer.current_epoch, self.every_n_epochs, self.max_overhead,
                                       self._last_cost, since)
        if trainer.world_size > 1:
            # saving is a collective: every rank must take rank 0's (timing-based) decision
            save = bool(trainer.strategy.broadcast(save, src=0))
        if not save:
            return
        try:
            save_atomically(trainer, self.path)
            end = self.clock()
            self._last_cost, self._last_end = end - now, end
            self.saved_epochs.append(trainer.current_epoch)
        except OSError as err:
            self.failed = True
            message = f"cannot write checkpoint {self.path}: {err.strerror or err}"
            if self.on_error is None:
                raise OSError(err.errno, message) from None
            self.on_error(message)
