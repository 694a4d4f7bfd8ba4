"""Helpers shared by the daemon/bus tests: private runtime dirs, test configs, in-process daemons."""

from __future__ import annotations

import copy
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fts_daemon import events as ev

REPO = Path(__file__).resolve().parent.parent

SCHEDULE: dict[int, dict[str, Any]] = {
    0: {"params": ["model.classifier.bias", "model.classifier.weight"], "max_transition_epoch": 2},
    1: {
        "params": ["model.pooler.dense.bias", "model.pooler.dense.weight", "model.deberta.encoder.LayerNorm.bias",
                   "model.deberta.encoder.LayerNorm.weight"],
        "max_transition_epoch": 4,
        "new_lr_scheduler": {
            "lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.StepLR",
                                  "init_args": {"step_size": 1, "gamma": 0.7}},
            "pl_lrs_cfg": {"interval": "epoch", "frequency": 1, "name": "Explicit_Reinit_LR_Scheduler"},
            "init_pg_lrs": [2.0e-3, 2.0e-3, 3.0e-3, 3.0e-3],
        },
    },
    2: {
        "params": ["model.deberta.encoder.rel_embeddings.weight",
                   "model.deberta.encoder.layer.{0,11}.(output|attention|intermediate).*",
                   "model.deberta.embeddings.LayerNorm.bias", "model.deberta.embeddings.LayerNorm.weight"],
        "new_lr_scheduler": {
            "lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
                                  "init_args": {"T_0": 2, "T_mult": 2, "eta_min": 1.0e-5}},
            "pl_lrs_cfg": {"interval": "epoch", "frequency": 1, "name": "Explicit_Reinit_LR_Scheduler"},
            "init_pg_lrs": [1.0e-3, 1.0e-3, 2.0e-3, 2.0e-3, 2.0e-3, 2.0e-3],
        },
    },
}


def write_config(
    directory: Path,
    schedule: dict[int, dict[str, Any]] | None = None,
    step_delay: float = 0.0,
    max_epochs: int = 6,
    num_train: int = 128,
    name: str = "cfg",
    extra_trainer: dict[str, Any] | None = None,
) -> Path:
    """A small config (4 steps per epoch) with its schedule in a sibling file; returns the config path."""
    directory.mkdir(parents=True, exist_ok=True)
    sched_path = directory / f"{name}_schedule.yaml"
    sched_path.write_text(yaml.safe_dump(copy.deepcopy(schedule or SCHEDULE), sort_keys=False))
    config = {
        "seed_everything": 42,
        "model": {
            "class_path": "fts_daemon.examples.tiny.TinyClassifier",
            "init_args": {
                "optimizer_init": {"class_path": "torch.optim.AdamW",
                                   "init_args": {"lr": 3.0e-3, "weight_decay": 1.0e-5, "eps": 1.0e-7}},
                "lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.LinearLR",
                                      "init_args": {"start_factor": 0.1, "total_iters": 4}},
                "pl_lrs_cfg": {"interval": "epoch", "frequency": 1, "name": "Explicit_Reinit_LR_Scheduler"},
                "no_decay": ["bias", "LayerNorm.weight"],
                "step_delay": step_delay,
            },
        },
        "data": {"class_path": "fts_daemon.examples.tiny.TinyDataModule",
                 "init_args": {"num_train": num_train, "num_val": 64, "batch_size": 32}},
        "trainer": {
            "max_epochs": max_epochs,
            "log_every_n_steps": 1,
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "callbacks": [
                {"class_path": "fts_daemon.FinetuningScheduler",
                 "init_args": {"ft_schedule": sched_path.name, "restore_best": False}},
                {"class_path": "fts_daemon.FTSEarlyStopping",
                 "init_args": {"monitor": "val_loss", "patience": 100}},
                {"class_path": "fts_daemon.FTSCheckpoint", "init_args": {"monitor": "val_loss", "save_top_k": 1}},
            ],
            **(extra_trainer or {}),
        },
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextmanager
def private_runtime_dir(monkeypatch: Any) -> Iterator[Path]:
    """A short, private FTS_RUNTIME_DIR (ipc socket paths must stay under ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="fts-t"))
    monkeypatch.setenv("FTS_RUNTIME_DIR", str(path))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class RunningDaemon:
    daemon: Any
    thread: threading.Thread
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def pub(self) -> str:
        return self.daemon.bus.endpoints[0]

    @property
    def ctl(self) -> str:
        return self.daemon.bus.endpoints[1]

    def join(self, timeout: float = 120.0) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "daemon did not finish in time"
        return self.result["rc"]


def start_daemon(**options: Any) -> RunningDaemon:
    """Run a Daemon on a background thread (no signal handlers there); returns once it listens."""
    from fts_daemon.runner import Daemon, StartOptions

    options.setdefault("progress", False)
    options.setdefault("install_signals", False)
    daemon = Daemon(StartOptions(**options))
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.__setitem__("rc", daemon.run()), daemon=True)
    thread.start()
    assert daemon.ready.wait(60), "daemon never became ready"
    assert daemon.bus is not None, f"daemon failed to start: {daemon.error}"
    return RunningDaemon(daemon, thread, result)


def read_events(path: Path) -> list[ev.Event]:
    return [ev.event_from_json_line(line) for line in path.read_text().splitlines() if line.strip()]


def lr_by_step(events: list[ev.Event]) -> dict[int, dict[str, float]]:
    return {e.step: e.data["lrs"] for e in events if e.kind == ev.LR}


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")
