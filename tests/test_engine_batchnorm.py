"""frozen_bn_track_running_stats: frozen BatchNorm layers keep (or stop) tracking running statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fts_daemon import FinetuningScheduler
from tests.engine_models import TinyNet, loaders, trainer


class BNNet(TinyNet):
    def __init__(self) -> None:
        super().__init__(scheduler=None)
        self.layer.insert(1, torch.nn.BatchNorm1d(16))  # layer.1 is BN, between layer.0 and ReLU


SCHED = {
    0: {"params": ["layer.7.*"], "max_transition_epoch": 1},
    1: {"params": ["layer.5.*", "layer.3.*"], "max_transition_epoch": 2},
    2: {"params": ["layer.1.*", "layer.0.*"], "max_transition_epoch": 3},
}


@pytest.mark.parametrize("track", [True, False])
def test_frozen_batchnorm_tracking(tmp_path: Path, track: bool) -> None:
    seen: list[tuple[int, bool, bool]] = []

    class Probe(FinetuningScheduler):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            super().on_train_epoch_start(trainer, pl_module)
            bn = pl_module.layer[1]
            seen.append((self.curr_depth, bn.track_running_stats, bn.weight.requires_grad))

    fts = Probe(ft_schedule=SCHED, epoch_transitions_only=True, restore_best=False, frozen_bn_track_running_stats=track)
    t = trainer(tmp_path, [fts], max_epochs=4)
    t.fit(BNNet(), *loaders())
    assert seen[0] == (0, track, False)
    assert seen[-1] == (2, True, True)
