"""Validate a parsed schedule against a model before any training step.

Pure structure and types are checked by :func:`fts_daemon.schedule.parse_schedule`; this module adds what needs
torch: class imports against the allowlist, dry-run construction on a stand-in optimizer with the number of groups
each phase will really have (simulated, ``no_decay`` splits included), and ``init_pg_lrs`` / ``min_lr`` list lengths.
Every problem is one line naming the phase, key, value and reason; all problems are reported together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.optim.lr_scheduler import ReduceLROnPlateau

from fts_daemon.argtypes import arg_problems
from fts_daemon.reinit import (
    ReinitError,
    dry_run_optimizer,
    dry_run_scheduler,
    optimizer_class,
    scheduler_class,
    scheduler_init_args,
)
from fts_daemon.schedule import (
    GroupInfo,
    LRSchedulerSpec,
    OptimizerSpec,
    Problem,
    Schedule,
    ScheduleError,
    problem,
    simulate_phase_groups,
)


@dataclass
class ValidationOptions:
    no_decay: Sequence[str] | None = None
    phase0_groups: int | None = None  # None: the default layout (1 group, 2 with no_decay)
    allow_untested: bool = False
    allowed_prefixes: Sequence[str] | None = None
    strict: bool = False  # init_pg_lrs length mismatches become errors
    epoch_transitions_only: bool = False
    reinit_lr_cfg: LRSchedulerSpec | None = None
    reinit_optim_cfg: OptimizerSpec | None = None


@dataclass
class ValidationReport:
    warnings: list[str] = field(default_factory=list)
    groups: list[list[GroupInfo]] = field(default_factory=list)  # per phase, after its groups are added


def _group_label(i: int, g: GroupInfo) -> str:
    return f"pg{i + 1} ({g.label})"


def _scheduler_cls(init: Any, index: int, key: str, opts: ValidationOptions, problems: list[Problem]) -> type | None:
    try:
        return scheduler_class(init, opts.allow_untested, opts.allowed_prefixes)
    except ReinitError as err:
        problems.append(problem(str(err), index, f"{key}.lr_scheduler_init.class_path", init.class_path))
        return None


def _optimizer_cls(init: Any, index: int, key: str, opts: ValidationOptions, problems: list[Problem]) -> type | None:
    try:
        return optimizer_class(init, opts.allowed_prefixes)
    except ReinitError as err:
        problems.append(problem(str(err), index, f"{key}.optimizer_init.class_path", init.class_path))
        return None


def _args_fit(cls: type, args: dict[str, Any], index: int, where: str, problems: list[Problem]) -> bool:
    """Check ``args`` against ``cls``'s annotations (``where``: the init_args key); False if any is wrong."""
    wrong = arg_problems(cls, args)
    for name, value, reason in wrong:
        problems.append(problem(reason, index, f"{where}.{name}", value))
    return not wrong


