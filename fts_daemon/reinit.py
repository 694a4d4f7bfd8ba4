"""LR scheduler and optimizer reinitialization: the arithmetic that decides every learning rate.

The order of operations here is finetuning-scheduler's (see README, "Parity"), because users compare curves:
capture the scheduler state and group LRs, (optionally restore the best checkpoint), re-apply the captured state,
add the phase's groups at the phase ``lr`` (extending ``base_lrs`` / ``min_lrs`` / ``lr_lambdas``), then build the
new scheduler (``init_pg_lrs`` > current LR if ``use_current_optimizer_pg_lrs`` > ``initial_lr``) and wrap it in a
fresh Lightning ``LRSchedulerConfig`` built from ``pl_lrs_cfg``.

Nothing here knows about the Trainer: functions take an optimizer, a list of scheduler configs and names.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from pytorch_lightning.utilities.types import LRSchedulerConfig
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    MultiplicativeLR,
    MultiStepLR,
    ReduceLROnPlateau,
    StepLR,
)

from fts_daemon.argtypes import arg_problems
from fts_daemon.schedule import InitSpec, LRSchedulerSpec, OptimizerSpec, split_no_decay

# Schedulers whose per-group state is fully described by base_lrs / min_lrs / lr_lambdas, so groups can be appended
# safely. Subclasses are accepted. Others (OneCycleLR, CyclicLR, SequentialLR, ...) keep per-group or child state we
# cannot extend; they need ``allow_untested``.
SUPPORTED_SCHEDULERS: tuple[type, ...] = (
    LambdaLR,
    MultiplicativeLR,
    StepLR,
    MultiStepLR,
    ExponentialLR,
    CosineAnnealingLR,
    ReduceLROnPlateau,
    CosineAnnealingWarmRestarts,
    ConstantLR,
    LinearLR,
)

# Class paths that a schedule (or an edit arriving over the wire) may name. Anything else is refused before import,
# so a class_path can never reach ``os.system`` or ``builtins.eval``.
DEFAULT_ALLOWED_PREFIXES: tuple[str, ...] = ("torch.optim.",)

PL_LRS_FIELDS = {f.name for f in fields(LRSchedulerConfig)} - {"scheduler", "opt_idx"}


class ReinitError(ValueError):
    """A scheduler/optimizer class or its arguments cannot be used."""


def import_class(class_path: str, allowed_prefixes: Sequence[str] | None = None) -> type:
    """Import ``class_path`` if it starts with an allowed prefix and names a class (never a function)."""
    if not isinstance(class_path, str) or "." not in class_path:
        raise ReinitError(f"class_path {class_path!r} must be a dotted path like torch.optim.lr_scheduler.StepLR")
    if allowed_prefixes is not None and not any(class_path.startswith(p) for p in allowed_prefixes):
        raise ReinitError(
            f"class_path {class_path!r} is outside the allowed prefixes ({', '.join(allowed_prefixes)})"
        )
    module_name, _, attr = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ReinitError(f"cannot import module {module_name!r} for class_path {class_path!r}: {err}") from None
    except Exception as err:  # a module that fails while importing must not take the daemon down
        raise ReinitError(f"importing {module_name!r} failed: {type(err).__name__}: {err}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise ReinitError(f"module {module_name!r} has no attribute {attr!r}")
    if not isinstance(obj, type):
        raise ReinitError(f"class_path {class_path!r} is not a class")
    return obj


def is_supported_scheduler(cls: type) -> bool:
    return issubclass(cls, SUPPORTED_SCHEDULERS)


def scheduler_class(spec: InitSpec, allow_untested: bool, allowed_prefixes: Sequence[str] | None) -> type:
    cls = import_class(spec.class_path, allowed_prefixes)
    if not issubclass(cls, (torch.optim.lr_scheduler.LRScheduler, ReduceLROnPlateau)):
        raise ReinitError(f"{spec.class_path} is not a torch LR scheduler")
    if not is_supported_scheduler(cls) and not allow_untested:
        names = ", ".join(c.__name__ for c in SUPPORTED_SCHEDULERS)
        raise ReinitError(
            f"{spec.class_path} is not a supported scheduler (supported: {names}, or subclasses); "
            "set allow_untested=True to try it anyway"
        )
    return cls


def optimizer_class(spec: InitSpec, allowed_prefixes: Sequence[str] | None) -> type:
    cls = import_class(spec.class_path, allowed_prefixes)
    if not issubclass(cls, torch.optim.Optimizer):
        raise ReinitError(f"{spec.class_path} is not a torch optimizer")
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if issubclass(cls, ZeroRedundancyOptimizer):
        raise ReinitError("ZeroRedundancyOptimizer cannot be used for optimizer reinitialization")
    return cls


def scheduler_init_args(spec: InitSpec) -> dict[str, Any]:
    """init_args without an ``optimizer`` key (the existing optimizer is always used). Never mutates the spec."""
    args = copy.deepcopy(spec.init_args)
    args.pop("optimizer", None)
    return args


def _stand_in_optimizer(n_groups: int, lrs: Sequence[float] | None = None) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": (lrs[i] if lrs else 1e-3)} for i in range(n_groups)]
    return torch.optim.SGD(groups, lr=1e-3)


def first_unusable_lr(optimizer: torch.optim.Optimizer) -> tuple[int, Any] | None:
    """(group index, lr) of the first group whose lr is not a finite number >= 0, or None."""
    for i, group in enumerate(optimizer.param_groups):
        lr = group["lr"]
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            return i, lr
    return None


DRY_RUN_STEPS = 16  # scheduler steps a dry run takes: a wrong value used only at a later step shows within these


def dry_run_scheduler(cls: type, init_args: Mapping[str, Any], n_groups: int) -> None:
    """Check the arguments against ``cls``'s annotations, build the scheduler on a stand-in optimizer with
    ``n_groups`` groups and step it ``DRY_RUN_STEPS`` times; raise on failure or on a learning rate that is not a
    finite number >= 0."""
    wrong = arg_problems(cls, init_args)
    if wrong:
        raise ReinitError("; ".join(f"{name}={value!r}: {reason}" for name, value, reason in wrong))
    opt = _stand_in_optimizer(max(n_groups, 1))
    step = 0
    try:
        sched = cls(opt, **dict(init_args))
        for step in range(1, DRY_RUN_STEPS + 1):
            if isinstance(sched, ReduceLROnPlateau):
                sched.step(1.0)
            else:
                opt.step()
                sched.step()
            bad = first_unusable_lr(opt)
            if bad is not None:
                raise ReinitError(f"{cls.__name__}({_fmt_args(init_args)}) sets group {bad[0]}'s lr to {bad[1]!r} at "
                                  f"step {step}")
    except ReinitError:
        raise
    except Exception as err:
        # later steps: only a type error is the arguments' fault (OneCycleLR, say, refuses to step past its
        # total_steps, which a short dry run must not take for a bad schedule)
        if step > 1 and not isinstance(err, TypeError):
            return
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        where = f" at step {step}" if step > 1 else ""
        raise ReinitError(f"{cls.__name__}({_fmt_args(init_args)}) failed{where}: {msg}") from None


def dry_run_optimizer(cls: type, init_args: Mapping[str, Any]) -> None:
    wrong = arg_problems(cls, init_args)
    if wrong:
        raise ReinitError("; ".join(f"{name}={value!r}: {reason}" for name, value, reason in wrong))
    try:
        cls([torch.nn.Parameter(torch.zeros(1))], **dict(init_args))
    except Exception as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ReinitError(f"{cls.__name__}({_fmt_args(init_args)}) failed: {msg}") from None


def _fmt_args(args: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


# --------------------------------------------------------------------------------------------------------------
# Group addition
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NamingPolicy:
    """Whether groups get stable names (``phase1``, ``phase1_no_decay``) that LearningRateMonitor will use."""

    enabled: bool = False

    def name(self, phase: int, no_decay: bool) -> str | None:
        if not self.enabled:
            return None
        return f"phase{phase}" + ("_no_decay" if no_decay else "")


def _existing_param_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group.get("params", [])}


def build_groups(
    named_params: Sequence[tuple[str, torch.nn.Parameter]],
    names: Iterable[str],
    no_decay: Sequence[str] | None,
    phase: int,
    naming: NamingPolicy,
    exclude_ids: set[int] | None = None,
    lr: float | None = None,
) -> list[dict[str, Any]]:
    """Param groups for ``names`` (trainable ones not already in the optimizer), split by ``no_decay``.

    With ``no_decay`` FTS always makes both groups, even if one is empty; we keep that so group numbering (and
    therefore LearningRateMonitor tags) matches.
    """
    wanted = set(names)
    exclude_ids = exclude_ids or set()
    candidates = [(n, p) for n, p in named_params if n in wanted and p.requires_grad and id(p) not in exclude_ids]
    if not candidates:
        return []
    lr_keys: dict[str, Any] = {} if lr is None else {"lr": lr, "initial_lr": lr}
    if no_decay:
        dec, nd = split_no_decay([n for n, _ in candidates], no_decay)
        by_name = dict(candidates)
        groups = [
            {"params": [by_name[n] for n in dec], **lr_keys},
            {"params": [by_name[n] for n in nd], "weight_decay": 0.0, **lr_keys},
        ]
        flags = [False, True]
    else:
        groups = [{"params": [p for _, p in candidates], **lr_keys}]
        flags = [False]
    for g, flag in zip(groups, flags):
        gname = naming.name(phase, flag)
        if gname:
            g["name"] = gname
    return groups


def add_phase_groups(
    optimizer: torch.optim.Optimizer,
    lr_configs: Sequence[LRSchedulerConfig],
    named_params: Sequence[tuple[str, torch.nn.Parameter]],
    names: Sequence[str],
    phase: int,
    phase_lr: float,
    no_decay: Sequence[str] | None,
    apply_lambdas: bool,
    naming: NamingPolicy,
) -> int:
    """Append the phase's groups at ``phase_lr`` and keep every scheduler's per-group lists in step.

    ``base_lrs`` grows by the *unscaled* phase lr; a ReduceLROnPlateau's ``min_lrs`` by its first entry;
    ``lr_lambdas`` by copies of the last lambda. With ``apply_lambdas`` (and a scheduler that has lambdas) the new
    groups start at ``phase_lr * last_lambda(last_epoch)``. Returns the number of groups added.
    """
    if not lr_configs:
        groups = build_groups(named_params, names, no_decay, phase, naming, _existing_param_ids(optimizer), phase_lr)
        for g in groups:
            optimizer.add_param_group(g)
        return len(groups)
    added_total = 0
    start_lr = phase_lr
    for cfg in lr_configs:
        sched = cfg.scheduler
        lambdas = getattr(sched, "lr_lambdas", None)
        if lambdas and apply_lambdas:
            start_lr = start_lr * lambdas[-1](sched.last_epoch)
        groups = build_groups(named_params, names, no_decay, phase, naming, _existing_param_ids(optimizer), start_lr)
        for g in groups:
            optimizer.add_param_group(g)
        added = len(groups)
        added_total += added
        if isinstance(sched, ReduceLROnPlateau):
            sched.min_lrs.extend([sched.min_lrs[0]] * added)
        else:
            sched.base_lrs.extend([phase_lr] * added)
            if lambdas:
                missing = max(len(sched.base_lrs) - len(lambdas), 0)
                lambdas.extend([lambdas[-1]] * missing)
    return added_total


# --------------------------------------------------------------------------------------------------------------
# LR state capture / restore
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LRState:
    """What a transition must not lose: the first scheduler's state and every group's current lr."""

    scheduler_state: dict[str, Any]
    group_lrs: list[float]


def capture_lr_state(optimizer: torch.optim.Optimizer, lr_configs: Sequence[LRSchedulerConfig]) -> LRState:
    state = copy.deepcopy(lr_configs[0].scheduler.state_dict()) if lr_configs else {}
    return LRState(scheduler_state=state, group_lrs=[g["lr"] for g in optimizer.param_groups])


def restore_lr_state(optimizer: torch.optim.Optimizer, lr_configs: Sequence[LRSchedulerConfig], state: LRState) -> None:
    for cfg in lr_configs:
        cfg.scheduler.load_state_dict(copy.deepcopy(state.scheduler_state))
    for group, lr in zip(optimizer.param_groups, state.group_lrs):
        group["lr"] = lr


# --------------------------------------------------------------------------------------------------------------
# Scheduler / optimizer construction
# --------------------------------------------------------------------------------------------------------------


def lightning_lrs_kwargs(spec: LRSchedulerSpec, cls: type) -> dict[str, Any]:
    """LRSchedulerConfig kwargs from ``pl_lrs_cfg``; never mutates the spec. Omitted keys take Lightning defaults."""
    cfg = {k: v for k, v in spec.pl_lrs_cfg.items() if k in PL_LRS_FIELDS}
    cfg.setdefault("reduce_on_plateau", issubclass(cls, ReduceLROnPlateau))
    if cfg["reduce_on_plateau"] and not cfg.get("monitor"):
        raise ReinitError("a ReduceLROnPlateau scheduler needs `pl_lrs_cfg.monitor` (the metric it watches)")
    return cfg


def reinit_scheduler(
    optimizer: torch.optim.Optimizer,
    spec: LRSchedulerSpec,
    allow_untested: bool = False,
    allowed_prefixes: Sequence[str] | None = None,
) -> LRSchedulerConfig:
    """Reset group LRs as the spec says and wrap a new scheduler around the optimizer (all groups)."""
    cls = scheduler_class(spec.lr_scheduler_init, allow_untested, allowed_prefixes)
    key = "lr" if spec.use_current_optimizer_pg_lrs else "initial_lr"
    if spec.init_pg_lrs:
        starts: Sequence[float] = spec.init_pg_lrs
    else:
        starts = [g.get(key, g["lr"]) for g in optimizer.param_groups]
    # zip: a short init_pg_lrs leaves the remaining groups at their current lr (validated and warned about earlier)
    for group, lr in zip(optimizer.param_groups, starts):
        group["lr"] = lr
        if spec.init_pg_lrs:
            group["initial_lr"] = lr
    kwargs = lightning_lrs_kwargs(spec, cls)
    scheduler = cls(optimizer, **scheduler_init_args(spec.lr_scheduler_init))
    return LRSchedulerConfig(scheduler=scheduler, **kwargs)


def build_optimizer(
    spec: OptimizerSpec,
    groups: list[dict[str, Any]],
    allowed_prefixes: Sequence[str] | None = None,
) -> torch.optim.Optimizer:
    cls = optimizer_class(spec.optimizer_init, allowed_prefixes)
    optimizer = cls(groups, **copy.deepcopy(spec.optimizer_init.init_args))
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return optimizer


def rebuild_scheduler(
    optimizer: torch.optim.Optimizer,
    spec: LRSchedulerSpec,
    allow_untested: bool = False,
    allowed_prefixes: Sequence[str] | None = None,
) -> LRSchedulerConfig:
    """Construct the scheduler a checkpoint was running (its state is loaded afterwards by Lightning)."""
    cls = scheduler_class(spec.lr_scheduler_init, allow_untested, allowed_prefixes)
    saved = [(g["lr"], g.get("initial_lr")) for g in optimizer.param_groups]
    scheduler = cls(optimizer, **scheduler_init_args(spec.lr_scheduler_init))
    for group, (lr, initial) in zip(optimizer.param_groups, saved):  # construction steps once; undo that
        group["lr"] = lr
        if initial is not None:
            group["initial_lr"] = initial
    return LRSchedulerConfig(scheduler=scheduler, **lightning_lrs_kwargs(spec, cls))


def pad_lambdas(lr_configs: Sequence[LRSchedulerConfig], n_groups: int) -> None:
    """Make sure a lambda scheduler has one lambda per group (its state dict does not carry plain functions)."""
    for cfg in lr_configs:
        lambdas = getattr(cfg.scheduler, "lr_lambdas", None)
        if lambdas and len(lambdas) < n_groups:
            lambdas.extend([lambdas[-1]] * (n_groups - len(lambdas)))


def current_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in optimizer.param_groups]


def finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)
