"""Planner == trained trajectory; TensorBoard LR tags; generated/effective schedule files; group names; phase scalar."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fts_daemon import FinetuningScheduler, FTSEarlyStopping
from fts_daemon.schedule import ScheduleError, parse_phase, parse_schedule, parse_yaml_text
from tests.engine_models import STEP_LR, LRRecorder, TinyNet, explicit_schedule, loaders, trainer

NAME = "Explicit_Reinit_LR_Scheduler"

SEED_LIKE = {
    0: {"params": ["layer.6.*"], "max_transition_epoch": 2},
    1: {
        "params": ["layer.4.*"],
        "max_transition_epoch": 4,
        "new_lr_scheduler": {
            "lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.7}},
            "pl_lrs_cfg": {"interval": "epoch", "frequency": 1, "name": NAME},
            "init_pg_lrs": [2e-6, 2e-6, 1e-5, 1e-5],
        },
    },
    2: {
        "params": ["layer.2.*", "layer.0.*"],
        "max_transition_epoch": 8,
        "new_lr_scheduler": {
            "lr_scheduler_init": {
                "class_path": "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts",
                "init_args": {"T_0": 3, "T_mult": 2, "eta_min": 1e-7},
            },
            "pl_lrs_cfg": {"interval": "step", "frequency": 2, "name": NAME},
            "init_pg_lrs": [1e-6, 1e-6, 2e-6, 2e-6, 2e-6, 2e-6],
        },
    },
}


def seed_like_model(**kw: Any) -> TinyNet:
    return TinyNet(
        optimizer="AdamW",
        optimizer_args={"lr": 1e-5, "weight_decay": 1e-5, "eps": 1e-7},
        scheduler="LinearLR",
        scheduler_args={"start_factor": 0.1, "total_iters": 4},
        lrs_cfg={"interval": "epoch", "frequency": 1, "name": NAME},
        no_decay=["bias"],
        all_params=True,
        **kw,
    )


@pytest.mark.parametrize("mode", ["explicit", "implicit", "es-driven"])
def test_plan_equals_trained_trajectory(tmp_path: Path, mode: str) -> None:
    if mode == "explicit":
        model, kw, epochs = seed_like_model(), {"ft_schedule": copy.deepcopy(SEED_LIKE), "epoch_transitions_only": True}, 10
        extra: list[Any] = []
    elif mode == "implicit":
        model, kw, epochs = TinyNet(), {"reinit_lr_cfg": copy.deepcopy(STEP_LR), "epoch_transitions_only": False}, 8
        extra = [FTSEarlyStopping(monitor="val_loss", patience=1)]
    else:
        model, kw, epochs = TinyNet(), {"ft_schedule": explicit_schedule()}, 8
        extra = [FTSEarlyStopping(monitor="val_loss", patience=1)]
    rec = LRRecorder()
    fts = FinetuningScheduler(restore_best=False, **kw)
    t = trainer(tmp_path, [fts, rec, *extra], max_epochs=epochs)
    t.fit(model, *loaders())
    plan = fts.plan()
    # the plan covers max_epochs; a run ended early by early stopping covers a prefix of it
    assert len(plan.steps) >= len(rec.steps) > 0
    tags = list(plan.series)
    for i, got in enumerate(rec.steps):
        planned = [plan.series[tag][i] for tag in tags if plan.series[tag][i] is not None]
        assert planned == got, f"step {i}: planned {planned} != trained {got}"
    assert [s["phase"] for s in plan.phase_starts] == list(range(fts.curr_depth + 1))


def test_plan_previews_an_edited_schedule(tmp_path: Path) -> None:
    fts = FinetuningScheduler(ft_schedule=copy.deepcopy(SEED_LIKE), epoch_transitions_only=True, restore_best=False)
    t = trainer(tmp_path, [fts], max_epochs=3)
    t.fit(seed_like_model(), *loaders())  # stops in phase 1; phase 2 is still ahead
    edited = fts.schedule.copy()
    raw = edited[2].to_dict()
    raw["new_lr_scheduler"] = {
        "lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.5}},
        "pl_lrs_cfg": {"name": NAME},
    }
    edited.phases[2] = parse_phase(2, raw, 1e-5, [], [])
    edited.phases[2].resolved = fts.schedule[2].resolved
    base, preview = fts.plan(max_epochs=10), fts.plan(max_epochs=10, schedule=edited)
    start = base.phase_starts[2]["step"]
    assert base.phases[start] == preview.phases[start] == 2
    assert base.group_lrs(start - 1) == preview.group_lrs(start - 1)
    assert base.group_lrs(start + 8) != preview.group_lrs(start + 8)
    # StepLR(gamma 0.5) at epoch interval: the next epoch's first step halves every group's LR
    first, next_epoch = preview.group_lrs(start), preview.group_lrs(start + 4)
    assert all(next_epoch[k] == v * 0.5 for k, v in first.items())


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    files = list(logdir.rglob("events.out.tfevents.*"))
    assert files, f"no event files under {logdir}"
    out: dict[str, list[tuple[int, float]]] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_tensorboard_lr_series_are_continuous_per_group(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    fts = FinetuningScheduler(ft_schedule=copy.deepcopy(SEED_LIKE), epoch_transitions_only=True, restore_best=False)
    rec = LRRecorder()
    t = trainer(tmp_path, [fts, LearningRateMonitor(), rec], max_epochs=10, logger=logger, log_every_n_steps=1)
    t.fit(seed_like_model(), *loaders())
    scalars = _scalars(tmp_path / "tb")
    lr_tags = sorted(k for k in scalars if k.startswith(NAME))
    # one name everywhere: one tag per group (pg1..pg6), no lr-AdamW/... family
    assert lr_tags == [f"{NAME}/pg{i}" for i in range(1, 7)]
    assert not any(k.startswith("lr-") for k in scalars)
    pg1 = sorted(scalars[f"{NAME}/pg1"])
    # pg1 spans all three phases: LinearLR warm-up (epoch interval), StepLR, then CAWR (step interval)
    values = [v for _, v in pg1]
    assert values[0] == pytest.approx(1e-6, rel=1e-6)
    assert pytest.approx(2e-6, rel=1e-6) in values
    steps = [s for s, _ in pg1]
    assert steps == sorted(steps) and steps[-1] >= 30
    # pg5 only exists from phase 2 on, starting at its init_pg_lrs value
    assert sorted(scalars[f"{NAME}/pg5"])[0][1] == pytest.approx(2e-6, rel=1e-6)
    # the logged phase scalar steps through 0, 1, 2
    assert sorted({int(v) for _, v in scalars["fts_phase"]}) == [0, 1, 2]


def test_named_groups_give_phase_tags(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    fts = FinetuningScheduler(
        ft_schedule=copy.deepcopy(SEED_LIKE), epoch_transitions_only=True, restore_best=False, name_param_groups=True
    )
    t = trainer(tmp_path, [fts, LearningRateMonitor()], max_epochs=6, logger=logger, log_every_n_steps=1)
    t.fit(seed_like_model(), *loaders())
    tags = sorted(k for k in _scalars(tmp_path / "tb") if k.startswith(NAME))
    assert tags == sorted(f"{NAME}/phase{i}{s}" for i in range(3) for s in ("", "_no_decay"))


def test_generated_and_effective_schedules_written(tmp_path: Path) -> None:
    fts = FinetuningScheduler(restore_best=False, max_depth=2, log_dir=str(tmp_path / "logs"))
    t = trainer(tmp_path, [fts, FTSEarlyStopping(monitor="val_loss", patience=1)], max_epochs=2)
    t.fit(TinyNet(), *loaders())
    gen = yaml.safe_load((tmp_path / "logs" / "TinyNet_ft_schedule.yaml").read_text())
    # reversed registration order, two per phase
    assert gen[0]["params"] == ["layer.6.bias", "layer.6.weight"]
    assert gen[3]["params"] == ["layer.0.bias", "layer.0.weight"]
    eff = yaml.safe_load((tmp_path / "logs" / "TinyNet_ft_schedule_effective.yaml").read_text())
    assert eff[1]["lr"] == 1e-5 and eff[1]["max_transition_epoch"] == -1


def test_gen_ft_sched_only_exits_cleanly(tmp_path: Path) -> None:
    fts = FinetuningScheduler(gen_ft_sched_only=True, log_dir=str(tmp_path))
    t = trainer(tmp_path, [fts], max_epochs=1)
    with pytest.raises(SystemExit) as info:
        t.fit(TinyNet(), *loaders())
    assert info.value.code == 0
    assert (tmp_path / "TinyNet_ft_schedule.yaml").exists()


def test_restore_best_rolls_back_weights_not_lrs(tmp_path: Path) -> None:
    runs = {}
    for restore in (False, True):
        torch.manual_seed(0)
        rec = LRRecorder()
        kw: dict[str, Any] = {"restore_best": restore}
        fts = FinetuningScheduler(ft_schedule=explicit_schedule(), **kw)
        from fts_daemon import FTSCheckpoint

        cbs = [fts, FTSEarlyStopping(monitor="val_loss", patience=1), rec, FTSCheckpoint(monitor="val_loss", dirpath=tmp_path / f"c{restore}")]
        t = trainer(tmp_path / str(restore), cbs, max_epochs=8)
        model = TinyNet()
        t.fit(model, *loaders())
        runs[restore] = (rec.steps, [p.detach().clone() for p in model.parameters()], fts)
    assert runs[True][0] == runs[False][0]  # FTS re-applies the latest LR state after restoring
    assert any(not torch.equal(a, b) for a, b in zip(runs[True][1], runs[False][1]))
    assert runs[True][2].curr_depth == 3


def _seed_yaml_blocks() -> list[str]:
    text = Path(__file__).resolve().parents[2].joinpath("shared/seed/lr_scheduler_reinit.rst")
    if not text.exists():
        text = Path("/work/shared/seed/lr_scheduler_reinit.rst")
    lines = text.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip().startswith(".. code-block:: yaml"):
            indent = len(lines[i]) - len(lines[i].lstrip())
            body, i = [], i + 1
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                if not lines[i].strip().startswith(":"):
                    body.append(lines[i])
                i += 1
            blocks.append(textwrap.dedent("\n".join(body)).strip("\n"))
        else:
            i += 1
    return blocks


def test_every_seed_yaml_block_loads() -> None:
    blocks = _seed_yaml_blocks()
    assert len(blocks) == 10
    for block in blocks:
        # the doc elides with "..." lines; they are not part of the shapes it documents
        elided = any(line.strip() == "..." for line in block.splitlines())
        data = parse_yaml_text("\n".join(line for line in block.splitlines() if line.strip() != "..."))
        if elided:  # a fragment: it must load and have the documented top-level shape
            assert isinstance(data, (dict, list))
        elif isinstance(data, dict) and all(isinstance(k, int) for k in data):
            if 0 in data:
                parse_schedule(data)
            else:
                for k, v in data.items():
                    problems: list[Any] = []
                    parse_phase(k, v, 1e-5, problems, [])
                    assert not problems, problems
        else:
            assert isinstance(data, (dict, list))


def test_seed_full_schedules_resolve_against_deberta_names() -> None:
    from fts_daemon.schedule import resolve_params

    names = [
        "model.deberta.embeddings.LayerNorm.weight",
        "model.deberta.embeddings.LayerNorm.bias",
        *[f"model.deberta.encoder.layer.{i}.{part}.dense.weight" for i in range(12) for part in ("attention.output", "intermediate", "output")],
        "model.deberta.encoder.rel_embeddings.weight",
        "model.deberta.encoder.LayerNorm.weight",
        "model.deberta.encoder.LayerNorm.bias",
        "model.pooler.dense.weight",
        "model.pooler.dense.bias",
        "model.classifier.weight",
        "model.classifier.bias",
    ]
    full = [b for b in _seed_yaml_blocks() if b.startswith("0:") and "new_lr_scheduler" in b and "init_pg_lrs" in b]
    assert full
    for block in full:
        schedule, _ = parse_schedule(parse_yaml_text(block))
        resolve_params(schedule, names)
        assert len(schedule[2].resolved) == 1 + 36 + 2  # rel_embeddings, 12 layers x 3 parts, embeddings LayerNorm
    with pytest.raises(ScheduleError):
        parse_schedule(parse_yaml_text("0:\n  params: [a]\n0:\n  params: [b]\n"))


def test_plan_before_the_train_loader_exists_says_so(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    errors: list[str] = []

    class AskEarly(pl.Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            try:
                fts.plan()
            except RuntimeError as err:
                errors.append(str(err))

    fts = FinetuningScheduler(ft_schedule=explicit_schedule(), restore_best=False)
    t = trainer(tmp_path, [fts, FTSEarlyStopping(monitor="val_loss", patience=1), AskEarly()], max_epochs=1)
    t.fit(TinyNet(), *loaders())
    assert errors and errors[0].startswith("no plan yet")
    assert len(fts.plan().steps) == 4  # once training ran, steps per epoch are known


def test_a_long_plan_is_sampled_keeping_each_phase_start_and_the_end() -> None:
    from fts_daemon.planner import Plan

    n = 100_003
    starts = [{"phase": 0, "epoch": 0, "step": 0}, {"phase": 1, "epoch": 7, "step": 33_337},
              {"phase": 2, "epoch": 15, "step": 71_111}]
    plan = Plan(steps=list(range(n)), epochs=[s // 4762 for s in range(n)],
                phases=[sum(s >= p["step"] for p in starts) - 1 for s in range(n)],
                series={"pg1": [1e-3 / (1 + s) for s in range(n)],
                        "pg2": [None if s < 33_337 else 2e-4 for s in range(n)]},
                phase_starts=starts)
    same, stride = plan.sampled(n)
    assert same is plan and stride == 1
    sampled, stride = plan.sampled(1000)
    assert stride == 101 and len(sampled.steps) <= 1000 + len(starts) + 1
    assert {0, 33_337, 71_111, n - 1} <= set(sampled.steps) and sampled.steps == sorted(sampled.steps)
    for i, step in enumerate(sampled.steps):  # every column taken at the same steps
        assert sampled.series["pg1"][i] == plan.series["pg1"][step] and sampled.phases[i] == plan.phases[step]
        assert sampled.series["pg2"][i] == plan.series["pg2"][step] and sampled.epochs[i] == plan.epochs[step]
    assert sampled.phase_starts == starts


def test_a_bounded_plan_records_the_full_plans_values_at_fewer_steps_and_stops_at_its_horizon(tmp_path: Path) -> None:
    """The daemon's `plan` op bounds the simulation (a run of millions of steps took minutes and gigabytes): it
    records every stride-th step (each phase's first and last step and the plan's last too) with exactly the full
    plan's values, stops after the epoch that reaches ``max_steps``, and calls ``pause`` as it goes."""
    fts = FinetuningScheduler(ft_schedule=copy.deepcopy(SEED_LIKE), epoch_transitions_only=True, restore_best=False)
    t = trainer(tmp_path, [fts], max_epochs=3)
    t.fit(seed_like_model(), *loaders())
    spe, epochs = 37, 30  # phase 2 (step interval, every 2nd batch) runs from epoch 6 (SEED_LIKE) to the end
    full = fts.plan(steps_per_epoch=spe, max_epochs=epochs)
    assert full.steps == list(range(spe * epochs)) and full.stride == 1 and full.horizon_epochs is None
    pauses: list[int] = []
    bounded = fts.plan(steps_per_epoch=spe, max_epochs=epochs, max_points=100, pause=lambda: pauses.append(1))
    assert bounded.stride == -(-spe * epochs // 100) and bounded.total_steps == spe * epochs and pauses
    must = {spe * epochs - 1} | {p["step"] for p in full.phase_starts} | {p["step"] - 1 for p in full.phase_starts[1:]}
    assert must <= set(bounded.steps) and set(range(0, spe * epochs, bounded.stride)) <= set(bounded.steps)
    assert len(bounded.steps) <= 100 + len(must) and bounded.steps == sorted(set(bounded.steps))
    for i, step in enumerate(bounded.steps):
        assert bounded.group_lrs(i) == full.group_lrs(step) and bounded.phases[i] == full.phases[step], step
        assert bounded.epochs[i] == full.epochs[step]
    assert bounded.table() == full.table() and bounded.phase_starts == full.phase_starts
    short = fts.plan(steps_per_epoch=spe, max_epochs=epochs, max_steps=8 * spe + 1)  # ends after epoch 8 (9 epochs)
    assert short.horizon_epochs == 9 and short.steps == list(range(9 * spe)) and short.total_steps == 9 * spe
    assert all(short.group_lrs(s) == full.group_lrs(s) for s in short.steps)
    assert [p["phase"] for p in short.phase_starts] == [p["phase"] for p in full.phase_starts if p["epoch"] < 9]
    sampled, stride = bounded.sampled(40)  # thinned again for a reply: strides multiply
    assert stride == sampled.stride == bounded.stride * -(-len(bounded.steps) // 40)


def test_start_epochs_the_simulation_could_not_use_are_refused() -> None:
    """Such starts were left out without a word: a plan that silently ignored what the user asked for."""
    from fts_daemon.planner import PlanError, check_transition_epochs
    from fts_daemon.schedule import parse_schedule

    schedule, _ = parse_schedule({i: {"params": [f"layer.{i}.*"]} for i in range(6)}, 1e-5)  # ended by early stopping
    schedule.phases[2].max_transition_epoch = 5  # phase 3 starts at epoch 5 whenever phase 2 runs
    check_transition_epochs({1: 2, 2: 4, 4: 7}, schedule, max_depth=4, max_epochs=10)  # 3 follows from 2's limit
    for given, kw, reason in (
        ({1: 2, 3: 6}, {}, "phase 3 cannot start before phase 2 does, and nothing says when that is (phase 1 has no "
                           "max_transition_epoch; give phase 2 a start too)"),
        ({2: 3}, {}, "phase 2 cannot start before phase 1 does"),
        ({4: 7}, {}, "phase 4 cannot start before phase 2 does"),  # 3 would follow 2, but 2 never starts
        ({1: 2, 2: 3, 5: 8}, {"max_depth": 4}, "phase 5 does not run: max_depth is 4"),
        ({1: 20}, {"max_epochs": 16}, "phase 1 cannot start at epoch 20: the run ends after epoch 15 (max_epochs 16)"),
    ):
        with pytest.raises(PlanError) as info:
            check_transition_epochs(given, schedule, **kw)
        assert str(info.value).startswith(reason), (given, str(info.value))
