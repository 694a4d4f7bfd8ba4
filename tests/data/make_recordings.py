"""Build synthetic-but-realistic fts event recordings for the TUI tests (no daemon, no torch).

Run ``python tests/data/make_recordings.py`` to (re)write:

* ``tests/data/demo_run/events.jsonl``: a finished 4-phase run (explicit schedule with LR scheduler reinit:
  LinearLR → StepLR → CosineAnnealingWarmRestarts → ExponentialLR from a queued edit), named param groups,
  per-step LRs, train/val metrics, an edit that is applied and one that is cancelled, heartbeats.
* ``tests/data/crashed_run/events.jsonl``: the same run failing in phase 2, ending in a torn (half-written) line.

The LR values follow the torch closed forms for the schedulers named, stepped on the epoch interval as Lightning
does; the TUI does not recompute them, they only have to look like a real run.
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fts_daemon.events import Event, event_to_json_line, lr_tag_names  # noqa: E402

RUN_ID = "demo-explicit-reinit"
DAEMON_ID = "d7f3a9c2e1"
T0 = 1_767_268_800.0  # 2026-01-01 12:00:00 UTC
SCHED_NAME = "Explicit_Reinit_LR_Scheduler"
STEP_SECONDS = 0.05  # 20 steps/s
VAL_SECONDS = 0.6

PHASES: list[dict[str, Any]] = [
    {"index": 0, "params": ["classifier.bias", "classifier.weight"], "max_transition_epoch": 4},
    {
        "index": 1,
        "params": ["pooler.dense.bias", "pooler.dense.weight", "encoder.LayerNorm.bias", "encoder.LayerNorm.weight"],
        "max_transition_epoch": 7,
        "lr": 1e-05,
        "new_lr_scheduler": {
            "lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.7}},
            "pl_lrs_cfg": {"interval": "epoch", "frequency": 1, "name": SCHED_NAME},
            "init_pg_lrs": [2e-06],
        },
    },
    {
        "index": 2,
        "params": [f"encoder.layer.{i}.{part}.{w}" for i in (4, 5) for part in ("attention.self.query", "output.dense") for w in ("weight", "bias")],
        "max_transition_epoch": 12,
        "lr": 1e-05,
        "new_lr_scheduler": {
            "lr_scheduler_init": {
                "class_path": "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
                "init_args": {"T_0": 3, "T_mult": 2, "eta_min": 1e-07},
            },
            "pl_lrs_cfg": {"interval": "epoch", "frequency": 1, "name": SCHED_NAME},
            "init_pg_lrs": [1e-06, 1e-06, 2e-06],
        },
    },
    {
        "index": 3,
        "params": ["embeddings.LayerNorm.bias", "embeddings.LayerNorm.weight"]
        + [f"encoder.layer.{i}.output.dense.{w}" for i in range(4) for w in ("weight", "bias")],
        "max_transition_epoch": -1,
        "lr": 1e-05,
    },
]

EDIT_APPLIED = {
    "lr": 5e-06,
    "new_lr_scheduler": {
        "lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.ExponentialLR", "init_args": {"gamma": 0.8}},
        "pl_lrs_cfg": {"interval": "epoch", "frequency": 1, "name": SCHED_NAME},
    },
}
EDIT_CANCELLED = {"lr": 3e-05}

# epochs at which each phase starts (phase 2 ends early: early stopping at the start of epoch 10)
PHASE_START_EPOCH = [0, 4, 7, 10]
MAX_EPOCHS = 14


@dataclass
class Recorder:
    steps_per_epoch: int = 40
    events: list[Event] = field(default_factory=list)
    seq: int = 0
    ts: float = T0
    daemon: str = DAEMON_ID
    run: str = RUN_ID

    def emit(self, kind: str, data: dict[str, Any], step: int | None = None, epoch: int | None = None) -> Event:
        self.seq += 1
        ev = Event(kind=kind, seq=self.seq, ts=round(self.ts, 3), run=self.run, daemon=self.daemon, data=data, step=step, epoch=epoch)
        self.events.append(ev)
        return ev


def _group_names(depth: int) -> list[str]:
    return [f"phase{i}" for i in range(depth + 1)]


def _tags(depth: int) -> list[str]:
    return lr_tag_names(SCHED_NAME, "AdamW", _group_names(depth))


def _lrs(epoch: int) -> list[float]:
    """Every group's LR during ``epoch`` (epoch-interval schedulers: constant within an epoch)."""
    if epoch < 4:  # LinearLR(start_factor=0.1, total_iters=4) on AdamW(lr=1e-5)
        return [1e-05 * (0.1 + 0.9 * min(epoch, 4) / 4)]
    if epoch < 7:  # StepLR(1, 0.7); init_pg_lrs [2e-6] covers group 0, the new group keeps its phase lr
        k = epoch - 4
        return [2e-06 * 0.7**k, 1e-05 * 0.7**k]
    if epoch < 10:  # CosineAnnealingWarmRestarts(T_0=3, T_mult=2, eta_min=1e-7), all 3 groups from init_pg_lrs
        t = epoch - 7
        return [1e-07 + (b - 1e-07) * (1 + math.cos(math.pi * t / 3)) / 2 for b in (1e-06, 1e-06, 2e-06)]
    k = epoch - 10  # ExponentialLR(0.8) from each group's initial_lr (edit: new group at 5e-6)
    return [b * 0.8**k for b in (1e-06, 1e-06, 2e-06, 5e-06)]


