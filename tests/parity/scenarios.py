"""Framework-agnostic parity scenarios for phased fine-tuning LR trajectories.

Each scenario is run twice:

* by the oracle (``tests/parity/gen_golden.py``) with ``lightning.pytorch`` and the REAL
  ``finetuning_scheduler`` 2.14.1, producing ``tests/parity/golden/<name>.json``;
* by ``tests/test_parity.py`` with ``pytorch_lightning`` and our ``fts_daemon``.

This module must import in both environments, so it never imports ``lightning`` or
``pytorch_lightning`` itself: the Lightning namespace (``pl``) and the callback provider (``fts``)
are passed to :func:`run_scenario`, and every Lightning class is created inside a factory.

Determinism: phase transitions and ReduceLROnPlateau decisions are driven by *scripted* metrics
(``val_loss`` and ``aux_metric``, one value per epoch), never by model outputs, so they are identical
across frameworks and machines. The real training loss is logged as ``train_loss`` only.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
from typing import Any

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # schedules refer to ``parity_scenarios_helpers.LinearWarmupLR``
    sys.path.insert(0, _HERE)

from parity_scenarios_helpers import LinearWarmupLR  # noqa: E402

__all__ = ["SCENARIOS", "run_scenario", "metric_table", "LinearWarmupLR"]

SEED = 42
DATA_SEED = 1234
BATCH_SIZE = 8
IN_FEATURES = 32

# ---------------------------------------------------------------------------------------------------
# Scripted metrics
# ---------------------------------------------------------------------------------------------------


def metric_table(pattern: str, start: float = 2.0, step: float = 0.1, bump: float = 0.03) -> list[float]:
    """Turn a pattern into per-epoch metric values (mode ``min``).

    ``D``: a new best (strict improvement over every earlier value). ``W``: not an improvement (worse
    than the best so far; consecutive ``W``s get strictly worse). Spaces and ``|`` are ignored and only
    make phase boundaries readable. With ``FTSEarlyStopping(patience=1)`` every ``W`` ends a
    non-final phase (the next epoch starts the next phase) and stops training in the final phase.
    """
    vals: list[float] = []
    best: float | None = None
    worse_run = 0
    for ch in pattern.replace(" ", "").replace("|", ""):
        if ch == "D":
            best = start if best is None else round(best - step, 6)
            worse_run = 0
            vals.append(best)
        elif ch == "W":
            worse_run += 1
            base = start + step if best is None else best
            vals.append(round(base + bump * worse_run, 6))
        else:  # pragma: no cover - programming error in a scenario
            raise ValueError(f"bad metric pattern char {ch!r} in {pattern!r}")
    return vals


def _metric_at(table: list[float], epoch: int) -> float:
    if epoch < len(table):
        return table[epoch]
    # past the scripted table: keep getting worse (never an improvement)
    return round(max(table) + 0.5 + 0.01 * (epoch - len(table)), 6)


# ---------------------------------------------------------------------------------------------------
# Schedule helpers
# ---------------------------------------------------------------------------------------------------

# Linear layers sit at Sequential indices 0, 2, 4, 6 (ReLUs in between); the head (6) trains first.
LAYER_PARAMS = {
    0: ["layers.6.weight", "layers.6.bias"],
    1: ["layers.4.weight", "layers.4.bias"],
    2: ["layers.2.weight", "layers.2.bias"],
    3: ["layers.0.weight", "layers.0.bias"],
}

_LRS = "torch.optim.lr_scheduler."


def _sched(cls: str, init_args: dict | None = None, pl_lrs_cfg: dict | None = None, **extra: Any) -> dict:
    """A ``new_lr_scheduler`` / ``reinit_lr_cfg`` block. ``extra`` may hold ``init_pg_lrs`` or
    ``use_current_optimizer_pg_lrs``."""
    cfg: dict[str, Any] = {
        "lr_scheduler_init": {
            "class_path": cls if "." in cls else _LRS + cls,
            "init_args": dict(init_args or {}),
        }
    }
    if pl_lrs_cfg is not None:
        cfg["pl_lrs_cfg"] = dict(pl_lrs_cfg)
    cfg.update(extra)
    return cfg


def _optim(cls: str, **init_args: Any) -> dict:
    return {"optimizer_init": {"class_path": cls, "init_args": dict(init_args)}}


def _explicit(phases: dict[int, dict] | None = None, n_phases: int = 4) -> dict:
    """An explicit schedule (FTS YAML shape, int keys) over the default layer split."""
    phases = phases or {}
    sched: dict[int, dict] = {}
    for i in range(n_phases):
        sched[i] = {"params": list(LAYER_PARAMS[i])}
        sched[i].update(copy.deepcopy(phases.get(i, {})))
    return sched


def _model(**overrides: Any) -> dict:
    base: dict[str, Any] = {
        "optimizer": ("torch.optim.SGD", {"lr": 1e-3, "weight_decay": 1e-6}),
        "lr_scheduler": (_LRS + "StepLR", {"step_size": 1, "gamma": 0.7}),
        "pl_lrs_cfg": {},
        "no_decay": None,
        # "trainable": optimizer gets the params requiring grad at configure time (phase 0 only)
        # "all": optimizer gets every param -> FTS's phase-0 enforcement regroups it
        "opt_params": "trainable",
        "n_train_batches": 4,
        "n_val_batches": 2,
    }
    base.update(overrides)
    return base


DEFAULT_VAL = "DDW DDW DDW DDW"  # 4 phases x 3 epochs; final phase stops on its W (epoch 11)

_ES = {"monitor": "val_loss", "mode": "min", "patience": 1, "min_delta": 0.0}
_CKPT = {"monitor": "val_loss", "mode": "min", "save_top_k": 1}


def _scenario(description: str, *, schedule: dict | None, fts_kwargs: dict | None = None,
              model: dict | None = None, val: str = DEFAULT_VAL, aux: str | None = None,
              max_epochs: int = 14, es_kwargs: dict | None | bool = True,
              ckpt_kwargs: dict | None = None, class_prefixes: list[str] | None = None) -> dict:
    return {
        "description": description,
        "schedule": schedule,
        "fts_kwargs": dict(fts_kwargs or {}),
        "model": model or _model(),
        "val_pattern": val,
        "aux_pattern": aux if aux is not None else val,
        "max_epochs": max_epochs,
        # True -> default FTSEarlyStopping kwargs; None/False -> no ES callback passed
        "es_kwargs": dict(_ES) if es_kwargs is True else (dict(es_kwargs) if es_kwargs else None),
        "ckpt_kwargs": dict(ckpt_kwargs or _CKPT),
        # module prefixes (besides torch.optim.) that the schedule's class_paths use; FTS imports any
        # class_path, our engine needs them allow-listed (``allowed_class_prefixes``)
        "class_prefixes": list(class_prefixes or []),
    }


_STEPLR_07 = {"step_size": 1, "gamma": 0.7}
_CAWR_1_2 = {"T_0": 1, "T_mult": 2, "eta_min": 1e-7}
_EXP_NAME = {"interval": "epoch", "frequency": 1, "name": "Explicit_Reinit_LR_Scheduler"}
_IMP_NAME = {"interval": "epoch", "frequency": 1, "name": "Implicit_Reinit_LR_Scheduler"}

_EXPLICIT_STEPLR_CAWR = _explicit({
    1: {"new_lr_scheduler": _sched("StepLR", _STEPLR_07, dict(_EXP_NAME))},
    2: {"lr": 3e-6,
        "new_lr_scheduler": _sched("CosineAnnealingWarmRestarts", _CAWR_1_2, dict(_EXP_NAME),
                                   init_pg_lrs=[1e-6, 2e-6])},
})

_LAMBDA = "parity_scenarios_helpers.LinearWarmupLR"
_LAMBDA_SCHEDULE = _explicit({
    1: {"new_lr_scheduler": _sched(_LAMBDA, {"warmup_steps": 2, "total_steps": 30},
                                   {"interval": "step", "name": "lambda"}, init_pg_lrs=[5e-4])},
    2: {"lr": 3e-6,
        "new_lr_scheduler": _sched(_LAMBDA, {"warmup_steps": 3, "total_steps": 24},
                                   {"interval": "step", "name": "lambda"}, init_pg_lrs=[1e-6, 2e-6])},
})
_LAMBDA_MODEL = _model(lr_scheduler=(_LAMBDA, {"warmup_steps": 4, "total_steps": 40}),
                       pl_lrs_cfg={"interval": "step", "name": "lambda"})

_OPT_REINIT_SCHEDULE = _explicit({
    1: {"new_optimizer": _optim("torch.optim.Adam", lr=2e-4, weight_decay=1e-6)},
    3: {"new_optimizer": _optim("torch.optim.SGD", lr=1e-3, momentum=0.9)},
})

SCENARIOS: dict[str, dict] = {
    "explicit_steplr_cawr": _scenario(
        "explicit: ph1 new StepLR(1,.7); ph2 lr 3e-6 + CAWR(1,2,1e-7) init_pg_lrs [1e-6,2e-6]; ph3 no reinit",
        schedule=_EXPLICIT_STEPLR_CAWR, fts_kwargs={"restore_best": False}),
    "explicit_steplr_cawr_restore_best": _scenario(
        "as explicit_steplr_cawr with restore_best; ph1 never improves so ph2 restores a depth-0 ckpt "
        "and replays ph1+ph2",
        schedule=_EXPLICIT_STEPLR_CAWR, fts_kwargs={"restore_best": True}, val="DDW W DDW DDW"),
    "implicit_reinit_lr": _scenario(
        "implicit: reinit_lr_cfg StepLR(1,.7) named, max_depth 2",
        schedule=None, val="DDDW DDW DDDW",
        model=_model(pl_lrs_cfg=dict(_IMP_NAME)),
        fts_kwargs={"restore_best": False, "max_depth": 2,
                    "reinit_lr_cfg": _sched("StepLR", _STEPLR_07, dict(_IMP_NAME))}),
    "lambdalr": _scenario(
        "explicit LinearWarmupLR (LambdaLR subclass) at step interval in ph0/1/2; ph3 no reinit; "
        "apply_lambdas_new_pgs False",
        schedule=_LAMBDA_SCHEDULE, model=_LAMBDA_MODEL,
        fts_kwargs={"restore_best": False, "apply_lambdas_new_pgs": False},
        class_prefixes=["parity_scenarios_helpers."]),
    "lambdalr_apply_new_pgs": _scenario(
        "as lambdalr with apply_lambdas_new_pgs True",
        schedule=_LAMBDA_SCHEDULE, model=_LAMBDA_MODEL,
        fts_kwargs={"restore_best": False, "apply_lambdas_new_pgs": True},
        class_prefixes=["parity_scenarios_helpers."]),
    "rlrop_min_lr_list": _scenario(
        "explicit, max_transition_epoch 4/8/10 (val always improves); ph1 ReduceLROnPlateau(patience 1, "
        "min_lr [2e-7,1e-7]) init_pg_lrs [1.5e-6] monitor aux_metric; ph2 lr 4e-6 StepLR init_pg_lrs [2e-6,3e-6]",
        schedule=_explicit({
            0: {"max_transition_epoch": 4},
            1: {"max_transition_epoch": 8,
                "new_lr_scheduler": _sched("ReduceLROnPlateau", {"patience": 1, "min_lr": [2e-7, 1e-7]},
                                           {"monitor": "aux_metric", "name": "rlrop"},
                                           init_pg_lrs=[1.5e-6])},
            2: {"max_transition_epoch": 10, "lr": 4e-6,
                "new_lr_scheduler": _sched("StepLR", _STEPLR_07, {"name": "rlrop"},
                                           init_pg_lrs=[2e-6, 3e-6])},
        }),
        val="D" * 12, aux="DDDD DWWW DD DD", max_epochs=12,
        fts_kwargs={"restore_best": False}),
    "implicit_rlrop_initial": _scenario(
        "implicit; initial ReduceLROnPlateau(patience 1) so group 0 has no initial_lr; reinit_lr_cfg "
        "ReduceLROnPlateau(patience 1, factor .5, min_lr 1e-8); max_depth 2",
        schedule=None, val="DDDW DDDW DDDW", aux="DWWD DWWD DWWW",
        model=_model(lr_scheduler=(_LRS + "ReduceLROnPlateau", {"patience": 1}),
                     pl_lrs_cfg={"monitor": "aux_metric"}),
        fts_kwargs={"restore_best": False, "max_depth": 2,
                    "reinit_lr_cfg": _sched("ReduceLROnPlateau",
                                            {"patience": 1, "factor": 0.5, "min_lr": 1e-8},
                                            {"monitor": "aux_metric", "name": "Implicit_RLROP"})}),
    "phase_lr_no_reinit": _scenario(
        "explicit, initial StepLR(1,.7) continues; ph1 lr 2e-5, ph2 lr 3e-6, ph3 no lr (base_max_lr 5e-5)",
        schedule=_explicit({1: {"lr": 2e-5}, 2: {"lr": 3e-6}}),
        fts_kwargs={"restore_best": False, "base_max_lr": 5e-5}),
    "phase_lr_no_reinit_cosine": _scenario(
        "explicit, initial CosineAnnealingLR(T_max 6, eta_min 1e-6) continues across phases; ph1 lr 2e-4, "
        "ph2 lr 5e-5, ph3 base_max_lr",
        schedule=_explicit({1: {"lr": 2e-4}, 2: {"lr": 5e-5}}),
        model=_model(lr_scheduler=(_LRS + "CosineAnnealingLR", {"T_max": 6, "eta_min": 1e-6})),
        fts_kwargs={"restore_best": False}),
    "no_lr_scheduler": _scenario(
        "configure_optimizers returns only the optimizer; phases with lr, no reinit",
        schedule=_explicit({1: {"lr": 2e-4}, 2: {"lr": 3e-5}}),
        model=_model(lr_scheduler=None), fts_kwargs={"restore_best": False}),
    "explicit_multistep_constant_exp": _scenario(
        "explicit: ph1 MultiStepLR([1,3], .5) init_pg_lrs [4e-4]; ph2 ConstantLR(.25, 2); ph3 ExponentialLR(.8)",
        schedule=_explicit({
            1: {"new_lr_scheduler": _sched("MultiStepLR", {"milestones": [1, 3], "gamma": 0.5},
                                           init_pg_lrs=[4e-4])},
            2: {"lr": 2e-5, "new_lr_scheduler": _sched("ConstantLR", {"factor": 0.25, "total_iters": 2})},
            3: {"new_lr_scheduler": _sched("ExponentialLR", {"gamma": 0.8})},
        }),
        val="DDW DDDW DDDW DDW", max_epochs=16, fts_kwargs={"restore_best": False}),
    "init_pg_lrs_lengths": _scenario(
        "init_pg_lrs too long (ph1: 3 values, 2 groups), exact incl. new group (ph2), too short (ph3)",
        schedule=_explicit({
            1: {"new_lr_scheduler": _sched("StepLR", _STEPLR_07, init_pg_lrs=[1e-4, 2e-5, 9e-9])},
            2: {"new_lr_scheduler": _sched("ExponentialLR", {"gamma": 0.9}, init_pg_lrs=[5e-5, 1e-5, 7e-6])},
            3: {"lr": 6e-6,
                "new_lr_scheduler": _sched("CosineAnnealingWarmRestarts", {"T_0": 1, "T_mult": 1},
                                           init_pg_lrs=[3e-5])},
        }),
        fts_kwargs={"restore_best": False}),
    "step_interval_freq2": _scenario(
        "5 train batches; initial StepLR(2,.9) at step interval; ph1 ExponentialLR(.95) step freq 2; "
        "ph2 StepLR(3,.5) step freq 3; ph3 no reinit",
        schedule=_explicit({
            1: {"new_lr_scheduler": _sched("ExponentialLR", {"gamma": 0.95},
                                           {"interval": "step", "frequency": 2})},
            2: {"new_lr_scheduler": _sched("StepLR", {"step_size": 3, "gamma": 0.5},
                                           {"interval": "step", "frequency": 3})},
        }),
        model=_model(lr_scheduler=(_LRS + "StepLR", {"step_size": 2, "gamma": 0.9}),
                     pl_lrs_cfg={"interval": "step"}, n_train_batches=5),
        fts_kwargs={"restore_best": False}),
    "epoch_interval_freq2": _scenario(
        "initial StepLR(1,.7) epoch; ph1 (starts epoch 3) StepLR(1,.8) epoch freq 2; ph2 (epoch 7) "
        "ExponentialLR(.9) freq 3; ph3 no reinit",
        schedule=_explicit({
            1: {"new_lr_scheduler": _sched("StepLR", {"step_size": 1, "gamma": 0.8},
                                           {"interval": "epoch", "frequency": 2})},
            2: {"new_lr_scheduler": _sched("ExponentialLR", {"gamma": 0.9}, {"frequency": 3})},
        }),
        val="DDW DDDW DDW DDW", fts_kwargs={"restore_best": False}),
    "optimizer_reinit": _scenario(
        "explicit new_optimizer only: ph1 SGD->Adam(lr 2e-4), ph3 ->SGD(lr 1e-3, momentum .9); StepLR continues",
        schedule=_OPT_REINIT_SCHEDULE, fts_kwargs={"restore_best": False}),
    "optimizer_reinit_restore_best": _scenario(
        "as optimizer_reinit with restore_best True",
        schedule=_OPT_REINIT_SCHEDULE, fts_kwargs={"restore_best": True}),
    "optimizer_reinit_lr": _scenario(
        "ph1 new_optimizer AdamW(lr 3e-4, wd 1e-2) + StepLR(1,.5); ph2 CAWR(2) init_pg_lrs [1e-4,2e-5]; "
        "ph3 new_optimizer SGD(lr 5e-4) + ExponentialLR(.8)",
        schedule=_explicit({
            1: {"new_optimizer": _optim("torch.optim.AdamW", lr=3e-4, weight_decay=1e-2),
                "new_lr_scheduler": _sched("StepLR", {"step_size": 1, "gamma": 0.5})},
            2: {"new_lr_scheduler": _sched("CosineAnnealingWarmRestarts", {"T_0": 2, "eta_min": 1e-7},
                                           init_pg_lrs=[1e-4, 2e-5])},
            3: {"new_optimizer": _optim("torch.optim.SGD", lr=5e-4),
                "new_lr_scheduler": _sched("ExponentialLR", {"gamma": 0.8})},
        }),
        fts_kwargs={"restore_best": False}),
    "implicit_reinit_optim": _scenario(
        "implicit reinit_optim_cfg Adam(lr 5e-4) at every transition; initial StepLR continues",
        schedule=None,
        fts_kwargs={"restore_best": False,
                    "reinit_optim_cfg": _optim("torch.optim.Adam", lr=5e-4, weight_decay=1e-6)}),
    "implicit_reinit_optim_lr": _scenario(
        "implicit reinit_optim_cfg AdamW(lr 4e-4) + reinit_lr_cfg StepLR(1,.6) named; max_depth 2",
        schedule=None, val="DDW DDDW DDW",
        model=_model(pl_lrs_cfg=dict(_IMP_NAME)),
        fts_kwargs={"restore_best": False, "max_depth": 2,
                    "reinit_optim_cfg": _optim("torch.optim.AdamW", lr=4e-4),
                    "reinit_lr_cfg": _sched("StepLR", {"step_size": 1, "gamma": 0.6}, dict(_IMP_NAME))}),
    "seed_explicit_demo": _scenario(
        "seed doc: AdamW(1e-5, wd 1e-5, eps 1e-7) all params + no_decay [bias] -> phase-0 regroup; "
        "LinearLR(.1, 4); ph1 StepLR init_pg_lrs [2e-6]*2; ph2 CAWR(3,2,1e-7) init_pg_lrs [1e-6,1e-6,2e-6,2e-6]",
        schedule={
            0: {"params": ["layers.6.weight", "layers.6.bias"]},
            1: {"params": ["layers.4.weight", "layers.4.bias"],
                "new_lr_scheduler": _sched("StepLR", _STEPLR_07, dict(_EXP_NAME), init_pg_lrs=[2e-6, 2e-6])},
            2: {"params": ["layers.[02].(weight|bias)"],
                "new_lr_scheduler": _sched("CosineAnnealingWarmRestarts",
                                           {"T_0": 3, "T_mult": 2, "eta_min": 1e-7}, dict(_EXP_NAME),
                                           init_pg_lrs=[1e-6, 1e-6, 2e-6, 2e-6])},
        },
        model=_model(optimizer=("torch.optim.AdamW", {"lr": 1e-5, "weight_decay": 1e-5, "eps": 1e-7}),
                     lr_scheduler=(_LRS + "LinearLR", {"start_factor": 0.1, "total_iters": 4}),
                     pl_lrs_cfg=dict(_EXP_NAME), no_decay=["bias"], opt_params="all"),
        val="DDDDW DDW DDDDDW", fts_kwargs={"restore_best": False}),
    "use_current_pg_lrs": _scenario(
        "use_current_optimizer_pg_lrs on every reinit: ph1 StepLR(1,.7), ph2 CAWR(2, 1e-7), ph3 LinearLR(.5, 2)",
        schedule=_explicit({
            1: {"new_lr_scheduler": _sched("StepLR", _STEPLR_07, use_current_optimizer_pg_lrs=True)},
            2: {"new_lr_scheduler": _sched("CosineAnnealingWarmRestarts", {"T_0": 2, "eta_min": 1e-7},
                                           use_current_optimizer_pg_lrs=True)},
            3: {"new_lr_scheduler": _sched("LinearLR", {"start_factor": 0.5, "total_iters": 2},
                                           use_current_optimizer_pg_lrs=True)},
        }),
        fts_kwargs={"restore_best": False}),
    "epoch_transitions_only": _scenario(
        "epoch_transitions_only, mte 2/5/8/11 with max_epochs 10 (final mte raises it); ph1 ExponentialLR(.8); "
        "ph2 lr 2e-5; ph3 StepLR(2,.5) init_pg_lrs [1e-4,1e-4,1e-5]",
        schedule=_explicit({
            0: {"max_transition_epoch": 2},
            1: {"max_transition_epoch": 5, "new_lr_scheduler": _sched("ExponentialLR", {"gamma": 0.8})},
            2: {"max_transition_epoch": 8, "lr": 2e-5},
            3: {"max_transition_epoch": 11,
                "new_lr_scheduler": _sched("StepLR", {"step_size": 2, "gamma": 0.5},
                                           init_pg_lrs=[1e-4, 1e-4, 1e-5])},
        }),
        max_epochs=10, es_kwargs=None, val="D" * 14,
        fts_kwargs={"restore_best": False, "epoch_transitions_only": True}),
}


# ---------------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------------


def _import(path: str) -> Any:
    mod, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(mod), attr)


def _lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]


def _fingerprint(module: Any) -> list[float]:
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])
        return [float(flat.sum()), float(flat.abs().sum())]


def _sched_meta(trainer: Any) -> dict | None:
    cfgs = getattr(trainer, "lr_scheduler_configs", None) or []
    if not cfgs:
        return None
    c = cfgs[0]
    return {
        "cls": type(c.scheduler).__name__,
        "interval": c.interval,
        "frequency": c.frequency,
        "name": c.name,
        "monitor": c.monitor,
        "reduce_on_plateau": bool(c.reduce_on_plateau),
    }


def _make_module_cls(pl: Any, spec: dict) -> type:
    mspec = spec["model"]
    val_table = metric_table(spec["val_pattern"])
    aux_table = metric_table(spec["aux_pattern"])

    class ParityModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(IN_FEATURES, 32), torch.nn.ReLU(),
                torch.nn.Linear(32, 32), torch.nn.ReLU(),
                torch.nn.Linear(32, 32), torch.nn.ReLU(),
                torch.nn.Linear(32, 2),
            )
            if mspec.get("no_decay"):
                self.no_decay = list(mspec["no_decay"])
            g = torch.Generator().manual_seed(DATA_SEED)
            n_tr = mspec["n_train_batches"] * BATCH_SIZE
            n_va = mspec["n_val_batches"] * BATCH_SIZE
            self._train = torch.utils.data.TensorDataset(
                torch.randn(n_tr, IN_FEATURES, generator=g), torch.randn(n_tr, 2, generator=g))
            self._val = torch.utils.data.TensorDataset(
                torch.randn(n_va, IN_FEATURES, generator=g), torch.randn(n_va, 2, generator=g))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            torch.nn.functional.mse_loss(self(x), y)  # computed, not used for any decision

        def on_validation_epoch_end(self) -> None:
            e = int(self.current_epoch)
            self.log("val_loss", _metric_at(val_table, e))
            self.log("aux_metric", _metric_at(aux_table, e))

        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(self._train, batch_size=BATCH_SIZE, shuffle=False)

        def val_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(self._val, batch_size=BATCH_SIZE, shuffle=False)

        def configure_optimizers(self) -> Any:
            opt_path, opt_args = mspec["optimizer"]
            if mspec["opt_params"] == "all":
                params = list(self.parameters())
            else:
                params = [p for p in self.parameters() if p.requires_grad]
            optimizer = _import(opt_path)(params, **copy.deepcopy(opt_args))
            if not mspec.get("lr_scheduler"):
                return optimizer
            sch_path, sch_args = mspec["lr_scheduler"]
            scheduler = _import(sch_path)(optimizer, **copy.deepcopy(sch_args))
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": scheduler, **copy.deepcopy(mspec.get("pl_lrs_cfg") or {})}}

    return ParityModule


def _make_recorder_cls(pl: Any) -> type:
    class LRRecorder(pl.Callback):
        """Appended after the fts callbacks, so ``on_train_epoch_start`` sees post-transition LRs."""

        def __init__(self, fts_callback: Any) -> None:
            super().__init__()
            self.fts_callback = fts_callback
            self.steps: list = []
            self.epoch_start: list = []
            self.epoch_meta: list = []
            self.final: dict = {}

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            opt = trainer.optimizers[0]
            epoch = int(trainer.current_epoch)
            self.epoch_start.append([epoch, int(self.fts_callback.curr_depth), _lrs(opt)])
            self.epoch_meta.append({
                "epoch": epoch,
                "optimizer": type(opt).__name__,
                "n_groups": len(opt.param_groups),
                "scheduler": _sched_meta(trainer),
                # weights after any restore_best rollback; compared approximately, diagnostic only
                "param_fingerprint": _fingerprint(pl_module),
            })

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            # the LR that this optimizer step is about to use
            self.steps.append([int(trainer.current_epoch), int(trainer.global_step), _lrs(trainer.optimizers[0])])

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            opt = trainer.optimizers[0]
            self.final = {
                "optimizer": type(opt).__name__,
                "n_groups": len(opt.param_groups),
                "curr_depth": int(self.fts_callback.curr_depth),
                "current_epoch": int(trainer.current_epoch),
                "global_step": int(trainer.global_step),
                "max_epochs": int(trainer.fit_loop.max_epochs),
                "lrs": _lrs(opt),
                "initial_lrs": [None if "initial_lr" not in g else float(g["initial_lr"]) for g in opt.param_groups],
                "weight_decays": [float(g.get("weight_decay", 0.0)) for g in opt.param_groups],
                "group_sizes": [len(g["params"]) for g in opt.param_groups],
                "scheduler": _sched_meta(trainer),
            }

    return LRRecorder


def run_scenario(name: str, pl: Any, fts: Any, tmp_dir: str, extra_fts_kwargs: dict | None = None) -> dict:
    """Run scenario ``name`` with Lightning namespace ``pl`` (``lightning.pytorch`` or ``pytorch_lightning``)
    and callback provider ``fts`` (``finetuning_scheduler`` or ``fts_daemon``); return the recorded LRs.

    ``extra_fts_kwargs`` are added to the ``FinetuningScheduler`` constructor kwargs (for engine-only
    options such as ``allowed_class_prefixes``; the oracle never passes any)."""
    spec = copy.deepcopy(SCENARIOS[name])
    os.makedirs(tmp_dir, exist_ok=True)
    pl.seed_everything(SEED, workers=True)

    module = _make_module_cls(pl, spec)()

    fts_kwargs = copy.deepcopy(spec["fts_kwargs"])
    fts_kwargs.update(copy.deepcopy(extra_fts_kwargs or {}))
    if spec["schedule"] is not None:
        fts_kwargs["ft_schedule"] = copy.deepcopy(spec["schedule"])
    fts_cb = fts.FinetuningScheduler(**fts_kwargs)
    callbacks: list = [fts_cb]
    if spec["es_kwargs"]:
        callbacks.append(fts.FTSEarlyStopping(**spec["es_kwargs"]))
    callbacks.append(fts.FTSCheckpoint(dirpath=os.path.join(tmp_dir, "checkpoints"), **spec["ckpt_kwargs"]))
    recorder = _make_recorder_cls(pl)(fts_cb)
    callbacks.append(recorder)

    trainer = pl.Trainer(
        default_root_dir=tmp_dir,
        max_epochs=spec["max_epochs"],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        log_every_n_steps=1,
        callbacks=callbacks,
    )
    trainer.fit(module)

    return {
        "scenario": name,
        "steps": recorder.steps,
        "epoch_start": recorder.epoch_start,
        "epoch_meta": recorder.epoch_meta,
        "final": recorder.final,
    }
