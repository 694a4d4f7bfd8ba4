"""Per-batch hooks our callbacks do not use are skipped by Lightning's dispatcher (``compat.skip_unused_batch_hooks``)
while every hook that is used, ours or a subclass's, still runs at every step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from fts_daemon import FinetuningScheduler, FTSCheckpoint, FTSEarlyStopping, compat
from fts_daemon.crashsafe import EpochCheckpoint
from fts_daemon.examples.tiny import TinyClassifier, TinyDataModule
from fts_daemon.tap import DaemonTap


def test_unused_per_batch_hooks_are_shadowed_and_used_ones_kept(tmp_path: Path) -> None:
    assert compat._dispatcher_skips_non_callables()  # the installed Lightning tests callable(fn) before a hook
    tap = DaemonTap(None)
    saver = EpochCheckpoint(tmp_path)
    fts = FinetuningScheduler()
    for cb in (tap, saver, fts, FTSCheckpoint(monitor="val_loss"), FTSEarlyStopping(monitor="val_loss")):
        for name in compat.PER_BATCH_HOOKS:
            overridden = getattr(type(cb), name) is not getattr(pl.Callback, name)
            assert (getattr(cb, name) is None) != overridden, (type(cb).__name__, name)
    # what the daemon's callbacks use per step is still there
    assert callable(tap.on_train_batch_start) and callable(tap.on_train_batch_end)
    assert saver.on_train_batch_end is None and callable(saver.on_train_epoch_end)


class _Counting(DaemonTap):
    """A subclass that overrides one hook its base leaves alone: that hook must keep being called."""

    def __init__(self) -> None:
        super().__init__(None)
        self.after_backward = 0

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.after_backward += 1


class _Dispatches(pl.Callback):
    """Counts how often Lightning's dispatcher enters a hook's profiler context for each callback."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], int] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        profile = trainer.profiler.profile
        calls = self.calls

        def counting(action: str) -> Any:
            owner, _, hook = action.removeprefix("[Callback]").partition(".")
            calls[(owner, hook)] = calls.get((owner, hook), 0) + 1
            return profile(action)

        trainer.profiler.profile = counting  # type: ignore[method-assign]


def test_a_real_fit_calls_used_hooks_every_step_and_skips_the_rest(tmp_path: Path) -> None:
    counting, saver, dispatches = _Counting(), EpochCheckpoint(tmp_path / "ck", max_overhead=0), _Dispatches()
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[counting, saver, dispatches], default_root_dir=tmp_path)
    trainer.fit(TinyClassifier(), datamodule=TinyDataModule(num_train=160, num_val=32))  # 5 batches of 32
    steps = trainer.global_step
    assert steps == 10
    assert counting.steps_started == steps  # on_train_batch_start ran at every step
    assert counting.after_backward == steps  # the subclass's own hook was not shadowed
    assert saver.saved_epochs == [0, 1]  # epoch-end hooks untouched
    tap_hooks = {hook for (owner, hook) in dispatches.calls if owner == counting.state_key}
    assert {"on_train_batch_start", "on_train_batch_end", "on_after_backward"} <= tap_hooks
    assert not {"on_before_backward", "on_before_zero_grad", "on_before_optimizer_step"} & tap_hooks
    saver_hooks = {hook for (owner, hook) in dispatches.calls if owner == saver.state_key}
    assert not set(compat.PER_BATCH_HOOKS) & saver_hooks
    # a callback that opts out of nothing is dispatched for every per-step hook, as before
    assert dispatches.calls[(dispatches.state_key, "on_before_zero_grad")] == steps


def _fit_counting_metric_computations(tmp_path: Path, monkeypatch: Any, callbacks: list[Any]) -> int:
    """How often Lightning computes its logged metrics during a 2-epoch, 10-step fit with these callbacks."""
    from pytorch_lightning.trainer.connectors.logger_connector.logger_connector import _LoggerConnector

    computed = [0]
    metrics = _LoggerConnector.metrics.fget

    def counting(self: Any) -> Any:
        computed[0] += 1
        return metrics(self)

    monkeypatch.setattr(_LoggerConnector, "metrics", property(counting))
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=1, logger=False, log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, default_root_dir=tmp_path)
    trainer.fit(TinyClassifier(), datamodule=TinyDataModule(num_train=160, num_val=32))
    monkeypatch.undo()
    return computed[0]


def test_the_tap_reads_train_metrics_without_making_lightning_compute_them_again(tmp_path: Path, monkeypatch: Any) -> None:
    """Lightning computes the logged metrics after every batch; a tap that read ``trainer.callback_metrics`` at each
    log point would compute them all a second time (10 more here). Ours reads Lightning's result: a few reads per
    epoch remain (its end, validation's start and end), and every step's train loss is still published."""
    published: list[tuple[str, dict[str, Any], Any]] = []
    tap = DaemonTap(lambda kind, data, step=None, epoch=None: published.append((kind, data, step)))
    plain = _fit_counting_metric_computations(tmp_path / "plain", monkeypatch, [])
    with_tap = _fit_counting_metric_computations(tmp_path / "tap", monkeypatch, [tap])
    assert with_tap - plain <= 3 * 2 + 1, (plain, with_tap)  # per epoch, plus the sanity check's
    train_steps = [step for kind, data, step in published if kind == "metric" and data["stage"] == "train"
                   and "train_loss" in data["metrics"]]
    assert train_steps == list(range(1, 11))
    # without EventBus.publish_lr the tap publishes each step's LRs through ``publish`` as an lr event's data
    lr = [(step, data) for kind, data, step in published if kind == "lr"]
    assert [step for step, _ in lr] == list(range(10))
    assert all(list(data) == ["lrs"] and data["lrs"] and all(type(v) is float for v in data["lrs"].values())
               for _, data in lr)
