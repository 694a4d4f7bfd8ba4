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
from fts_daemon.schedule import parse_schedule, resolve_params  # noqa: E402
from tests.engine_models import LRRecorder, TinyNet, explicit_schedule, loaders  # noqa: E402

EDITED_PHASE_2 = {
    "params": ["layer.2.*"],
    "lr": 4e-5,
    "max_transition_epoch": 3,
    "new_lr_scheduler": {
        "lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.ExponentialLR", "init_args": {"gamma": 0.5}},
        "init_pg_lrs": [3e-4, 2e-4, 4e-5],
    },
}


def main(devices: int, out_dir: str, mode: str) -> None:
    warnings.simplefilter("ignore")
    sched = explicit_schedule()
    for phase, epoch in ((0, 1), (1, 2), (2, 3), (3, 5)):
        sched[phase]["max_transition_epoch"] = epoch
    if mode == "edit-in-yaml":
        sched[2] = EDITED_PHASE_2
    rec = LRRecorder()
    fts = FinetuningScheduler(ft_schedule=sched, epoch_transitions_only=True, restore_best=False)
    if mode == "edit-on-rank0":

        def apply_edit(cb: FinetuningScheduler, index: int) -> None:
            # what the daemon does on rank 0 only: swap in the edited upcoming phase at the transition
            if index == 2 and cb.trainer is not None and cb.trainer.global_rank == 0:
                full = cb.schedule.to_dict(resolved=False)
                full[2] = EDITED_PHASE_2
                edited, _ = parse_schedule(full)
                resolve_params(edited, [n for n, _ in cb.trainer.lightning_module.named_parameters()])
                cb.replace_phase(edited[2])

        fts.before_transition.append(apply_edit)
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
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "plain")
