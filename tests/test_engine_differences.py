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


def test_substituted_early_stopping_keeps_min_delta_in_both_modes(tmp_path: Path) -> None:
    """EarlyStopping stores min_delta negated in min mode; copied back into a constructor as it was, the substitute
    counted any value within +min_delta of the best as an improvement (no phase ever ended on patience)."""
    from pytorch_lightning.callbacks import EarlyStopping

    for mode in ("min", "max"):
        plain = EarlyStopping(monitor="val_loss", mode=mode, min_delta=0.02, patience=1)
        fts = FinetuningScheduler(ft_schedule=explicit_schedule(), restore_best=False)
        t = trainer(tmp_path / mode, [fts, plain], max_epochs=1)
        t.fit(TinyNet(), *loaders())
        (es,) = [c for c in t.callbacks if isinstance(c, EarlyStopping)]
        assert isinstance(es, FTSEarlyStopping)
        assert (es.mode, es.min_delta, es.patience) == (mode, plain.min_delta, 1), mode


def test_max_epochs_follows_the_phase_that_runs_last(tmp_path: Path) -> None:
    """FTS raises max_epochs when the schedule's last phase has a limit, to the largest limit of phases 1..n, even
    with max_depth below that phase (phases that never run decide how long the run is). Here the final phase that
    runs (max_depth) decides, and every phase's limit (phase 0's too) bounds it."""
    def run(name: str, limits: dict[int, int], max_depth: int, max_epochs: int) -> int:
        sched = explicit_schedule()
        for phase, limit in limits.items():
            sched[phase]["max_transition_epoch"] = limit
        fts = FinetuningScheduler(ft_schedule=sched, max_depth=max_depth, restore_best=False)
        t = trainer(tmp_path / name, [fts, FTSEarlyStopping(monitor="val_loss", patience=100)], max_epochs=max_epochs)
        t.fit(TinyNet(), *loaders())
        return int(t.fit_loop.max_epochs)

    # the schedule's last phase (3) has a limit of 10, but the run ends with phase 1, which has none: FTS gives 10
    assert run("beyond", {0: 1, 1: -1, 2: 2, 3: 10}, max_depth=1, max_epochs=3) == 3
    # phase 1 is the final phase and has a limit: it raises max_epochs (FTS would look at phase 3's, which has none)
    assert run("final", {0: 1, 1: 6, 2: -1, 3: -1}, max_depth=1, max_epochs=3) == 6
    # phase 0's limit counts: the run lasts until phase 0 has handed over (FTS leaves max_epochs at 4)
    assert run("phase0", {0: 6, 1: 3, 2: -1, 3: -1}, max_depth=1, max_epochs=4) == 6


def test_a_checkpoint_in_another_format_is_said_to_start_over(tmp_path: Path) -> None:
    """finetuning-scheduler's own checkpoint state cannot be used here; FTS itself restarts at phase 0 on resume, so
    the outcome is the same, but it is now said rather than silent."""
    import pytest
    import torch

    fts = FinetuningScheduler(ft_schedule=explicit_schedule(), restore_best=False)
    t = trainer(tmp_path / "a", [fts], max_epochs=1)
    t.fit(TinyNet(), *loaders())
    path = tmp_path / "a.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    (key,) = [k for k in ckpt["callbacks"] if "FinetuningScheduler" in k]
    ckpt["callbacks"][key] = {"fts_metadata": {"current_ckpt_depth": 1}, "internal_optimizer_metadata": {}}
    torch.save(ckpt, path)
    resumed = FinetuningScheduler(ft_schedule=explicit_schedule(), restore_best=False)
    t2 = trainer(tmp_path / "b", [resumed], max_epochs=2)
    with pytest.warns(UserWarning, match="not in this callback's format .saved by finetuning-scheduler"):
        t2.fit(TinyNet(), *loaders(), ckpt_path=str(path))
    assert resumed.curr_depth == 0