def _check_lr_spec(
    spec: LRSchedulerSpec,
    index: int,
    key: str,
    groups_before: list[GroupInfo],
    groups_after: list[GroupInfo],
    phase_lr: float | None,
    opts: ValidationOptions,
    implicit: bool,
    problems: list[Problem],
    warnings: list[str],
) -> None:
    init = spec.lr_scheduler_init
    cls = _scheduler_cls(init, index, key, opts, problems)
    if cls is None:
        return
    if "optimizer" in init.init_args:
        warnings.append(
            f"phase {index}: {key}.lr_scheduler_init.init_args.optimizer is ignored; the existing optimizer is used"
        )
    is_plateau = issubclass(cls, ReduceLROnPlateau)
    plateau = spec.pl_lrs_cfg.get("reduce_on_plateau", is_plateau)
    if plateau and not spec.pl_lrs_cfg.get("monitor"):
        problems.append(
            problem("ReduceLROnPlateau needs the metric to watch in `pl_lrs_cfg.monitor`", index, f"{key}.pl_lrs_cfg")
        )
    n_after = len(groups_after)
    args = scheduler_init_args(init)
    min_lr = args.get("min_lr")
    if isinstance(min_lr, (list, tuple)):
        if implicit:
            problems.append(
                problem(
                    "cannot be a list in `reinit_lr_cfg`: the group count changes at every phase",
                    index,
                    f"{key}.lr_scheduler_init.init_args.min_lr",
                    list(min_lr),
                )
            )
            return
        if len(min_lr) != n_after:
            names = ", ".join(_group_label(i, g) for i, g in enumerate(groups_after))
            problems.append(
                problem(
                    f"has {len(min_lr)} values but the optimizer will have {n_after} groups here: {names}",
                    index,
                    f"{key}.lr_scheduler_init.init_args.min_lr",
                    list(min_lr),
                )
            )
            return
    if _args_fit(cls, args, index, f"{key}.lr_scheduler_init.init_args", problems):
        try:
            dry_run_scheduler(cls, args, n_after)
        except ReinitError as err:
            problems.append(problem(str(err), index, f"{key}.lr_scheduler_init.init_args", init.init_args))
    if spec.init_pg_lrs is not None:
        n = len(spec.init_pg_lrs)
        if n != n_after:
            if n < n_after:
                left = ", ".join(_group_label(i, g) for i, g in enumerate(groups_after) if i >= n)
                new_start = len(groups_before)
                detail = []
                if any(i >= new_start for i in range(n, n_after)):
                    detail.append(f"new groups start at the phase lr {phase_lr!r}")
                if n < new_start:
                    detail.append("older groups keep their current lr")
                msg = (
                    f"has {n} values for {n_after} groups; not covered: {left} ({'; '.join(detail)})"
                )
            else:
                msg = f"has {n} values for {n_after} groups; the last {n - n_after} values are ignored"
            if opts.strict:
                problems.append(problem(msg, index, f"{key}.init_pg_lrs", list(spec.init_pg_lrs)))
            else:
                warnings.append(f"phase {index}: {key}.init_pg_lrs: {msg}")


def _check_optim_spec(spec: OptimizerSpec, index: int, key: str, opts: ValidationOptions, problems: list[Problem]) -> None:
    init = spec.optimizer_init
    cls = _optimizer_cls(init, index, key, opts, problems)
    if cls is None or not _args_fit(cls, init.init_args, index, f"{key}.optimizer_init.init_args", problems):
        return
    try:
        dry_run_optimizer(cls, init.init_args)
    except ReinitError as err:
        problems.append(problem(str(err), index, f"{key}.optimizer_init.init_args", init.init_args))


def _reinit_specs(phase: Any, opts: ValidationOptions) -> tuple[tuple[str, LRSchedulerSpec] | None,
                                                                 tuple[str, OptimizerSpec] | None]:
    """(key, spec) of the scheduler and the optimizer reinit that apply at ``phase``: implicit mode's configs, which
    win at every phase, else the phase's own blocks; None where there is none."""
    lr = ("reinit_lr_cfg", opts.reinit_lr_cfg) if opts.reinit_lr_cfg is not None else (
        ("new_lr_scheduler", phase.new_lr_scheduler) if phase.new_lr_scheduler is not None else None)
    optim = ("reinit_optim_cfg", opts.reinit_optim_cfg) if opts.reinit_optim_cfg is not None else (
        ("new_optimizer", phase.new_optimizer) if phase.new_optimizer is not None else None)
    return lr, optim


def _implicit(opts: ValidationOptions) -> bool:
    return opts.reinit_lr_cfg is not None or opts.reinit_optim_cfg is not None


def _as_the_configs(problems: list[Problem]) -> list[Problem]:
    """Implicit configs are the same at every phase: their problems, found while checking one phase (whose group
    count a dry run used), are the config's and name no phase."""
    return [dataclasses.replace(p, phase=None) if p.key and p.key.startswith(("reinit_lr_cfg", "reinit_optim_cfg"))
            else p for p in problems]


