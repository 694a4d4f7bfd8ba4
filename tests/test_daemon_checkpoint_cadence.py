"""The crash-safety ``last.ckpt``: every N epochs (``--checkpoint-every``), within a share of the run's time
(``--checkpoint-overhead``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from fts_daemon.crashsafe import LAST_CHECKPOINT, EpochCheckpoint, due
from fts_daemon.examples.tiny import TinyClassifier, TinyDataModule


class _Saves(pl.Callback):
    """Records the epochs whose end left a new ``last.ckpt`` (by its modification, not by our own bookkeeping)."""

    def __init__(self, path: Path):
        self.path, self.seen, self.epochs = path, None, []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a replace is a rename of a new file: the inode changes even where timestamps are coarse
        stamp = (self.path.stat().st_ino, self.path.stat().st_mtime_ns) if self.path.exists() else None
        if stamp != self.seen:
            self.epochs.append(trainer.current_epoch)
            self.seen = stamp


class _Ticks:
    """A clock that advances one second per reading: each save "costs" 1 s and each epoch end is 1 s after the last."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def _fit(tmp_path: Path, saver: EpochCheckpoint) -> list[int]:
    saves = _Saves(saver.path)  # after the saver: callbacks run in list order
    trainer = pl.Trainer(max_epochs=5, callbacks=[saver, saves], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2,
                         limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(TinyClassifier(), datamodule=TinyDataModule(num_train=64, num_val=32))
    assert saver.saved_epochs == saves.epochs  # what it reports is what reached the disk
    return saves.epochs


@pytest.mark.parametrize(("every", "expected"), [(1, [0, 1, 2, 3, 4]), (2, [1, 3]), (3, [2]), (0, [])])
def test_last_checkpoint_every_n_epochs(tmp_path: Path, every: int, expected: list[int]) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    assert _fit(tmp_path, EpochCheckpoint(ckpt_dir, every_n_epochs=every, max_overhead=0)) == expected
    if expected:
        saved = torch.load(ckpt_dir / LAST_CHECKPOINT, map_location="cpu", weights_only=False)
        assert saved["epoch"] == expected[-1]
    else:
        assert not ckpt_dir.exists() or not any(ckpt_dir.iterdir())


def test_saves_are_skipped_while_they_would_cost_more_than_the_overhead(tmp_path: Path) -> None:
    # with the ticking clock a save costs 1 s and the next epoch end comes 1 s after it: at 50% only every other
    # epoch end may save; at 100% every one
    assert _fit(tmp_path / "half", EpochCheckpoint(tmp_path / "half", max_overhead=0.5, clock=_Ticks())) == [0, 2, 4]
    assert _fit(tmp_path / "full", EpochCheckpoint(tmp_path / "full", max_overhead=1.0, clock=_Ticks())) == [0, 1, 2, 3, 4]
    # and with the real clock at 1% a checkpoint of this model (milliseconds) follows epochs of milliseconds: not all
    saved = _fit(tmp_path / "real", EpochCheckpoint(tmp_path / "real", max_overhead=0.01))
    assert saved[0] == 0 and len(saved) < 5


def test_due() -> None:
    assert due(0, 1, 0.01, None, None)  # the first candidate is always saved
    assert not due(0, 2, 0.0, None, None) and due(1, 2, 0.0, None, None)
    assert not due(4, 0, 0.0, None, None)  # 0: never
    assert not due(3, 1, 0.01, 0.5, 49.0) and due(3, 1, 0.01, 0.5, 50.0)  # a 0.5 s save needs 50 s between
    assert due(3, 1, 0.0, 100.0, 0.001)  # 0: no limit