def _schedule(depth: int, phases: list[dict[str, Any]], pending: list[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for p in phases:
        state = "done" if p["index"] < depth else ("current" if p["index"] == depth else "pending")
        row = {"index": p["index"], "state": state, **{k: v for k, v in p.items() if k != "index"}}
        mine = [e for e in pending if e["phase"] == p["index"]]
        if mine:
            row["edits"] = mine
        rows.append(row)
    out = {"phases": rows, "depth": depth, "max_depth": len(phases) - 1, "groups": [_group_names(i) for i in range(len(phases))]}
    return json.loads(json.dumps(out))  # a copy: later edits to the run must not rewrite what was published


def _scheduler_repr(phases: list[dict[str, Any]], depth: int) -> dict[str, Any] | None:
    for p in reversed(phases[: depth + 1]):
        if p.get("new_lr_scheduler"):
            return p["new_lr_scheduler"]
    return None


def build_run(steps_per_epoch: int = 40, crash_at: tuple[int, int] | None = None, seed: int = 0) -> list[Event]:
    """The demo run as a list of events; ``crash_at=(epoch, batch)`` ends it there with a failure."""
    rng = random.Random(seed)
    rec = Recorder(steps_per_epoch=steps_per_epoch)
    phases = json.loads(json.dumps(PHASES))
    info = {
        "model": "SentimentMiniLM",
        "module": "fts_examples.sentiment.SentimentMiniLM",
        "optimizer": "AdamW",
        "scheduler": {"class_path": "torch.optim.lr_scheduler.LinearLR", "init_args": {"start_factor": 0.1, "total_iters": 4}},
        "max_epochs": MAX_EPOCHS,
        "steps_per_epoch": steps_per_epoch,
        "config": "configs/demo_explicit_reinit_lr.yaml",
        "pid": 4242,
    }
    rec.emit("state", {"state": "starting", "error": None, "info": info})
    rec.emit("schedule", _schedule(0, phases, []))
    rec.emit("log", {"level": "info", "message": "schedule validated: 4 phases, 1 → 4 param groups"})
    rec.emit("state", {"state": "training", "error": None}, step=0, epoch=0)
    pending: list[dict[str, Any]] = []
    step = 0
    depth = 0
    next_hb = T0 + 1.0
    loss = 0.72
    for epoch in range(MAX_EPOCHS):
        if depth + 1 < len(phases) and epoch == PHASE_START_EPOCH[depth + 1]:
            previous = depth
            depth += 1
            reason = "epoch_limit" if phases[previous]["max_transition_epoch"] == epoch else "early_stopping"
            rec.emit("state", {"state": "transition", "error": None}, step=step, epoch=epoch)
            for e in [e for e in pending if e["phase"] == depth]:
                phases[depth].update(e["changes"])
                e.update(status="applied", applied_step=step)
                rec.emit("edit", {"edit": dict(e)}, step=step, epoch=epoch)
                pending.remove(e)
            rec.emit(
                "transition",
                {
                    "from": previous,
                    "to": depth,
                    "reason": reason,
                    "epoch": epoch,
                    "step": step,
                    "new_groups": [depth],
                    "scheduler": _scheduler_repr(phases, depth),
                    "optimizer": None,
                },
                step=step,
                epoch=epoch,
            )
            rec.emit("schedule", _schedule(depth, phases, pending))
            rec.emit("state", {"state": "training", "error": None}, step=step, epoch=epoch)
            loss += 0.05  # newly thawed layers disturb the loss for a moment
        lrs = _lrs(epoch)
        tags = _tags(depth)
        for batch in range(steps_per_epoch):
            if crash_at == (epoch, batch):
                rec.emit("log", {"level": "error", "message": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}, step=step, epoch=epoch)
                rec.emit("state", {"state": "failed", "error": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}, step=step, epoch=epoch)
                return rec.events
            rec.emit("lr", {"lrs": dict(zip(tags, lrs))}, step=step, epoch=epoch)
            loss = max(0.05, loss * 0.997 + rng.uniform(-0.02, 0.02))
            if batch % 5 == 4:
                rec.emit("metric", {"metrics": {"train_loss": round(loss, 5)}, "stage": "train"}, step=step, epoch=epoch)
            if epoch == 8 and batch == 5:
                e = {"id": "e1", "phase": 3, "changes": EDIT_APPLIED, "status": "queued", "error": None, "created": round(rec.ts, 3), "applied_step": None}
                pending.append(e)
                rec.emit("edit", {"edit": dict(e)}, step=step, epoch=epoch)
                rec.emit("schedule", _schedule(depth, phases, pending))
            if epoch == 8 and batch == 20:
                e = {"id": "e2", "phase": 3, "changes": EDIT_CANCELLED, "status": "queued", "error": None, "created": round(rec.ts, 3), "applied_step": None}
                pending.append(e)
                rec.emit("edit", {"edit": dict(e)}, step=step, epoch=epoch)
                rec.emit("schedule", _schedule(depth, phases, pending))
            if epoch == 9 and batch == 2:
                e = next(x for x in pending if x["id"] == "e2")
                pending.remove(e)
                e["status"] = "cancelled"
                rec.emit("edit", {"edit": dict(e)}, step=step, epoch=epoch)
                rec.emit("schedule", _schedule(depth, phases, pending))
            step += 1
            rec.ts += STEP_SECONDS
            if rec.ts >= next_hb:
                rec.emit("heartbeat", {"state": "training", "phase": depth}, step=step, epoch=epoch)
                next_hb += 1.0
        rec.ts += VAL_SECONDS
        val_loss = round(loss * 1.1 + 0.02 * rng.random() + (0.04 if epoch >= 9 and depth == 2 else 0.0), 5)
        val_acc = round(min(0.95, 0.5 + 0.3 * (1 - math.exp(-epoch / 3)) + 0.01 * rng.random()), 5)
        rec.emit("metric", {"metrics": {"val_loss": val_loss, "val_acc": val_acc}, "stage": "val"}, step=step - 1, epoch=epoch)
        if epoch == 9:
            rec.emit("log", {"level": "warning", "message": "val_loss did not improve for 2 epochs: phase 2 is complete"}, step=step - 1, epoch=epoch)
    rec.emit("state", {"state": "stopping", "error": None}, step=step, epoch=MAX_EPOCHS - 1)
    rec.emit("log", {"level": "info", "message": f"max_epochs={MAX_EPOCHS} reached in the final phase"}, step=step, epoch=MAX_EPOCHS - 1)
    rec.emit("state", {"state": "finished", "error": None}, step=step, epoch=MAX_EPOCHS - 1)
    return rec.events


def write_jsonl(events: list[Event], path: Path, torn_tail: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for ev in events:
            fh.write(event_to_json_line(ev) + "\n")
        if torn_tail is not None:
            fh.write(torn_tail)


def main() -> None:
    write_jsonl(build_run(), HERE / "demo_run" / "events.jsonl")
    crashed = build_run(crash_at=(8, 12))
    write_jsonl(crashed, HERE / "crashed_run" / "events.jsonl", torn_tail='{"v":1,"kind":"lr","seq":99999,"ts":17672')


if __name__ == "__main__":
    main()


def plan_for(changes: dict[str, Any] | None = None, steps_per_epoch: int = 40) -> dict[str, Any]:
    """A ``plan`` op result for the demo run (what the daemon's planner would say), optionally with an edit to
    phase 3's ``lr`` applied (the only change the synthetic planner understands: it scales the new group)."""
    lr3 = (changes or {}).get("lr", EDIT_APPLIED["lr"])
    steps, series = [], {TAG: [] for TAG in _tags(3)}
    depth = 0
    for epoch in range(MAX_EPOCHS):
        while depth + 1 < len(PHASES) and epoch >= PHASE_START_EPOCH[depth + 1]:
            depth += 1
        lrs = _lrs(epoch)
        if depth == 3:
            lrs[3] = lr3 * 0.8 ** (epoch - 10)
        for _ in range(steps_per_epoch):
            steps.append(len(steps))
            for i, tag in enumerate(_tags(3)):
                series[tag].append(lrs[i] if i < len(lrs) else None)
    starts = [{"phase": k, "epoch": e, "step": e * steps_per_epoch} for k, e in enumerate(PHASE_START_EPOCH)]
    return {"steps": steps, "series": series, "phase_starts": starts}
