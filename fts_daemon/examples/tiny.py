"""A tiny DeBERTa-shaped classifier on synthetic data: fast enough for demos and tests on 2 CPU cores.

Its parameter names follow the seed's ``RteBoolqModule`` (``model.classifier.*``, ``model.pooler.dense.*``,
``model.deberta.encoder.LayerNorm.*``, ``model.deberta.encoder.layer.N.(attention|intermediate|output).*``,
``model.deberta.encoder.rel_embeddings.weight``, ``model.deberta.embeddings.LayerNorm.*``), so the seed's explicit
schedule works against it unchanged. Its constructor takes the seed module's ``optimizer_init`` /
``lr_scheduler_init`` / ``pl_lrs_cfg`` blocks, so LightningCLI configs only need a different ``class_path``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from fts_daemon.reinit import import_class

DEFAULT_OPTIMIZER = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1.0e-3, "weight_decay": 1.0e-5}}
DEFAULT_SCHEDULER = {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.9}}
# the module's own config comes from the user's YAML; still keep it to torch classes, like schedules
MODULE_CLASS_PREFIXES = ("torch.optim.",)


class _Block(nn.Module):
    """One encoder layer: attention-ish mixing, an intermediate expansion and an output projection."""

    def __init__(self, hidden: int):
        super().__init__()
        self.attention = nn.ModuleDict({"self": nn.Linear(hidden, hidden), "output": nn.Linear(hidden, hidden)})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(hidden, 2 * hidden)})
        self.output = nn.ModuleDict({"dense": nn.Linear(2 * hidden, hidden), "LayerNorm": nn.LayerNorm(hidden)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention["output"](torch.tanh(self.attention["self"](x)))
        h2 = self.output["dense"](torch.relu(self.intermediate["dense"](h)))
        return self.output["LayerNorm"](h + h2)


class _Encoder(nn.Module):
    def __init__(self, hidden: int, num_layers: int, num_rel: int):
        super().__init__()
        self.layer = nn.ModuleList(_Block(hidden) for _ in range(num_layers))
        self.rel_embeddings = nn.Embedding(num_rel, hidden)
        self.LayerNorm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.rel_embeddings.weight.mean(0)
        for block in self.layer:
            x = block(x)
        return self.LayerNorm(x)


class _Embeddings(nn.Module):
    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.word_embeddings = nn.Linear(in_features, hidden)
        self.LayerNorm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.word_embeddings(x))


class _DebertaLike(nn.Module):
    def __init__(self, in_features: int, hidden: int, num_layers: int, num_rel: int):
        super().__init__()
        self.embeddings = _Embeddings(in_features, hidden)
        self.encoder = _Encoder(hidden, num_layers, num_rel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(x))


class _Pooler(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))


class _TinyNet(nn.Module):
    def __init__(self, in_features: int, hidden: int, num_layers: int, num_classes: int, num_rel: int = 4):
        super().__init__()
        self.deberta = _DebertaLike(in_features, hidden, num_layers, num_rel)
        self.pooler = _Pooler(hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooler(self.deberta(x)))


class TinyClassifier(pl.LightningModule):
    """Binary classifier over synthetic features, shaped like the seed's DeBERTa module.

    ``step_delay`` sleeps in every training step: demos use it so a person has time to attach and queue edits
    (it does not change any number the run computes).
    """

    def __init__(
        self,
        optimizer_init: dict[str, Any] | None = None,
        lr_scheduler_init: dict[str, Any] | None = None,
        pl_lrs_cfg: dict[str, Any] | None = None,
        no_decay: Sequence[str] | None = None,
        in_features: int = 16,
        hidden: int = 32,
        num_layers: int = 2,
        num_classes: int = 2,
        step_delay: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.optimizer_init = copy.deepcopy(optimizer_init) if optimizer_init else copy.deepcopy(DEFAULT_OPTIMIZER)
        self.lr_scheduler_init = (
            copy.deepcopy(lr_scheduler_init) if lr_scheduler_init else copy.deepcopy(DEFAULT_SCHEDULER)
        )
        self.pl_lrs_cfg = dict(pl_lrs_cfg or {})
        # FinetuningScheduler reads this attribute: params whose names contain one of these get weight_decay 0
        self.no_decay = list(no_decay) if no_decay else None
        self.step_delay = float(step_delay)
        self.model = _TinyNet(in_features, hidden, num_layers, num_classes)
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.step_delay > 0:
            time.sleep(self.step_delay)
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.loss_fn(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        opt_cls = import_class(self.optimizer_init["class_path"], MODULE_CLASS_PREFIXES)
        # all parameters, as the seed's module does: FinetuningScheduler then regroups them for phase 0 (with the
        # ``no_decay`` split), so phase 0 has the same group layout as every later phase
        optimizer = opt_cls(self.parameters(), **self.optimizer_init.get("init_args", {}))
        sched_cls = import_class(self.lr_scheduler_init["class_path"], MODULE_CLASS_PREFIXES)
        scheduler = sched_cls(optimizer, **self.lr_scheduler_init.get("init_args", {}))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, **self.pl_lrs_cfg}}


class EpochShuffle(Sampler[int]):
    """Shuffles with a seed derived from the epoch (Lightning calls ``set_epoch``), so the data order is a function
    of the epoch alone and a run resumed from an end-of-epoch checkpoint sees exactly the batches it would have."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


class TinyDataModule(pl.LightningDataModule):
    """Synthetic, deterministic binary classification: labels come from a fixed random two-layer teacher."""

    def __init__(
        self,
        num_train: int = 512,
        num_val: int = 128,
        batch_size: int = 32,
        in_features: int = 16,
        seed: int = 1234,
        noise: float = 0.1,
    ):
        super().__init__()
        self.num_train, self.num_val, self.batch_size = num_train, num_val, batch_size
        self.in_features, self.seed, self.noise = in_features, seed, noise
        self._train: TensorDataset | None = None
        self._val: TensorDataset | None = None

    def _make(self, n: int, gen: torch.Generator, teacher: tuple[torch.Tensor, torch.Tensor]) -> TensorDataset:
        x = torch.randn(n, self.in_features, generator=gen)
        w1, w2 = teacher
        score = torch.tanh(x @ w1) @ w2 + self.noise * torch.randn(n, generator=gen)
        return TensorDataset(x, (score > 0).long())

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        # its own generator: the data never depends on (or disturbs) the global RNG that seeds the model
        gen = torch.Generator().manual_seed(self.seed)
        teacher = (torch.randn(self.in_features, 8, generator=gen), torch.randn(8, generator=gen))
        self._train = self._make(self.num_train, gen, teacher)
        self._val = self._make(self.num_val, gen, teacher)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self._train is not None
        return DataLoader(self._train, batch_size=self.batch_size, sampler=EpochShuffle(len(self._train), self.seed))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self._val, batch_size=self.batch_size)
