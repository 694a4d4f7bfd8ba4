"""``fts-daemon start --checkpoint-every N``: the crash-safety ``last.ckpt`` is replaced every N epochs (0: never)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from fts_daemon.crashsafe import LAST_CHECKPOINT, EpochCheckpoint
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


@pytest.mark.parametrize(("every", "expected"), [(1, [0, 1, 2, 3, 4]), (2, [1, 3]), (3, [2]), (0, [])])
def test_last_checkpoint_cadence(tmp_path: Path, every: int, expected: list[int]) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    saver = EpochCheckpoint(ckpt_dir, every_n_epochs=every)
    saves = _Saves(ckpt_dir / LAST_CHECKPOINT)  # after the saver: callbacks run in list order
    trainer = pl.Trainer(max_epochs=5, callbacks=[saver, saves], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2,
                         limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(TinyClassifier(), datamodule=TinyDataModule(num_train=64, num_val=32))
    assert saves.epochs == expected
    if expected:
        saved = torch.load(ckpt_dir / LAST_CHECKPOINT, map_location="cpu", weights_only=False)
        assert saved["epoch"] == expected[-1]
    else:
        assert not ckpt_dir.exists() or not any(ckpt_dir.iterdir())
