"""Run by tests/test_ddp.py: fit TinyNet with FinetuningScheduler on N CPU processes (gloo), dump per-rank results."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402

from fts_daemon import FinetuningScheduler  # noqa: E402
from tests.engine_models import LRRecorder, TinyNet, explicit_schedule, loaders  # noqa: E402


def main(devices: int, out_dir: str) -> None:
    warnings.simplefilter("ignore")
    sched = explicit_schedule()
    for phase, epoch in ((0, 1), (1, 2), (2, 3), (3, 5)):
        sched[phase]["max_transition_epoch"] = epoch
    rec = LRRecorder()
    fts = FinetuningScheduler(ft_schedule=sched, epoch_transitions_only=True, restore_best=False)
    trainer = pl.Trainer(
        max_epochs=5, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        callbacks=[fts, rec], logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=out_dir,
    )
    model = TinyNet()
    trainer.fit(model, *loaders(batch=8))
    result = {
        "rank": trainer.global_rank,
        "epochs": rec.epochs,
        "weights": {n: p.detach().flatten().tolist() for n, p in model.named_parameters()},
    }
    Path(out_dir, f"rank{trainer.global_rank}_of_{devices}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
