"""Where we differ from finetuning-scheduler 2.14.1 on purpose (each listed in the README)."""

from __future__ import annotations

import logging
from pathlib import Path

from fts_daemon import FinetuningScheduler, FTSCheckpoint, FTSEarlyStopping
from tests.engine_models import LRRecorder, TinyNet, explicit_schedule, loaders, trainer


def test_base_max_lr_none_uses_optimizer_lr(tmp_path: Path) -> None:
    # FTS documents this but raises TypeError (float(None)); we start new groups at the optimizer's lr
    sched = explicit_schedule()
    del sched[2]["lr"]
    rec = LRRecorder()
    fts = FinetuningScheduler(ft_schedule=sched, base_max_lr=None, restore_best=False)
    t = trainer(tmp_path, [fts, FTSEarlyStopping(monitor="val_loss", patience=1), rec], max_epochs=7)
    t.fit(TinyNet(), *loaders())
    phase3_start = next(lrs for epoch, depth, lrs in rec.epochs if depth == 3)
    assert phase3_start[-1] == 1e-3  # SGD(lr=1e-3) from configure_optimizers


def test_logging_level_does_not_touch_lightning_logger() -> None:
    lightning = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    before = lightning.level
    FinetuningScheduler(logging_level=logging.DEBUG)
    assert lightning.level == before
    assert logging.getLogger("fts_daemon").level == logging.DEBUG


def test_checkpoint_callback_added_only_when_restore_best_needs_it(tmp_path: Path) -> None:
    for restore, expected in ((False, 0), (True, 1)):
        fts = FinetuningScheduler(ft_schedule=explicit_schedule(), restore_best=restore)
        t = trainer(tmp_path / str(restore), [fts, FTSEarlyStopping(monitor="val_loss", patience=1)], max_epochs=1,
                    enable_checkpointing=False)
        t.fit(TinyNet(), *loaders())
        assert sum(isinstance(c, FTSCheckpoint) for c in t.callbacks) == expected


def test_plain_callbacks_are_substituted(tmp_path: Path) -> None:
    from pytorch_lightning.callbacks import EarlyStopping

    fts = FinetuningScheduler(ft_schedule=explicit_schedule(), restore_best=False)
    t = trainer(tmp_path, [fts, EarlyStopping(monitor="val_loss", patience=1)], max_epochs=8)
    t.fit(TinyNet(), *loaders())
    es = [c for c in t.callbacks if isinstance(c, EarlyStopping)]
    assert len(es) == 1 and isinstance(es[0], FTSEarlyStopping) and es[0].patience == 1
    assert fts.curr_depth == 3  # patience ended phases rather than the fit
