"""A callback for the DDP daemon test: each rank writes what it trained, per epoch, as JSON at train end."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from fts_daemon.tap import find_fts


class LRDump(Callback):
    """``out_dir/rank<R>-<pid>.json``: ``epochs`` ([epoch, phase, [lr per group]] at each epoch start, after the
    FinetuningScheduler's transition), the last ``step``, whether the fit ``resumed``, per-parameter sums, and the
    parameters in the optimizer's groups at the end (``grouped``)."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir
        self.epochs: list[list[Any]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fts = find_fts(trainer)
        lrs = [float(g["lr"]) for g in trainer.optimizers[0].param_groups]
        self.epochs.append([int(trainer.current_epoch), fts.curr_depth if fts else None, lrs])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "step": int(trainer.global_step),
            "resumed": trainer.ckpt_path is not None,
            "epochs": self.epochs,
            "weights": {n: float(p.detach().double().sum()) for n, p in pl_module.named_parameters()},
            # the parameters the optimizer trains at the end (a parameter in no phase is missing here)
            "grouped": sorted(n for n, p in pl_module.named_parameters()
                              if any(p is q for g in trainer.optimizers[0].param_groups for q in g["params"])),
        }
        path = Path(self.out_dir) / f"rank{trainer.global_rank}-{os.getpid()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out))
