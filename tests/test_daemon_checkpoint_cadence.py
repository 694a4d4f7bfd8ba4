"""The crash-safety ``last.ckpt``: every N epochs (``--checkpoint-every``), within a share of the run's time
(``--checkpoint-overhead``), written in the background from a copy taken at the epoch end.

The cadence tests write in the foreground (``background=False``), where each save is on disk when the epoch end
returns and the test can see it there; the background writer has its own tests below."""

from __future__ import annotations

import copy
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO

from fts_daemon.compat import dump_checkpoint
from fts_daemon.crashsafe import LAST_CHECKPOINT, EpochCheckpoint, due, write_atomically
from fts_daemon.examples.tiny import TinyClassifier, TinyDataModule
from fts_daemon.runner import newest_checkpoint
from fts_daemon.tap import DaemonTap


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
    assert _fit(tmp_path, EpochCheckpoint(ckpt_dir, every_n_epochs=every, max_overhead=0, background=False)) == expected
    if expected:
        saved = torch.load(ckpt_dir / LAST_CHECKPOINT, map_location="cpu", weights_only=False)
        assert saved["epoch"] == expected[-1]
    else:
        assert not ckpt_dir.exists() or not any(ckpt_dir.iterdir())


def test_saves_are_skipped_while_they_would_cost_more_than_the_overhead(tmp_path: Path) -> None:
    # with the ticking clock a save costs 1 s and the next epoch end comes 1 s after it: at 50% only every other
    # epoch end may save; at 100% every one
    half = EpochCheckpoint(tmp_path / "half", max_overhead=0.5, clock=_Ticks(), background=False)
    assert _fit(tmp_path / "half", half) == [0, 2, 4]
    full = EpochCheckpoint(tmp_path / "full", max_overhead=1.0, clock=_Ticks(), background=False)
    assert _fit(tmp_path / "full", full) == [0, 1, 2, 3, 4]
    # and with the real clock at 1% a checkpoint of this model (milliseconds) follows epochs of milliseconds: not all
    saved = _fit(tmp_path / "real", EpochCheckpoint(tmp_path / "real", max_overhead=0.01, background=False))
    assert saved[0] == 0 and len(saved) < 5


def test_due() -> None:
    assert due(0, 1, 0.01, None, None)  # the first candidate is always saved
    assert not due(0, 2, 0.0, None, None) and due(1, 2, 0.0, None, None)
    assert not due(4, 0, 0.0, None, None)  # 0: never
    assert not due(3, 1, 0.01, 0.5, 49.0) and due(3, 1, 0.01, 0.5, 50.0)  # a 0.5 s save needs 50 s between
    assert due(3, 1, 0.0, 100.0, 0.001)  # 0: no limit


class _StateAtEpochEnd(pl.Callback):
    """Copies of the weights and optimizer state at each epoch end (after the saver took its copy)."""

    def __init__(self) -> None:
        self.states: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.states[trainer.current_epoch] = (weights, optimizer)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


