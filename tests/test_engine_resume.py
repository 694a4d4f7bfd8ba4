"""Resume mid-schedule: ``trainer.fit(ckpt_path=...)`` continues bitwise like the uninterrupted run.

FTS 2.14.1 gets this wrong (it restarts at phase 0 or keeps the phase-0 scheduler class); we rebuild the active
reinitialized scheduler from the checkpoint and compare every later step's LRs and the final weights exactly.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.optim.lr_scheduler import LambdaLR

from fts_daemon import FinetuningScheduler, FTSEarlyStopping
from tests.engine_models import STEP_LR, LRRecorder, TinyNet, explicit_schedule, loaders, trainer


class Warmup(LambdaLR):
    """A LambdaLR subclass configurable from YAML (lambdas cannot be written in a schedule)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int = 4, last_epoch: int = -1):
        self.warmup = warmup
        super().__init__(optimizer, lr_lambda=lambda s: min(1.0, (s + 1) / warmup), last_epoch=last_epoch)


PREFIXES = ["torch.optim.", "tests."]

RLROP_SCHED = {
    0: {"params": ["layer.6.*"], "max_transition_epoch": 2},
    1: {
        "params": ["layer.4.*"],
        "max_transition_epoch": 5,
        "new_lr_scheduler": {
            "lr_scheduler_init": {
                "class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau",
                "init_args": {"patience": 0, "factor": 0.5, "min_lr": [2e-7, 1e-7]},
            },
            "pl_lrs_cfg": {"monitor": "val_loss"},
            "init_pg_lrs": [1.5e-5, 1e-5],
        },
    },
    2: {"params": ["layer.2.*", "layer.0.*"], "lr": 3e-6, "max_transition_epoch": 9, "new_lr_scheduler": copy.deepcopy(STEP_LR)},
}

CASES: dict[str, dict[str, Any]] = {
    "steplr-then-cawr": {"kw": {"ft_schedule": explicit_schedule()}, "resume_after": 5},
    "ckpt-right-after-patience": {"kw": {"ft_schedule": explicit_schedule()}, "resume_after": 3},
    "lambda-step-interval": {
        "kw": {
            "ft_schedule": explicit_schedule(
                {
                    2: {
                        "params": ["layer.2.*"],
                        "new_lr_scheduler": {
                            "lr_scheduler_init": {"class_path": "tests.test_engine_resume.Warmup", "init_args": {"warmup": 6}},
                            "pl_lrs_cfg": {"interval": "step", "frequency": 2},
                        },
                    }
                }
            ),
            "apply_lambdas_new_pgs": True,
        },
        "resume_after": 5,
    },
    "plateau-min-lr-list": {
        "kw": {"ft_schedule": RLROP_SCHED, "epoch_transitions_only": True},
        "resume_after": 3,
        "model": {"val_losses": [1.0, 0.9, 0.8, 0.85, 0.84, 0.9, 0.95, 0.97, 0.99, 1.0]},
    },
    "optimizer-reinit": {
        "kw": {
            "ft_schedule": explicit_schedule(
                {1: {"params": ["layer.4.*"], "new_optimizer": {"optimizer_init": {"class_path": "torch.optim.Adam", "init_args": {"lr": 2e-4}}}}}
            )
        },
        "resume_after": 4,
    },
    "implicit-reinit": {"kw": {"reinit_lr_cfg": copy.deepcopy(STEP_LR), "max_depth": 3}, "resume_after": 5},
    "no-decay-named-groups": {
        "kw": {"ft_schedule": explicit_schedule(), "name_param_groups": True},
        "resume_after": 5,
        "model": {"no_decay": ["bias"], "all_params": True, "optimizer": "AdamW"},
    },
}

MAX_EPOCHS = 9


def _run(
    tmp: Path, case: dict[str, Any], ckpt_path: str | None = None
) -> tuple[LRRecorder, TinyNet, Path, FinetuningScheduler]:
    torch.manual_seed(0)
    model = TinyNet(**case.get("model", {}))
    rec = LRRecorder()
    ckpt_dir = tmp / "ckpts"
    kw = copy.deepcopy(case["kw"])
    fts = FinetuningScheduler(restore_best=False, allowed_class_prefixes=PREFIXES, **kw)
    callbacks: list[Any] = [fts, rec, ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1)]
    if not kw.get("epoch_transitions_only"):
        callbacks.insert(1, FTSEarlyStopping(monitor="val_loss", patience=1))
    t = trainer(tmp, callbacks, max_epochs=MAX_EPOCHS)
    t.fit(model, *loaders(), ckpt_path=ckpt_path)
    return rec, model, ckpt_dir, fts


@pytest.mark.parametrize("name", list(CASES))
def test_resume_is_bitwise_identical(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    full, full_model, ckpt_dir, full_fts = _run(tmp_path / "full", case)
    k = case["resume_after"]
    ckpt = ckpt_dir / f"epoch={k}.ckpt"
    assert ckpt.exists(), sorted(p.name for p in ckpt_dir.iterdir())
    resumed, resumed_model, _, resumed_fts = _run(tmp_path / "resumed", case, ckpt_path=str(ckpt))
    steps_per_epoch = 4  # 64 samples, batch 16
    expected = full.steps[(k + 1) * steps_per_epoch :]
    assert len(resumed.steps) == len(expected)
    for i, (got, want) in enumerate(zip(resumed.steps, expected)):
        assert got == want, f"step {(k + 1) * steps_per_epoch + i}: resumed {got} != uninterrupted {want}"
    # phases line up epoch by epoch too
    assert [e[:2] for e in resumed.epochs] == [e[:2] for e in full.epochs[k + 1 :]]
    for (n, a), (_, b) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), f"weights of {n} differ after resume"
    # the planner works after a resume and plans the same run
    assert resumed_fts.plan(max_epochs=MAX_EPOCHS).to_dict() == full_fts.plan(max_epochs=MAX_EPOCHS).to_dict()


def test_resumed_run_rebuilds_reinitialized_scheduler_class(tmp_path: Path) -> None:
    case = CASES["steplr-then-cawr"]
    _, _, ckpt_dir, _ = _run(tmp_path / "full", case)
    model = TinyNet()
    fts = FinetuningScheduler(restore_best=False, **copy.deepcopy(case["kw"]))
    seen: list[str] = []

    class Probe(LRRecorder):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            seen.append(type(trainer.lr_scheduler_configs[0].scheduler).__name__)

    t = trainer(tmp_path / "r", [fts, FTSEarlyStopping(monitor="val_loss", patience=1), Probe()], max_epochs=7)
    t.fit(model, *loaders(), ckpt_path=str(ckpt_dir / "epoch=5.ckpt"))
    assert fts.curr_depth == 3
    assert seen and seen[0] == "CosineAnnealingWarmRestarts"