def class_problems(schedule: Schedule, opts: ValidationOptions) -> list[Problem]:
    """The checks that need no group counts (class paths, then arguments against the class's annotations), for a
    schedule whose params could not be resolved: reported beside the unmatched patterns, so that fixing those does
    not uncover a second round of problems that could have been told the first time."""
    problems: list[Problem] = []
    for phase in schedule.phases[1:]:
        lr, optim = _reinit_specs(phase, opts)
        if lr is not None:
            cls = _scheduler_cls(lr[1].lr_scheduler_init, phase.index, lr[0], opts, problems)
            if cls is not None:
                _args_fit(cls, scheduler_init_args(lr[1].lr_scheduler_init), phase.index,
                          f"{lr[0]}.lr_scheduler_init.init_args", problems)
        if optim is not None:
            ocls = _optimizer_cls(optim[1].optimizer_init, phase.index, optim[0], opts, problems)
            if ocls is not None:
                _args_fit(ocls, optim[1].optimizer_init.init_args, phase.index, f"{optim[0]}.optimizer_init.init_args",
                          problems)
        if _implicit(opts):
            return _as_the_configs(problems)  # the same at every phase: once
    return problems


def validate_schedule(schedule: Schedule, opts: ValidationOptions) -> ValidationReport:
    """Check every phase; raise :class:`ScheduleError` with all problems, or return warnings and group layout.

    ``schedule`` must already have its params resolved (:func:`fts_daemon.schedule.resolve_params`).
    """
    problems: list[Problem] = []
    report = ValidationReport()
    optim_reinit_at = [
        p.index
        for p in schedule.phases
        if p.index > 0 and (opts.reinit_optim_cfg is not None or p.new_optimizer is not None)
    ]
    layout = simulate_phase_groups(schedule, opts.no_decay, opts.phase0_groups, optim_reinit_at)
    report.groups = layout
    for phase in schedule.phases:
        if phase.index == 0:
            continue
        before = layout[phase.index - 1]
        after = layout[phase.index]
        if not phase.resolved:
            report.warnings.append(f"phase {phase.index}: params is empty; the phase adds no parameter groups")
        lr, optim = _reinit_specs(phase, opts)
        if lr is not None:
            _check_lr_spec(lr[1], phase.index, lr[0], before, after, phase.lr, opts, opts.reinit_lr_cfg is not None,
                           problems, report.warnings)
        if optim is not None:
            _check_optim_spec(optim[1], phase.index, optim[0], opts, problems)
        if _implicit(opts) and problems:
            problems = _as_the_configs(problems)  # reported once
            break
    # FTS notes this too: the phase starts once the earlier limit is reached and its own is already behind it
    mark = -1
    for phase in schedule.phases[:-1]:  # the last phase's limit is max_epochs' business (warned about elsewhere)
        limit = phase.max_transition_epoch
        if 0 <= limit <= mark:
            report.warnings.append(
                f"phase {phase.index}: max_transition_epoch {limit} is not after an earlier phase's ({mark}): "
                "the phase ends after its first epoch"
            )
        mark = max(mark, limit)
    if opts.epoch_transitions_only:
        missing = [str(p.index) for p in schedule.phases if p.max_transition_epoch < 0]
        if missing:
            problems.append(
                problem(
                    f"epoch_transitions_only needs max_transition_epoch >= 0 in every phase; missing in phase(s) "
                    f"{', '.join(missing)}",
                    None,
                    "max_transition_epoch",
                )
            )
    # dedupe while keeping order (implicit configs can repeat the same line)
    seen: set[str] = set()
    unique = []
    for p in problems:
        if str(p) not in seen:
            seen.add(str(p))
            unique.append(p)
    if unique:
        raise ScheduleError(unique)
    return report


def max_transition_watermark(schedule: Schedule) -> int:
    return max((p.max_transition_epoch for p in schedule.phases), default=-1)