class _RecordingIO(TorchCheckpointIO):
    """Reads back every checkpoint it wrote; off the main thread it first waits 50 ms (a slow disk), so training
    runs on while the background write is in progress."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[dict[str, Any]] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.05)
        super().save_checkpoint(checkpoint, path, storage_options)
        self.written.append(torch.load(path, map_location="cpu", weights_only=False))


def test_background_writes_are_the_state_at_their_epoch_ends(tmp_path: Path) -> None:
    """Training goes on while each copy is written: what reaches the disk is still the state at that epoch end."""
    io, saver, states = _RecordingIO(), EpochCheckpoint(tmp_path / "ck", max_overhead=0), _StateAtEpochEnd()
    trainer = pl.Trainer(max_epochs=6, callbacks=[saver, states], plugins=[io], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_train_batches=3, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(TinyClassifier(step_delay=0.01), datamodule=TinyDataModule(num_train=96, num_val=32))
    assert saver.saved_epochs == [0, 1, 2, 3, 4, 5]  # every due epoch end, the last one of the run included
    assert [c["epoch"] for c in io.written] == saver.saved_epochs
    for saved in io.written:
        weights, optimizer = states.states[saved["epoch"]]
        assert _same(saved["state_dict"], weights), saved["epoch"]
        assert _same(saved["optimizer_states"][0]["state"], optimizer["state"]), saved["epoch"]
        assert saved["global_step"] == 3 * (saved["epoch"] + 1)
    # the live weights moved on after each copy was taken (so equality above is not trivially true)
    assert not _same(states.states[0][0], states.states[1][0])
    assert torch.load(saver.path, map_location="cpu", weights_only=False)["epoch"] == 5  # train end waited for it
    assert not list(saver.dirpath.glob(".*.tmp"))


def test_background_write_failure_is_reported_once_and_stops_saving(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # the checkpoint directory cannot be created under a file
    errors: list[str] = []
    saver = EpochCheckpoint(blocker / "ck", on_error=errors.append, max_overhead=0)
    trainer = pl.Trainer(max_epochs=3, callbacks=[saver], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2,
                         limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(TinyClassifier(), datamodule=TinyDataModule(num_train=64, num_val=32))
    assert saver.failed and saver.saved_epochs == []
    assert len(errors) == 1 and errors[0].startswith(f"cannot write checkpoint {saver.path}: ")


def test_background_write_failure_without_a_handler_fails_the_fit(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    saver = EpochCheckpoint(blocker / "ck", max_overhead=0)
    trainer = pl.Trainer(max_epochs=3, callbacks=[saver], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2,
                         limit_val_batches=1, default_root_dir=tmp_path)
    with pytest.raises(OSError, match="cannot write checkpoint"):
        trainer.fit(TinyClassifier(), datamodule=TinyDataModule(num_train=64, num_val=32))


class _DumpAtEnd(pl.Callback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.checkpoint = dump_checkpoint(trainer)


def test_the_default_io_is_streamed_to_disk_as_the_same_bytes(tmp_path: Path) -> None:
    """With Lightning's own TorchCheckpointIO the writer streams the checkpoint to the file: byte for byte what that
    IO writes, without first holding the serialized checkpoint in memory as it does."""
    dump = _DumpAtEnd()
    trainer = pl.Trainer(max_epochs=2, callbacks=[dump], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=2,
                         limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(TinyClassifier(), datamodule=TinyDataModule(num_train=64, num_val=32))
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO  # what a daemon's run writes with
    checkpoint = {**dump.checkpoint, "extra": torch.arange(2_000_000, dtype=torch.float32)}  # 8 MB of tensor data
    peaks = {}
    for name, write in [("ours", lambda p: write_atomically(checkpoint, p, TorchCheckpointIO())),
                        ("lightning", lambda p: TorchCheckpointIO().save_checkpoint(checkpoint, p))]:
        tracemalloc.start()  # the serialized bytes held by Python objects (a BytesIO), not the tensors themselves
        write(tmp_path / name / "last.ckpt")
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert (tmp_path / "ours" / "last.ckpt").read_bytes() == (tmp_path / "lightning" / "last.ckpt").read_bytes()
    assert peaks["lightning"] > 8e6 > 20 * peaks["ours"], peaks
    loaded = torch.load(tmp_path / "ours" / "last.ckpt", map_location="cpu", weights_only=False)
    assert loaded["global_step"] == 4 and torch.equal(loaded["extra"], checkpoint["extra"])


class _SlowIO(TorchCheckpointIO):
    """A disk that takes 0.5 s per checkpoint written off the main thread: the background write is still going on
    when the stop comes, while the stop's own (foreground) save is immediate."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.5)
        super().save_checkpoint(checkpoint, path, storage_options)


class _StopAfterFirstEpoch(pl.Callback):
    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop.set()


def test_a_stop_checkpoint_waits_for_the_background_write(tmp_path: Path) -> None:
    """The stop checkpoint is written after last.ckpt reached the disk, so --resume (newest file) takes it."""
    stop, io = threading.Event(), _SlowIO()
    saver = EpochCheckpoint(tmp_path / "checkpoints", max_overhead=0)
    tap = DaemonTap(None, stop_event=stop, checkpoint_dir=tmp_path / "checkpoints", before_checkpoint=saver.wait)
    trainer = pl.Trainer(max_epochs=3, callbacks=[tap, saver, _StopAfterFirstEpoch(stop)], plugins=[io],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_train_batches=4, limit_val_batches=1,
                         default_root_dir=tmp_path)
    trainer.fit(TinyClassifier(), datamodule=TinyDataModule(num_train=128, num_val=32))
    assert tap.stopped and tap.checkpoint_path is not None
    assert saver.saved_epochs == [0]  # written in the background while epoch 1 began
    assert trainer.global_step == 5  # stopped after the first step of epoch 1, not at the end of the write
    stop_ckpt = tap.checkpoint_path
    assert newest_checkpoint(tmp_path) == stop_ckpt
    assert stop_ckpt.stat().st_mtime_ns > saver.path.stat().st_mtime_ns
    assert torch.load(stop_ckpt, map_location="cpu", weights_only=False)["global_step"] == 5
