"""Steps/s of FinetuningScheduler vs plain Lightning, same model, logger and LR monitor.

Every parameter is trainable in both runs (one phase holding all parameters), so the ratio measures the callback's
own cost, not a cheaper frozen backward pass. Runs are interleaved (plain, fts, plain, fts, ...) so machine noise
hits both sides alike; the figure is the median of per-pair ratios. Target: ratio >= 0.99.

    python bench/overhead.py            # both sizes, 5 pairs each
    python bench/overhead.py --pairs 9 --sizes small
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from fts_daemon import FinetuningScheduler

SIZES = {
    # name: (layer widths, batch size, steps per run)
    "small": ([64, 128, 96, 64, 2], 32, 400),  # ~25k parameters
    "large": ([1024, 2048, 2048, 1536, 2], 64, 60),  # ~10M parameters
}


class MLP(pl.LightningModule):
    def __init__(self, widths: list[int]):
        super().__init__()
        layers: list[torch.nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*layers[:-1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class StepTimer(pl.Callback):
    """Wall time over the measured steps; the first epoch's first steps are warm-up and not counted."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.count = 0
        self.start = 0.0
        self.end = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.count += 1
        if self.count == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()

    def steps_per_s(self) -> float:
        return (self.count - self.warmup) / (self.end - self.start)


def run(widths: list[int], batch: int, steps: int, with_fts: bool) -> float:
    torch.manual_seed(0)
    model = MLP(widths)
    n = batch * 20
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, widths[0], generator=g), torch.randint(0, 2, (n,), generator=g))
    loader = DataLoader(data, batch_size=batch)
    timer = StepTimer(warmup=10)
    callbacks: list[pl.Callback] = [LearningRateMonitor(), timer]
    if with_fts:
        names = [name for name, _ in model.named_parameters()]
        callbacks.insert(
            0,
            FinetuningScheduler(
                ft_schedule={0: {"params": names, "max_transition_epoch": 1000}},
                epoch_transitions_only=True,
                restore_best=False,
            ),
        )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_steps=steps,
            logger=TensorBoardLogger(tmp, name="bench"),
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            accelerator="cpu",
            devices=1,
            default_root_dir=tmp,
        )
        trainer.fit(model, loader)
    return timer.steps_per_s()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("fts_daemon").setLevel(logging.ERROR)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    print(f"torch {torch.__version__}, pytorch_lightning {pl.__version__}, threads {torch.get_num_threads()}")
    for size in args.sizes:
        widths, batch, steps = SIZES[size]
        n_params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
        ratios, plain_all, fts_all = [], [], []
        run(widths, batch, min(steps, 30), True)  # warm caches/allocator once; not counted
        for i in range(args.pairs):
            # alternate which side runs first: the second run of a pair inherits a warmer allocator/cache
            if i % 2 == 0:
                plain = run(widths, batch, steps, False)
                fts = run(widths, batch, steps, True)
            else:
                fts = run(widths, batch, steps, True)
                plain = run(widths, batch, steps, False)
            plain_all.append(plain)
            fts_all.append(fts)
            ratios.append(fts / plain)
        print(
            f"{size:5s} {n_params / 1e6:7.3f}M params: plain {statistics.median(plain_all):8.1f} steps/s, "
            f"fts {statistics.median(fts_all):8.1f} steps/s, median ratio fts/plain = {statistics.median(ratios):.4f} "
            f"(pairs: {', '.join(f'{r:.3f}' for r in ratios)}; target >= 0.99)"
        )


if __name__ == "__main__":
    main()
